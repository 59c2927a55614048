"""The method table: every method the pipeline trains and the report shows, declared once.

A method is one implementation file plus one :class:`Method` entry in :data:`METHODS`. From the
table come the pipeline's steps (table order), the run folders (``Method.folder``), the report's
rows, ids and paired comparisons, the choices of ``finetune.generator`` and the phase III scripts'
``--help``. This module imports nothing heavy (implementations are named ``"module:Name"`` and
imported when a run needs them), so that ``--help`` and config checks stay fast.

Kinds (what a method trains on, hence which runner trains and tests it):

- ``backbone``: phase I, a backbone + classifier trained on images (``engine.phase_i``).
- ``maps``: phase III on CAM-layer feature maps, one :class:`fsa.generators.MapGenerator` subclass
  (``implementation``) adds the batch's generated rows (``engine.phase_iii_maps``).
- ``features``: phase III on pooled features of the frozen backbone with a linear classifier
  (``engine.phase_iii_features``; TailCalib / TailCalibX).

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
SUITES = ("fsa", "full")  # pipeline.py --suite: fsa = the chain, its controls, the post-hoc methods; full adds the rest
DEFAULT_GENERATOR = "fsa"  # its runs keep the plain folder name phase_iii_<mode>
BASELINE = "ce"
BASELINE_LOSS = "ce"  # its phase I runs keep the plain folder name phase_i


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
    suites: tuple[str, ...] = SUITES  # the pipeline suites that run it
    loss: str | None = None  # phase I: the train.loss value that selects it

    def __post_init__(self) -> None:
        if self.stage not in STAGES or self.kind not in KINDS:
            raise ValueError(f"method {self.id}: stage {self.stage!r} / kind {self.kind!r} unknown")
        if self.stage == "phase_i" and (self.kind != "backbone" or not self.loss):
            raise ValueError(f"method {self.id}: a phase I method is a backbone selected by its train.loss")
        if self.stage == "phase_iii" and (self.mode not in MODES or not self.generator or self.kind == "backbone"):
            raise ValueError(f"method {self.id}: a phase III method needs a mode, a generator and kind maps|features")
        if unknown := set(self.consumes) - set(INPUTS):
            raise ValueError(f"method {self.id}: unknown inputs {sorted(unknown)}")
        if unknown := set(self.suites) - set(SUITES):
            raise ValueError(f"method {self.id}: unknown suites {sorted(unknown)}")

    @property
    def folder(self) -> str:
        """Its run folder under checkpoints/ (``phase_iii_offline-none`` ...)."""
        if self.stage == "phase_i":
            return "phase_i" if self.loss == BASELINE_LOSS else f"phase_i-{self.loss}"
        base = f"phase_iii_{self.mode}"
        return base if self.generator == DEFAULT_GENERATOR else f"{base}-{self.generator}"

    @property
    def script(self) -> str:
        return "phase_i_train_or_test.py" if self.stage == "phase_i" else f"phase_iii_{self.mode}_train_or_test.py"

    def command(self, config: str, note: str, *extra: str) -> str:
        """The command line that makes this method's run of (config, note)."""
        if self.stage == "phase_i":
            opts = [] if self.loss == BASELINE_LOSS else ["--opts", f"train.loss={self.loss}"]
        else:
            opts = [] if self.generator == DEFAULT_GENERATOR else ["--opts", f"finetune.generator={self.generator}"]
        return script_command(self.script, config, note, *opts, *extra)

    def runner(self):
        """The function that trains / tests a phase III method: ``run(inputs, method) -> dict``."""
        return load_object(RUNNERS[self.kind])

    def load_implementation(self) -> Any:
        return load_object(self.implementation) if self.implementation else None


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

    def by_folder(self, folder: str) -> Method | None:
        return next((m for m in self._methods if m.folder == folder), None)

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

    def phase_i(self, loss: str) -> Method:
        """The phase I method that ``train.loss=loss`` trains."""
        for m in self.stage("phase_i"):
            if m.loss == loss:
                return m
        raise UserError(f"train.loss={loss} has no phase I method in the method table (engine/methods.py): add an "
                        f"entry for it. Losses with one: {', '.join(m.loss for m in self.stage('phase_i'))}.")

    def paired(self) -> list[tuple[Method, Method]]:
        """``(method, reference)`` pairs of the report: each method against its control, then against the
        phase I baseline, in table order."""
        pairs = []
        for m in self._methods:
            if m.control:
                pairs.append((m, self.get(m.control)))
            if m.versus_baseline:
                pairs.append((m, self.get(BASELINE)))
        return pairs

    def help_text(self, mode: str) -> str:
        """The phase III ``mode`` script's list of methods, for its ``--help``."""
        lines = [f"finetune.generator values of phase III {mode} (default {DEFAULT_GENERATOR}):"]
        lines += [f"  {m.generator:<11} {m.label}: {m.summary}" for m in self.stage("phase_iii") if m.mode == mode]
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
    return [
        Method("focal", "Focal loss", loss="focal", **common, summary="CE scaled by (1 - p_t)^train.focal_gamma"),
        Method("class_balanced", "Class-balanced CE", loss="class_balanced", **common,
               summary="CE weighted by the effective number of samples (train.cb_beta)"),
        Method("balanced_softmax", "Balanced softmax", loss="balanced_softmax", **common,
               summary="CE on logits + log(prior)"),
        Method("la_loss", "Logit-adjusted loss", loss="la_loss", **common,
               summary="CE on logits + train.la_tau * log(prior)"),
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
        Method("crt", "cRT (re-trained classifier)", generator="crt", suites=("full",), **common,
               summary="linear classifier re-initialised and trained on class-balanced batches"),
    ]


METHODS = MethodTable([
    Method("ce", "Phase I baseline (CE)", "baseline", "phase_i", "backbone", consumes=("images",), loss="ce",
           summary="backbone + classifier trained with cross-entropy on the long-tailed set"),
    *_losses(),
    *_decoupled(),
    *_fsa_mode("offline", "phase_ii_store", "feature space augmentation from phase II's stored maps and CAMs"),
    *_fsa_mode("online", "images", "feature space augmentation, maps and CAMs recomputed from augmented images "
                                   "every iteration"),
    Method("tailcalib", "TailCalib (offline)", "TailCalib", "phase_iii", "features", mode="offline",
           generator="tailcalib", consumes=("phase_i_model", "phase_ii_split", "phase_ii_store"),
           summary="calibrated Gaussian tail features generated once from phase II's pooled features"),
    Method("tailcalibx", "TailCalibX (online)", "TailCalib", "phase_iii", "features", mode="online",
           generator="tailcalibx", consumes=("phase_i_model", "phase_ii_split", "images"),
           summary="TailCalib regenerated every epoch from freshly augmented images"),
])


class _GeneratorNames:
    """The ``finetune.generator`` choices, read from the table when iterated (utils.schema's registry)."""

    def __iter__(self) -> Iterator[str]:
        return iter(METHODS.generators())


GENERATOR_NAMES = _GeneratorNames()
