"""The method table: every method the pipeline trains and the report shows, declared once.

A method is one implementation file plus one :class:`Method` entry in :data:`METHODS`. From the
table come the pipeline's steps (table order), the run folders (``Method.folder``), the report's
rows, ids and paired comparisons, the choices of ``finetune.generator`` and the phase III scripts'
``--help``. This module imports nothing heavy (implementations are named ``"module:Name"`` and
imported when a run needs them), so that ``--help`` and config checks stay fast.

Kinds (what a method trains on, hence which runner trains and tests it):

- ``backbone``: phase I, a backbone + classifier trained on images (``engine.phase_i``), selected by
  its ``settings`` (``train.loss``, ``model.classifier``, ``distill.enabled``).
- ``maps``: phase III on CAM-layer feature maps, one :class:`fsa.generators.MapGenerator` subclass
  (``implementation``) adds the batch's generated rows (``engine.phase_iii_maps``).
- ``features``: phase III on pooled features of the frozen backbone with a linear classifier
  (``engine.phase_iii_features``; TailCalib / TailCalibX).

Phases II and III start from any backbone (``backbone: <phase I method id>`` in their configs). A
method trained on a backbone is an :class:`Arm`: a report row and a run folder. On the CE backbone an
arm is named as its method (``tailcalibx``, ``checkpoints/phase_iii_online-tailcalibx``); on another
it carries the backbone (``cosine_tailcalibx``, ``checkpoints/phase_iii_online-tailcalibx-on-cosine_ce``,
phase II in ``features-cosine_ce/``).

See docs/ARCHITECTURE.md, "Adding a method".
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Iterator

from utils.cli import script_command
from utils.errors import UserError

STAGES = ("phase_i", "phase_iii")
MODES = ("online", "offline")
KINDS = ("backbone", "maps", "features", "decoupled")
# what a method reads: the phase I model, phase II's head/tail split and confusing classes, phase II's
# feature store, the training images
INPUTS = ("phase_i_model", "phase_ii_split", "phase_ii_store", "images")
# the runner of each kind: run(inputs: PhaseIIIInputs, method: Method) -> results dict
RUNNERS = {"maps": "engine.phase_iii_maps:run", "features": "engine.phase_iii_features:run",
           "decoupled": "engine.phase_iii_decoupled:run"}
# pipeline.py --suite: fsa = the chain, its controls, the post-hoc methods; full adds the other phase I
# variants and the re-trained classifiers; tailcalibx = the seven experiments of the TailCalibX release
SUITES = ("fsa", "full", "tailcalibx")
DEFAULT_GENERATOR = "fsa"  # its runs keep the plain folder name phase_iii_<mode>
BASELINE = "ce"  # its phase I runs keep the plain folder name phase_i, its phase II features/
# the phase I config keys whose values select a phase I method (absent from a method's settings: the default)
SELECTING_KEYS = ("train.loss", "model.classifier", "distill.enabled")
TEACHER_SEED_STEP = 1000  # teacher k of a distilled run with seed s trains with seed s + 1000 k


@dataclass(frozen=True)
class Method:
    """One row of the table.

    ``generator`` is the ``finetune.generator`` value that selects a phase III method in its ``mode``;
    ``control`` names the id of the paired control it is reported against, and ``versus_baseline``
    adds the paired difference to the phase I baseline."""

    id: str
    label: str
    group: str
    stage: str
    kind: str
    mode: str | None = None
    generator: str | None = None
    implementation: str | None = None
    consumes: tuple[str, ...] = ()
    control: str | None = None
    versus_baseline: bool = False
    summary: str = ""
    suites: tuple[str, ...] = ("fsa", "full")  # the pipeline suites that run it (phase III: on the CE backbone)
    # phase I: the SELECTING_KEYS values that select it (absent: the schema default), the further --opts its
    # runs take (e.g. LDAM's fixed scale), the phase I method of its teachers (distillation), and the
    # prefix of the ids of phase III arms on it (cosine_tailcalibx)
    settings: tuple[tuple[str, Any], ...] = ()
    opts: tuple[str, ...] = ()
    teacher: str | None = None
    tag: str | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES or self.kind not in KINDS:
            raise ValueError(f"method {self.id}: stage {self.stage!r} / kind {self.kind!r} unknown")
        if self.stage == "phase_i" and self.kind != "backbone":
            raise ValueError(f"method {self.id}: a phase I method is a backbone")
        if unknown := {k for k, _ in self.settings} - set(SELECTING_KEYS):
            raise ValueError(f"method {self.id}: settings {sorted(unknown)} do not select a phase I method")
        if self.stage == "phase_iii" and (self.mode not in MODES or not self.generator or self.kind == "backbone"):
            raise ValueError(f"method {self.id}: a phase III method needs a mode, a generator and a kind other than backbone")
        if unknown := set(self.consumes) - set(INPUTS):
            raise ValueError(f"method {self.id}: unknown inputs {sorted(unknown)}")
        if unknown := set(self.suites) - set(SUITES):
            raise ValueError(f"method {self.id}: unknown suites {sorted(unknown)}")

    @property
    def folder(self) -> str:
        """Its run folder under checkpoints/ on the CE backbone (``phase_i-focal``, ``phase_iii_offline-none``)."""
        if self.stage == "phase_i":
            return "phase_i" if self.id == BASELINE else f"phase_i-{self.id}"
        base = f"phase_iii_{self.mode}"
        return base if self.generator == DEFAULT_GENERATOR else f"{base}-{self.generator}"

    @property
    def script(self) -> str:
        return "phase_i_train_or_test.py" if self.stage == "phase_i" else f"phase_iii_{self.mode}_train_or_test.py"

    def selecting_opts(self, explicit: bool = False) -> list[str]:
        """The --opts that select this method in its script (phase I: its settings and opts; phase III:
        its generator, which ``explicit`` states even when it is the default)."""
        if self.stage == "phase_i":
            return [*(f"{key}={_yaml_value(value)}" for key, value in self.settings), *self.opts]
        return [] if self.generator == DEFAULT_GENERATOR and not explicit else [f"finetune.generator={self.generator}"]

    def command(self, config: str, note: str, *extra: str) -> str:
        """The command line that makes this method's run of (config, note) on the CE backbone."""
        opts = self.selecting_opts()
        return script_command(self.script, config, note, *(["--opts", *opts] if opts else []), *extra)

    def matches(self, cfg: dict, defaults: dict) -> bool:
        """Whether phase I config ``cfg`` selects this method (``defaults``: SELECTING_KEYS -> default)."""
        chosen = dict(self.settings)
        return all(_dotted(cfg, key) == chosen.get(key, defaults[key]) for key in SELECTING_KEYS)

    def runner(self):
        """The function that trains / tests a phase III method: ``run(inputs, method) -> dict``."""
        return load_object(RUNNERS[self.kind])

    def load_implementation(self) -> Any:
        return load_object(self.implementation) if self.implementation else None


def _yaml_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _dotted(cfg: dict, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def phase_ii_folder(backbone: "Method") -> str:
    """The phase II run name of a backbone: ``phase_ii`` (CE, in features/) or ``phase_ii-<id>``
    (in ``features-<id>/``)."""
    return "phase_ii" if backbone.id == BASELINE else f"phase_ii-{backbone.id}"


@dataclass(frozen=True)
class Arm:
    """A method trained on a backbone (a phase I method; for a phase I method, itself): one report row,
    one run folder."""

    method: Method
    backbone: Method

    @property
    def on_baseline(self) -> bool:
        return self.method.stage == "phase_i" or self.backbone.id == BASELINE

    @property
    def id(self) -> str:
        return self.method.id if self.on_baseline else f"{self.backbone.tag or self.backbone.id}_{self.method.id}"

    @property
    def label(self) -> str:
        return self.method.label if self.on_baseline else f"{self.method.label} on {self.backbone.label}"

    @property
    def group(self) -> str:
        return self.method.group

    @property
    def folder(self) -> str:
        return self.method.folder if self.on_baseline else f"{self.method.folder}-on-{self.backbone.id}"

    @property
    def phase_ii(self) -> str:
        """The phase II run it reads (phase III arms)."""
        return phase_ii_folder(self.backbone)

    def opts(self, explicit: bool = False) -> list[str]:
        """The --opts of its run: what selects the method, then (off CE) the backbone."""
        backbone = [] if self.on_baseline else [f"backbone={self.backbone.id}"]
        return [*self.method.selecting_opts(explicit), *backbone]

    def command(self, config: str, note: str, *extra: str) -> str:
        opts = self.opts()
        return script_command(self.method.script, config, note, *(["--opts", *opts] if opts else []), *extra)


def load_object(dotted: str) -> Any:
    """``"package.module:Name"`` -> the object."""
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


class MethodTable:
    """The ordered table; lookups by id, by run folder and by (mode, generator)."""

    def __init__(self, methods: list[Method]):
        self._methods: list[Method] = []
        for method in methods:
            self.register(method)

    def register(self, method: Method) -> Method:
        """Add a method (at the end of the table); ids, folders and (mode, generator) must be new."""
        clash = [m.id for m in self._methods if m.id == method.id or m.folder == method.folder]
        if clash:
            raise ValueError(f"method {method.id} clashes with {clash}")
        self._methods.append(method)
        return method

    def unregister(self, method_id: str) -> None:
        self._methods = [m for m in self._methods if m.id != method_id]

    def __iter__(self) -> Iterator[Method]:
        return iter(list(self._methods))

    def get(self, method_id: str) -> Method:
        for m in self._methods:
            if m.id == method_id:
                return m
        raise KeyError(method_id)

    def by_folder(self, folder: str) -> Arm | None:
        """The arm whose run folder is ``folder``."""
        return next((arm for arm in self.arms() if arm.folder == folder), None)

    def arm(self, method_id: str, backbone_id: str = BASELINE) -> Arm:
        method = self.get(method_id)
        return Arm(method, method if method.stage == "phase_i" else self.get(backbone_id))

    def arms(self) -> list[Arm]:
        """Every arm, in report order: the phase I methods, then each phase III method on each backbone
        (CE first)."""
        backbones = self.stage("phase_i")
        return [*(Arm(b, b) for b in backbones),
                *(Arm(m, b) for b in backbones for m in self.stage("phase_iii"))]

    def suite(self, suite: str) -> list[Arm]:
        """The arms a pipeline suite trains: its methods on CE (table order), then its arms on other
        backbones (``OTHER_BACKBONE_ARMS``)."""
        if suite not in SUITES:
            raise UserError(f"--suite {suite}: choose one of {', '.join(SUITES)}.")
        arms = [self.arm(m.id) for m in self._methods if suite in m.suites]
        return arms + [self.arm(m, b) for m, b in OTHER_BACKBONE_ARMS.get(suite, ())]

    def stage(self, stage: str) -> list[Method]:
        return [m for m in self._methods if m.stage == stage]

    def generators(self, mode: str | None = None) -> list[str]:
        """Every ``finetune.generator`` value (of one phase III mode), in table order."""
        names = [m.generator for m in self.stage("phase_iii") if mode is None or m.mode == mode]
        return list(dict.fromkeys(names))

    def phase_iii(self, mode: str, generator: str, config: str = "NAME", note: str = "default") -> Method:
        """The method that ``finetune.generator=generator`` selects in phase III ``mode``; a UserError
        naming the right script when the generator runs in the other mode only."""
        for m in self.stage("phase_iii"):
            if m.mode == mode and m.generator == generator:
                return m
        others = [m for m in self.stage("phase_iii") if m.generator == generator]
        if not others:
            raise UserError(f"Unknown finetune.generator '{generator}'. Available: {', '.join(self.generators())} "
                            f"(phase III {mode}: {', '.join(self.generators(mode))}).")
        other = others[0]
        raise UserError(
            f"finetune.generator={generator} ({other.label}) runs in phase III {other.mode} mode only: "
            f"{other.command(config, note)}. The {mode} script's generators: {', '.join(self.generators(mode))}.")

    def phase_i(self, cfg: dict) -> Method:
        """The phase I method that phase I config ``cfg`` trains (by its SELECTING_KEYS values)."""
        from utils.schema import PHASE_I, defaults

        default = {key: _dotted(defaults(PHASE_I), key) for key in SELECTING_KEYS}
        for m in self.stage("phase_i"):
            if m.matches(cfg, default):
                return m
        given = ", ".join(f"{key}={_yaml_value(_dotted(cfg, key))}" for key in SELECTING_KEYS)
        known = "; ".join(f"{m.id}: {' '.join(m.selecting_opts()) or '(defaults)'}" for m in self.stage("phase_i"))
        raise UserError(f"No phase I method of the method table (engine/methods.py) trains {given}. The phase I methods "
                        f"and their settings: {known}.")

    def paired(self) -> list[tuple[Arm, Arm]]:
        """``(arm, reference)`` pairs of the report, in report order: each arm against its method's control
        on the same backbone, then (``versus_baseline``) against its backbone's phase I run; a phase I
        method against CE."""
        pairs = []
        for arm in self.arms():
            m, b = arm.method, arm.backbone
            if m.control:
                pairs.append((arm, self.arm(m.control, b.id)))
            if m.versus_baseline:
                reference = self.arm(BASELINE) if m.stage == "phase_i" else self.arm(b.id)
                pairs.append((arm, reference))
        return pairs

    def phase_i_help(self) -> str:
        """The phase I script's list of methods and the --opts that select each, for its ``--help``."""
        lines = ["phase I methods (run folder checkpoints/phase_i-ID/, CE: phase_i/) and the --opts that select them:"]
        lines += [f"  {m.id:<16} {' '.join(m.selecting_opts()) or '(defaults)'}" for m in self.stage("phase_i")]
        return "\n".join(lines)

    def help_text(self, mode: str) -> str:
        """The phase III ``mode`` script's list of methods, for its ``--help``."""
        lines = [f"finetune.generator values of phase III {mode} (default {DEFAULT_GENERATOR}):"]
        lines += [f"  {m.generator:<11} {m.label}: {m.summary}" for m in self.stage("phase_iii") if m.mode == mode]
        lines += ["", f"--opts backbone=ID starts from phase I method ID's run (default {BASELINE}; the run goes to "
                      f"<folder>-on-ID): {', '.join(m.id for m in self.stage('phase_i'))}."]
        return "\n".join(lines)


def _fsa_mode(mode: str, source: str, summary: str) -> list[Method]:
    """FSA in one mode and its paired cRT control (same batches, real tail samples instead of fused maps)."""
    consumes = ("phase_i_model", "phase_ii_split", source)
    control = Method(f"control_{mode}", f"cRT control ({mode}, no fusion)", "FSA", "phase_iii", "maps", mode=mode,
                     generator="none", implementation="fsa.generators.feature_maps:ResampleGenerator",
                     consumes=consumes, summary="FSA's class-balanced batches with real tail samples instead of "
                                                "fused maps (the control)")
    fsa = Method(f"fsa_{mode}", f"FSA {mode}", "FSA", "phase_iii", "maps", mode=mode, generator="fsa",
                 implementation="fsa.generators.feature_maps:FusionGenerator", consumes=consumes,
                 control=control.id, versus_baseline=True, summary=summary)
    return [control, fsa]


def _losses() -> list[Method]:
    """Phase I re-weighting / re-margining losses, each its own phase I run (``--suite full``)."""
    common = dict(group="losses", stage="phase_i", kind="backbone", consumes=("images",), versus_baseline=True,
                  suites=("full",))

    def loss(name: str) -> tuple:
        return (("train.loss", name),)

    return [
        Method("focal", "Focal loss", settings=loss("focal"), **common,
               summary="softmax CE scaled by (1 - p_t)^train.focal_gamma (1: the LDAM-DRW release's focal baseline)"),
        Method("class_balanced", "Class-balanced CE", settings=loss("class_balanced"), **common,
               summary="CE weighted by the effective number of samples (train.cb_beta), batch mean of w_y * CE as "
                       "Cui et al.'s release (train.cb_reduction)"),
        Method("balanced_softmax", "Balanced softmax", settings=loss("balanced_softmax"), **common,
               summary="CE on logits + log(prior)"),
        Method("la_loss", "Logit-adjusted loss", settings=loss("la_loss"), **common,
               summary="CE on logits + train.la_tau * log(prior)"),
        Method("ldam_drw", "LDAM-DRW", settings=(*loss("ldam_drw"), ("model.classifier", "normed")),
               opts=("model.scale=30", "model.learn_scale=false"), **common,
               summary="LDAM margins train.ldam_max_margin * (n_min / n_c)^(1/4) on the release's bias-free "
                       "NormedLinear cosine logits (s = 30), class-balanced weights from train.drw_epoch on"),
    ]


def _cosine() -> list[Method]:
    """The TailCalibX release's backbones: CosineCE and its class-balanced distillation (CBD)."""
    common = dict(group="cosine", stage="phase_i", kind="backbone", consumes=("images",), versus_baseline=True)
    return [
        Method("cosine_ce", "CosineCE", settings=(("model.classifier", "cosine"),), tag="cosine",
               suites=("full", "tailcalibx"), **common,
               summary="CE on the TailCalibX release's cosine classifier (weights normalised per feature over the "
                       "classes, bias, learned scale from model.scale)"),
        Method("cbd", "CBD (class-balanced distillation)", settings=(("model.classifier", "cosine"), ("distill.enabled", True)),
               teacher="cosine_ce", suites=("tailcalibx",), **common,
               summary="CosineCE student distilled from distill.teachers CosineCE teachers (cosine feature loss), "
                       "class-aware batches (the TailCalibX release's ClassAwareSampler)"),
    ]


def _decoupled() -> list[Method]:
    """Decoupled classifiers on the frozen phase I backbone, from phase II's stored pooled features."""
    common = dict(group="decoupled", stage="phase_iii", kind="decoupled", mode="offline",
                  consumes=("phase_i_model", "phase_ii_split", "phase_ii_store"), versus_baseline=True)
    return [
        Method("la_posthoc", "Post-hoc logit adjustment", generator="la_posthoc", **common,
               summary="phase I logits - tau * log(prior), tau chosen on the validation split (else decoupled.tau)"),
        Method("tau_norm", "tau-normalised classifier", generator="tau_norm", **common,
               summary="phase I classifier rows divided by their norm ** tau, no bias (tau as la_posthoc)"),
        Method("lws", "LWS (learned class scales)", generator="lws", suites=("full",), **common,
               summary="phase I classifier with per-class logit scales trained on class-balanced batches"),
        Method("crt", "cRT (re-trained classifier)", generator="crt", suites=("full", "tailcalibx"), **common,
               summary="linear classifier re-initialised and trained on class-balanced batches"),
    ]


METHODS = MethodTable([
    Method("ce", "Phase I baseline (CE)", "baseline", "phase_i", "backbone", consumes=("images",),
           suites=SUITES, summary="backbone + classifier trained with cross-entropy on the long-tailed set"),
    *_losses(),
    *_cosine(),
    *_decoupled(),
    *_fsa_mode("offline", "phase_ii_store", "feature space augmentation from phase II's stored maps and CAMs"),
    *_fsa_mode("online", "images", "feature space augmentation, maps and CAMs recomputed from augmented images "
                                   "every iteration"),
    Method("tailcalib", "TailCalib (offline)", "TailCalib", "phase_iii", "features", mode="offline",
           generator="tailcalib", consumes=("phase_i_model", "phase_ii_split", "phase_ii_store"), versus_baseline=True,
           summary="calibrated Gaussian tail features generated once from phase II's pooled features; the phase I "
                   "classifier fine-tuned on real + generated features"),
    Method("tailcalibx", "TailCalibX (online)", "TailCalib", "phase_iii", "features", mode="online",
           generator="tailcalibx", consumes=("phase_i_model", "phase_ii_split", "images"), versus_baseline=True,
           summary="TailCalib regenerated every epoch from freshly augmented images; the phase I classifier "
                   "fine-tuned on them"),
])

# arms of a suite on backbones other than CE: suite -> ((method id, backbone id), ...), in run order
OTHER_BACKBONE_ARMS: dict[str, tuple[tuple[str, str], ...]] = {
    "tailcalibx": (("tailcalib", "cosine_ce"), ("tailcalibx", "cosine_ce"), ("tailcalibx", "cbd")),
}


class _BackboneIds:
    """The ``backbone`` choices of phases II / III: the phase I method ids (utils.schema's registry)."""

    def __iter__(self) -> Iterator[str]:
        return iter(m.id for m in METHODS.stage("phase_i"))


BACKBONE_IDS = _BackboneIds()


class _GeneratorNames:
    """The ``finetune.generator`` choices, read from the table when iterated (utils.schema's registry)."""

    def __iter__(self) -> Iterator[str]:
        return iter(METHODS.generators())


GENERATOR_NAMES = _GeneratorNames()
