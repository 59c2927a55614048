"""The plan of a sweep: everything it asks for checked and its runs laid out, before anything runs or is
written (:func:`plan`). Its arms (:class:`Role`) are the swept method, its control (``--control``, default
the method's paired control ``Method.control``; ``none``: no control) on the same grid, and the --against
references, not swept; each arm's runs are listed per point and seed (:class:`ArmRuns`, :class:`Run`). Phase
I and II are trained once per seed and per distinct value of the grid's phase I / II keys, never per point:
a point's phase III runs read, through ``--upstream-note`` (``RunSpec.upstream_note``, recorded in their
results.json as ``upstream_note``), the phase I run and phase II outputs of the note of its phase I / II
keys alone -- the seed's base note ``seedN`` (the pipeline's) when the grid has none. A grid over phase III
keys only (finetune.lr, finetune.iterations, ...) therefore fine-tunes every point on one backbone per seed,
the one the pipeline's ``seedN`` runs use; a grid touching phase I / II keys trains each distinct phase I /
II setting under its own note and its phase III points on it. A grid key the swept method does not read,
and a config without a validation split (nothing to choose a point on), are refused.
"""
from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass, field, replace

from app.steps import Step, check_configs_choose_nothing, config_sources, phase_i_steps, route_opts
from app.sweep_grid import GridKey, Notes, Point, applies, parse_grid, reading_methods, restrict
from engine.methods import BASELINE, METHODS, Arm, Method
from utils.config import CONFIG_PHASES, config_name, load_config
from utils.errors import UserError

__all__ = ["SweepSpec", "Role", "Run", "ArmRuns", "Plan", "plan"]


@dataclass(frozen=True)
class SweepSpec:
    """What ``sweep.py`` asks for (see its --help)."""

    config: str
    method: str
    grid: tuple[str, ...]
    seeds: tuple[int, ...] | None = None
    control: str | None = None       # None: the method's own paired control; "none": no control
    against: tuple[str, ...] = ()
    opts: tuple[str, ...] = ()
    note: str | None = None
    device: str = "auto"
    dry_run: bool = False

    def command(self) -> str:
        parts = ["python", "sweep.py", "--config", self.config, "--method", self.method, "--grid", *self.grid]
        parts += ["--seeds", *map(str, self.seeds)] if self.seeds else []
        parts += ["--control", self.control] if self.control else []
        parts += ["--against", *self.against] if self.against else []
        parts += ["--note", self.note] if self.note else []
        parts += ["--opts", *self.opts] if self.opts else []
        return shlex.join(parts)


@dataclass(frozen=True)
class Role:
    """An arm of the sweep: the swept method, its control, or an --against reference (not swept)."""

    role: str                    # method | control | against
    arm: Arm
    keys: tuple[str, ...] = ()   # the grid keys that apply to it

    @property
    def id(self) -> str:
        return self.arm.id


@dataclass
class Run:
    """One step at one note: a phase III step reads the phase I / II of ``upstream`` when that is not its note."""

    step: Step
    note: str
    opts: dict[str, list[str]]       # per config phase: seed=N, the user's --opts, the point's grid items
    keys: dict[str, list[str]]       # per config phase: the user's --opts and the grid items (checked against runs)
    upstream: str | None = None

    @property
    def ident(self) -> tuple[str, str, str]:
        return self.step.kind, self.step.folder(), self.step.note(self.note)


@dataclass
class ArmRuns:
    """The runs of one role: for each of its points (its own, after collapsing), the note of each seed."""

    role: Role
    points: list[Point] = field(default_factory=list)
    notes: dict[Point, dict[str, str]] = field(default_factory=dict)       # point -> pair key -> note
    upstream: dict[Point, dict[str, str]] = field(default_factory=dict)    # point -> pair key -> upstream note


@dataclass
class Plan:
    name: str
    sources: dict[str, str]
    grid: list[GridKey]
    points: list[Point]
    roles: list[Role]
    arms: list[ArmRuns]
    runs: list[Run]
    notes: Notes

    @property
    def swept(self) -> list[ArmRuns]:
        return [a for a in self.arms if a.role.role != "against"]


def _arm_steps(arm: Arm, teachers: int) -> list[Step]:
    """The steps that make ``arm``'s run at a note, without the phase I / II a phase III arm reads (as
    ``app.steps.plan_steps`` labels them)."""
    if arm.method.stage == "phase_iii":
        return [Step("phase_iii", f"phase III {arm.label}", arm)]
    return phase_i_steps(arm, teachers)


UPSTREAM_STEPS = (Step("phase_i", "phase I", METHODS.arm(BASELINE)), Step("phase_ii", "phase II", METHODS.arm(BASELINE)))


def _route(items: list[str], grid: list[GridKey]) -> dict[str, list[str]]:
    by_key = {k.key: k for k in grid}
    return {phase: [item for item in items if phase in by_key[item.split("=", 1)[0]].phases] for phase in CONFIG_PHASES}


def plan(spec: SweepSpec) -> Plan:
    """Check everything a sweep asks for and lay out its runs; nothing is run or written."""
    sources = config_sources(spec.config)
    name = config_name(sources["phase_i"])
    seeds = list(spec.seeds) if spec.seeds else None
    user = route_opts(list(spec.opts), seeded=bool(seeds))
    roles = _roles(spec)
    grid = parse_grid(list(spec.grid), sources, list(spec.opts))
    roles = _with_keys(roles, grid)
    method = roles[0]
    if missing := [k.key for k in grid if k.key not in method.keys]:
        raise UserError(f"--grid {', '.join(missing)}: {'it is' if len(missing) == 1 else 'they are'} not read by "
                        f"{method.id} ({method.arm.label}), so its points would be the same run. "
                        + " ".join(f"{k.key} is read by: {reading_methods(k)}." for k in grid if k.key in missing)
                        + " Drop it from --grid or sweep a method that reads it.")
    notes = Notes(spec.note, seeds, {k.key: k.label for k in grid})
    seed_opts = {s: ([f"seed={s}"] if s is not None else []) for s in notes.seed_keys()}
    points: list[Point] = [tuple(zip((k.key for k in grid), values))
                           for values in itertools.product(*(k.values for k in grid))]
    cfgs = _check_configs(sources, name, seed_opts[notes.seed_keys()[0]], user, points, grid)
    teachers = cfgs["phase_i"]["distill"]["teachers"]

    runs: dict[tuple[str, str, str], Run] = {}

    def add(step: Step, note: str, seed: int | None, items: list[str], upstream: str | None = None) -> None:
        routed = _route(items, grid)
        run = Run(step, note, {p: [*seed_opts[seed], *user[p], *routed[p]] for p in CONFIG_PHASES},
                  {p: [*user[p], *routed[p]] for p in CONFIG_PHASES}, upstream)
        if run.ident in runs and runs[run.ident].opts != run.opts:  # a note is one point: cannot happen
            raise AssertionError(f"two settings for {run.ident}")
        runs.setdefault(run.ident, run)

    def items_of(point: Point) -> list[str]:
        return [f"{k}={v}" for k, v in point]

    arms = [ArmRuns(role) for role in roles]
    upstream_keys = {k.key for k in grid if k.upstream}
    for seed in notes.seed_keys():
        pair = Notes.pair_key(seed)
        for point in points:
            for arm_runs in arms:
                role = arm_runs.role
                own = restrict(point, set(role.keys))
                if own not in arm_runs.notes:
                    arm_runs.points.append(own)
                    arm_runs.notes[own], arm_runs.upstream[own] = {}, {}
                if pair in arm_runs.notes[own]:
                    continue
                note = notes.of(own, seed)
                arm_runs.notes[own][pair] = note
                if role.arm.method.stage == "phase_iii":
                    up = restrict(own, upstream_keys)
                    up_note = notes.of(up, seed)
                    for step in UPSTREAM_STEPS:
                        add(step, up_note, seed, items_of(up))
                    arm_runs.upstream[own][pair] = up_note
                    for step in _arm_steps(role.arm, teachers):
                        add(step, note, seed, items_of(own), upstream=None if up_note == note else up_note)
                else:
                    for step in _arm_steps(role.arm, teachers):
                        add(step, note, seed, items_of(own))
    return Plan(name, sources, grid, points, roles, arms, list(runs.values()), notes)


def _roles(spec: SweepSpec) -> list[Role]:
    """The method, its control (``--control``, default the method's ``control``; ``none``: no control) and the
    --against arms; a UserError for an unknown or repeated id. Their applying keys are set by ``with_keys``."""
    ids = [m.id for m in METHODS]

    def get(method_id: str, flag: str) -> Method:
        try:
            return METHODS.get(method_id)
        except KeyError:
            raise UserError(f"{flag} {method_id}: no such method in the method table (engine/methods/). The ids: "
                            f"{', '.join(ids)}.") from None

    method = get(spec.method, "--method")
    roles = [Role("method", METHODS.arm(method.id))]
    control_id = method.control if spec.control is None else (None if spec.control == "none" else spec.control)
    if control_id is not None:
        control = get(control_id, "--control")
        if control is method:
            raise UserError(f"--control {control.id} is the swept method itself; name its control, or --control none.")
        roles.append(Role("control", METHODS.arm(control.id)))
    for other in spec.against:
        against = get(other, "--against")
        taken = next((r.role for r in roles if r.arm.method is against), None)
        if taken:
            raise UserError(f"--against {against.id}: it is already the sweep's {taken}.")
        roles.append(Role("against", METHODS.arm(against.id)))
    return roles


def _with_keys(roles: list[Role], grid: list[GridKey]) -> list[Role]:
    return [replace(r, keys=tuple(k.key for k in grid if applies(r.arm.method, k)) if r.role != "against" else ())
            for r in roles]


def _check_configs(sources: dict[str, str], name: str, seeded: list[str], user: dict[str, list[str]],
                   points: list[Point], grid: list[GridKey]) -> dict[str, dict]:
    """Every point's config of every phase loads (values and their combinations valid); the chain trains CE
    (``app.steps.check_configs_choose_nothing``) and has a validation split. The first point's configs."""
    first = None
    for point in points:
        routed = _route([f"{k}={v}" for k, v in point], grid)
        cfgs = {phase: load_config(sources[phase], phase, [*seeded, *user[phase], *routed[phase]]) for phase in CONFIG_PHASES}
        first = first or cfgs
    for phase in ("phase_i", "phase_iii"):
        if first[phase]["phase"] != "train":
            raise UserError(f"the {phase} config of '{name}' sets phase: {first[phase]['phase']}, but a sweep trains.")
    check_configs_choose_nothing(first, name)
    if first["phase_i"]["dataset"]["val"]["source"] == "none":
        raise UserError(
            f"config '{name}' has no validation split (dataset.val.source: none), so a sweep has nothing to choose a "
            f"point on: choosing on the test numbers would report them after selecting on them. Hold out a validation "
            f"split: --opts dataset.val.source=train (a stratified share dataset.val.fraction, default 0.1, of the "
            f"long-tailed training set) or dataset.val.source=test (carved from the balanced test set), or set "
            f"dataset.val in configs/phase_i/{name}.yaml. Runs made without it cannot be reused: with --opts, give the "
            f"sweep its own base notes with --note NAME.")
    return first
