"""The method table's types: a method (phase I or phase III), an arm (a method on a backbone), the table.
It sits beside the ``engine/methods/`` package whose family modules fill it, so that they import it without
importing the package that imports them.

A method is a class instance registered in :data:`METHODS` by the module that defines it (the family
modules of this package, or a user's own file: docs/ARCHITECTURE.md, "Adding a phase III method").
Phase I methods (:class:`PhaseIMethod`) are backbones, selected by their config ``settings``; phase III
methods (:class:`PhaseIIIMethod`) are selected by ``finetune.generator`` in their mode, declare the
config section they read (:class:`utils.fields.Section`, merged into the phase III schema) and run
themselves (``run(inputs)``), so that runners, the cost estimates, the sweep and visualize ask the
method, never its id. This module imports nothing heavy: a method imports its runner when it runs.
"""
from __future__ import annotations

import importlib
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from utils import layout
from utils.cli import script_command
from utils.errors import UserError

if TYPE_CHECKING:
    from engine.workload import Sizes, Work
    from utils.fields import Section

MODES = ("online", "offline")
# pipeline.py --suite: fsa = the chain, its controls, the post-hoc methods; full adds the other phase I
# variants and the re-trained classifiers; tailcalibx = the seven experiments of the TailCalibX release
SUITES = ("fsa", "full", "tailcalibx")
DEFAULT_GENERATOR = "fsa"  # its runs keep the plain folder name phase_iii_<mode>
BASELINE = "ce"  # its phase I runs keep the plain folder name phase_i, its phase II features/
# the phase I config keys whose values select a phase I method (absent from a method's settings: the default)
SELECTING_KEYS = ("train.loss", "train.reweight", "model.classifier", "distill.enabled")
TEACHER_SEED_STEP = 1000  # teacher k of a distilled run with seed s trains with seed s + 1000 k


@dataclass(frozen=True)
class Method:
    """What every method has: an id (report row, run folder), a label, the report's row group.

    ``control`` names the id of the paired control it is reported against, and ``versus_baseline``
    adds the paired difference to the phase I baseline (a phase III method: to its backbone's row)."""

    id: str
    label: str
    group: str
    _: KW_ONLY
    summary: str = ""
    control: str | None = None
    versus_baseline: bool = False
    suites: tuple[str, ...] = ("fsa", "full")  # the pipeline suites that run it (phase III: on the CE backbone)

    stage: ClassVar[str]
    # its checkpoint is a backbone + classifier model (visualize can explain it)
    holds_backbone: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if unknown := set(self.suites) - set(SUITES):
            raise ValueError(f"method {self.id}: unknown suites {sorted(unknown)}")

    @property
    def folder(self) -> str:
        """Its run folder under checkpoints/ on the CE backbone."""
        raise NotImplementedError

    @property
    def script(self) -> str:
        raise NotImplementedError

    def selecting_opts(self, explicit: bool = False) -> list[str]:
        """The --opts that select this method in its script."""
        raise NotImplementedError

    def command(self, config: str, note: str, *extra: str) -> str:
        """The command line that makes this method's run of (config, note) on the CE backbone."""
        opts = self.selecting_opts()
        return script_command(self.script, config, note, *(["--opts", *opts] if opts else []), *extra)


@dataclass(frozen=True, kw_only=True)
class PhaseIMethod(Method):
    """A backbone + classifier trained on the images (``engine.phase_i``).

    ``settings``: the :data:`SELECTING_KEYS` values that select it (absent: the schema default); ``opts``:
    further --opts its runs take (LDAM's fixed scale); ``teacher``: the phase I method of its teachers
    (distillation); ``tag``: the prefix of the ids of phase III arms on it (``cosine_tailcalibx``)."""

    settings: tuple[tuple[str, Any], ...] = ()
    opts: tuple[str, ...] = ()
    teacher: str | None = None
    tag: str | None = None

    stage: ClassVar[str] = "phase_i"

    def __post_init__(self) -> None:
        super().__post_init__()
        if unknown := {k for k, _ in self.settings} - set(SELECTING_KEYS):
            raise ValueError(f"method {self.id}: settings {sorted(unknown)} do not select a phase I method")

    @property
    def is_baseline(self) -> bool:
        """Whether it is the CE baseline, whose runs keep the plain folder names (phase_i, features/)."""
        return self.id == BASELINE

    @property
    def folder(self) -> str:
        return layout.phase_i_run_name(self.id, BASELINE)

    @property
    def phase_ii_folder(self) -> str:
        """The phase II run name on this backbone: ``phase_ii`` (CE, in features/) or ``phase_ii-<id>``
        (in ``features-<id>/``)."""
        return layout.phase_ii_run_name(self.id, BASELINE)

    @property
    def script(self) -> str:
        return "phase_i_train_or_test.py"

    def selecting_opts(self, explicit: bool = False) -> list[str]:
        return [*(f"{key}={_yaml_value(value)}" for key, value in self.settings), *self.opts]

    def matches(self, cfg: dict, defaults: dict) -> bool:
        """Whether phase I config ``cfg`` selects this method (``defaults``: SELECTING_KEYS -> default)."""
        chosen = dict(self.settings)
        return all(_dotted(cfg, key) == chosen.get(key, defaults[key]) for key in SELECTING_KEYS)


@dataclass(frozen=True, kw_only=True)
class PhaseIIIMethod(Method):
    """A method trained on a frozen (or partly frozen) phase I backbone, selected by
    ``finetune.generator=<generator>`` in phase III ``mode``.

    A subclass says what the method reads (:attr:`reads_store`), how it runs (:meth:`run`), what it
    costs (:meth:`work`) and whether its checkpoint holds a backbone Grad-CAM can explain; ``section``
    is the config section of its own hyper-parameters (shared by methods of one family), merged into
    the phase III schema from the table."""

    mode: str
    generator: str
    section: "Section | None" = None

    stage: ClassVar[str] = "phase_iii"
    # "module:function" that trains it, run(inputs, method) -> results dict; named, not imported, so that the
    # table stays light and the runners may import the table
    runner: ClassVar[str]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES or not self.generator:
            raise ValueError(f"method {self.id}: a phase III method needs a mode ({' / '.join(MODES)}) and a generator")

    @property
    def reads_store(self) -> bool:
        """Whether it reads phase II's feature store (else only its split and confusing classes)."""
        raise NotImplementedError

    @property
    def folder(self) -> str:
        return layout.phase_iii_run_name(self.mode, self.generator, DEFAULT_GENERATOR)

    @property
    def script(self) -> str:
        return f"phase_iii_{self.mode}_train_or_test.py"

    def selecting_opts(self, explicit: bool = False) -> list[str]:
        """Its generator, which ``explicit`` states even when it is the default."""
        return [] if self.generator == DEFAULT_GENERATOR and not explicit else [f"finetune.generator={self.generator}"]

    def reads(self, section: str) -> bool:
        """Whether config section ``section`` changes its runs (the sweep collapses keys it does not read)."""
        return self.section is not None and self.section.name == section

    def options(self, cfg: dict) -> dict:
        """Its own hyper-parameters from a resolved phase III config (empty without a section)."""
        return dict(cfg[self.section.name]) if self.section is not None else {}

    def run(self, inputs: Any) -> dict:
        """Train it (or, with ``phase: test``, evaluate a checkpoint) on the opened phase III inputs
        (``engine.phase_iii.PhaseIIIInputs``; not imported: the phase III runner imports this table)."""
        return load_object(self.runner)(inputs, self)

    def work(self, cfg: dict, sizes: "Sizes") -> "Work":
        """The backbone images it trains on / forwards under ``cfg`` (:mod:`engine.workload`)."""
        raise NotImplementedError


def _yaml_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _dotted(cfg: dict, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@dataclass(frozen=True)
class Arm:
    """A method trained on a backbone (a phase I method; for a phase I method, itself): one report row,
    one run folder."""

    method: Method
    backbone: PhaseIMethod

    @property
    def on_baseline(self) -> bool:
        return isinstance(self.method, PhaseIMethod) or self.backbone.is_baseline

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
        return layout.arm_run_name(self.method.folder, self.backbone.id, BASELINE)

    @property
    def phase_ii(self) -> str:
        """The phase II run it reads (phase III arms)."""
        return self.backbone.phase_ii_folder

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

    def __init__(self) -> None:
        self._methods: list[Method] = []
        # suite -> ((method id, backbone id), ...): arms of a suite on backbones other than CE, in run order
        self._other_backbone_arms: dict[str, list[tuple[str, str]]] = {}

    def register(self, method: Method) -> Method:
        """Add a method (at the end of the table); ids, folders and (mode, generator) must be new, and a
        phase III method's config section must not clash with another's."""
        clash = [m.id for m in self._methods if m.id == method.id or m.folder == method.folder]
        if clash:
            raise ValueError(f"method {method.id} clashes with {clash}")
        section = getattr(method, "section", None)
        if section is not None and any(s.name == section.name and s is not section for s in self.sections()):
            raise ValueError(f"method {method.id}: config section '{section.name}' is another family's")
        self._methods.append(method)
        return method

    def unregister(self, method_id: str) -> None:
        self._methods = [m for m in self._methods if m.id != method_id]

    def add_other_backbone_arm(self, suite: str, method_id: str, backbone_id: str) -> None:
        """Make ``suite`` also train ``method_id`` on phase I method ``backbone_id`` (after its CE arms)."""
        self._other_backbone_arms.setdefault(suite, []).append((method_id, backbone_id))

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
        return Arm(method, method if isinstance(method, PhaseIMethod) else self.get(backbone_id))

    def arms(self) -> list[Arm]:
        """Every arm, in report order: the phase I methods, then each phase III method on each backbone
        (CE first)."""
        backbones = self.backbones()
        return [*(Arm(b, b) for b in backbones), *(Arm(m, b) for b in backbones for m in self.phase_iii_methods())]

    def suite(self, suite: str) -> list[Arm]:
        """The arms a pipeline suite trains: its methods on CE (table order), then its arms on other
        backbones."""
        if suite not in SUITES:
            raise UserError(f"--suite {suite}: choose one of {', '.join(SUITES)}.")
        arms = [self.arm(m.id) for m in self._methods if suite in m.suites]
        return arms + [self.arm(m, b) for m, b in self._other_backbone_arms.get(suite, ())]

    def backbones(self) -> list[PhaseIMethod]:
        return [m for m in self._methods if isinstance(m, PhaseIMethod)]

    def phase_iii_methods(self) -> list[PhaseIIIMethod]:
        return [m for m in self._methods if isinstance(m, PhaseIIIMethod)]

    def sections(self) -> list["Section"]:
        """The phase III methods' own config sections, each once, in table order."""
        found: list = []
        for m in self.phase_iii_methods():
            if m.section is not None and all(s is not m.section for s in found):
                found.append(m.section)
        return found

    def generators(self, mode: str | None = None) -> list[str]:
        """Every ``finetune.generator`` value (of one phase III mode), in table order."""
        names = [m.generator for m in self.phase_iii_methods() if mode is None or m.mode == mode]
        return list(dict.fromkeys(names))

    def phase_iii(self, mode: str, generator: str, config: str = "NAME", note: str = "default") -> PhaseIIIMethod:
        """The method that ``finetune.generator=generator`` selects in phase III ``mode``; a UserError
        naming the right script when the generator runs in the other mode only."""
        for m in self.phase_iii_methods():
            if m.mode == mode and m.generator == generator:
                return m
        others = [m for m in self.phase_iii_methods() if m.generator == generator]
        if not others:
            raise UserError(f"Unknown finetune.generator '{generator}'. Available: {', '.join(self.generators())} "
                            f"(phase III {mode}: {', '.join(self.generators(mode))}).")
        other = others[0]
        raise UserError(
            f"finetune.generator={generator} ({other.label}) runs in phase III {other.mode} mode only: "
            f"{other.command(config, note)}. The {mode} script's generators: {', '.join(self.generators(mode))}.")

    def phase_i(self, cfg: dict) -> PhaseIMethod:
        """The phase I method that phase I config ``cfg`` trains (by its SELECTING_KEYS values)."""
        from utils.fields import defaults
        from utils.schema import PHASE_I

        default = {key: _dotted(defaults(PHASE_I), key) for key in SELECTING_KEYS}
        for m in self.backbones():
            if m.matches(cfg, default):
                return m
        given = ", ".join(f"{key}={_yaml_value(_dotted(cfg, key))}" for key in SELECTING_KEYS)
        known = "; ".join(f"{m.id}: {' '.join(m.selecting_opts()) or '(defaults)'}" for m in self.backbones())
        raise UserError(f"No phase I method of the method table (engine/methods/) trains {given}. The phase I methods "
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
                reference = self.arm(BASELINE) if isinstance(m, PhaseIMethod) else self.arm(b.id)
                pairs.append((arm, reference))
        return pairs


METHODS = MethodTable()  # filled by the family modules, in table order (engine/methods/__init__.py)


class _BackboneIds:
    """The ``backbone`` choices of phases II / III: the phase I method ids (utils.schema's registry)."""

    def __iter__(self) -> Iterator[str]:
        return iter(m.id for m in METHODS.backbones())


class _GeneratorNames:
    """The ``finetune.generator`` choices, read from the table when iterated (utils.schema's registry)."""

    def __iter__(self) -> Iterator[str]:
        return iter(METHODS.generators())


BACKBONE_IDS = _BackboneIds()
GENERATOR_NAMES = _GeneratorNames()
