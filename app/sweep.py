"""Honest hyper-parameter sweeps: chosen on validation, reported once on test, the control on the same budget.

    python sweep.py --config NAME --method fsa_offline --grid finetune.lr=0.001,0.01 finetune.iterations=200,400 \\
        --seeds 0 1 2 --against crt la_posthoc

Every grid point (the product of the ``--grid`` values, in the order given) runs per seed as its own note,
``sweep-<point>-seedN`` (``NOTE-sweep-<point>-seedN`` with ``--note NOTE``; without ``--seeds`` the note
``sweep-<point>``), e.g. ``sweep-lr0.001_iterations200-seed0``: the method's run and its control's
(``--control``, default the method's paired control ``Method.control``). Each step goes through the
pipeline's own step logic (``app.pipeline.step_state`` / ``step_opts`` / ``skip_notes`` / its runners):
a finished run is skipped, an interrupted one resumed, a stale one started again; ``--opts`` that an
existing run of a note would ignore is refused (``pipeline.check_existing_runs``).

Upstream runs. Phase I and II are trained once per seed and per distinct value of the grid's phase I / II
keys, never per point: a point's phase III runs read, through ``--upstream-note`` (``RunSpec.upstream_note``,
recorded in their results.json as ``upstream_note``), the phase I run and phase II outputs of the note of
its phase I / II keys alone -- the seed's base note ``seedN`` (the pipeline's) when the grid has none. A grid
over phase III keys only (finetune.lr, finetune.iterations, ...) therefore fine-tunes every point on one
backbone per seed, the one the pipeline's ``seedN`` runs use; a grid touching phase I / II keys trains each
distinct phase I / II setting under its own note and its phase III points on it.

A grid key that an arm does not read (a phase II / III key for a phase I method, ``tailcalib.*`` for all but
the TailCalib methods, ...: :func:`applies`) collapses for that arm: it runs once for all the key's values,
said before the sweep starts. A key that the swept method itself does not read is refused.

Selection. Each arm's point is the one with the best mean over the seeds of its runs' validation score,
``checkpoint_selection.val_mean_class_acc`` of results.json (mean class accuracy on the validation split, the
score every run already selects its checkpoint by); ties go to the earlier point. A config without a
validation split is refused: there is nothing to select on. The report (``reports/<config>/<sweep folder>/``:
sweep.md, sweep.json) shows every point's validation score, the test numbers of the chosen points only (the
others' stay in their results.json), and the paired difference chosen method - chosen control (and - each
``--against`` arm: its own run on the base notes) per seed with the 95% t-interval of ``analysis.report``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from app import pipeline
from engine.methods import BASELINE, METHODS, SELECTING_KEYS, Arm, Method, PhaseIMethod
from app.pipeline import Step
from utils import distributed
from utils.config import (CONFIG_PHASES, close_keys, config_name, config_text, did_you_mean, get_dotted, load_config,
                          parse_opts)
from utils.errors import UserError
from utils.json_files import load_results, write_json_atomic
from utils.layout import MAX_NAME_LENGTH, Layout, RunPaths, check_run_name, output_root
from utils.schema import schema_keys

__all__ = ["SweepSpec", "GridKey", "parse_grid", "applies", "plan", "select", "build_report", "run", "sweep_folder"]

PREFIX = "[sweep]"
SWEEP_FORMAT = "fsa-lt-sweep/1"
SELECTION_KEY = "val_mean_class_acc"  # in checkpoint_selection (engine.recorder.SELECTION_METRIC)
UPSTREAM_PHASES = ("phase_i", "phase_ii")
# config sections that only some phase III methods read: section -> whether a method reads it. A grid key of
# such a section collapses for the other arms. Only what the code shows for certain: a wrong entry would
# give an arm one point where the key changes its runs, a missing one only repeats identical runs.
# keys the sweep (or the pipeline under it) sets itself, or that change the images a point is scored on
_DATA_KEYS_ALLOWED = ("dataset.augment", "dataset.flip")  # training augmentation only


def say(message: str) -> None:
    if distributed.first_process():
        print(f"{PREFIX} {message}", flush=True)


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridKey:
    key: str
    values: tuple[str, ...]      # as typed
    phases: tuple[str, ...]      # the config phases whose schema has the key
    label: str = ""              # its name in notes (the last part of the key, unless two keys share it)

    @property
    def upstream(self) -> bool:
        """Whether it changes phase I or phase II (then every phase III arm reads it through its backbone)."""
        return any(phase in UPSTREAM_PHASES for phase in self.phases)

    def items(self) -> list[str]:
        return [f"{self.key}={value}" for value in self.values]


def _split_values(text: str) -> list[str]:
    """``a,b,[1,2]`` -> ``['a', 'b', '[1,2]']``: commas inside brackets or quotes belong to the value."""
    values, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    return values + [current.strip()]


def _phases_of(key: str) -> list[str]:
    return [phase for phase in CONFIG_PHASES if key in schema_keys(phase)]


def _refuse_key(key: str) -> None:
    """A UserError for a grid key the sweep sets itself or that would change what the points are scored on."""
    if key == "seed":
        raise UserError("--grid seed: --seeds sets it; a sweep runs every point on the same seeds (--seeds 0 1 2) and "
                        "chooses by the mean over them. Drop seed from --grid.")
    if key == "finetune.generator" or key == "backbone" or key in SELECTING_KEYS:
        raise UserError(f"--grid {key}: it chooses the method, which --method (and --control) name; a sweep varies "
                        f"one method's settings. Drop {key} from --grid and pass the method id as --method "
                        f"(python -c \"from engine.methods import METHODS; print([m.id for m in METHODS])\").")
    if key == "phase":
        raise UserError("--grid phase: a sweep trains; drop phase from --grid.")
    if key.startswith("dataset.") and key not in _DATA_KEYS_ALLOWED:
        raise UserError(f"--grid {key}: the points must be trained on the same data and chosen on the same validation "
                        f"images, so a sweep does not vary dataset settings (of the dataset section only "
                        f"{', '.join(_DATA_KEYS_ALLOWED)}, which change the training augmentation). Set {key} with "
                        f"--opts, or sweep each dataset setting as its own sweep.")


def parse_grid(items: list[str], sources: dict[str, str], opts: list[str]) -> list[GridKey]:
    """The ``--grid KEY=V1,V2 ...`` of a sweep, checked: known keys of some phase's config (a leaf, not a
    section), none the sweep sets itself or that changes the data, each key once, not also in --opts, two or
    more distinct values (after the schema's coercion), each value valid for its phases."""
    if not items:
        raise UserError("--grid needs at least one KEY=V1,V2 (e.g. --grid finetune.lr=0.001,0.01).")
    opt_keys = {item.split("=", 1)[0].strip() for item in opts}
    keys: list[GridKey] = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--grid entry {item!r} is not of the form KEY=V1,V2 (e.g. finetune.lr=0.001,0.01).")
        key, raw = (part.strip() for part in item.split("=", 1))
        _refuse_key(key)
        phases = _phases_of(key)
        if not phases:
            known = sorted({k for phase in CONFIG_PHASES for k in schema_keys(phase)})
            sections = [k for k in known if k.startswith(f"{key}.")]
            hint = (f" It is a section: sweep one of its keys ({', '.join(sections[:6])}{', ...' if len(sections) > 6 else ''})."
                    if sections else did_you_mean(close_keys(key, known)))
            raise UserError(f"--grid {key}: no phase's config has this key.{hint} Every key: python pipeline.py --config "
                            f"NAME --print-config.")
        if any(k.key == key for k in keys):
            raise UserError(f"--grid {key} is given twice; give each key once with all its values (KEY=V1,V2,V3).")
        if key in opt_keys:
            raise UserError(f"--grid {key} is also set by --opts; a key is either swept (--grid) or fixed (--opts).")
        values = _split_values(raw)
        if any(not v for v in values):
            raise UserError(f"--grid {item}: an empty value; write the values separated by commas, e.g. {key}=0.001,0.01.")
        if len(values) < 2:
            raise UserError(f"--grid {item}: one value is no sweep. Give two or more values ({key}=V1,V2), or fix the "
                            f"key with --opts {key}={values[0]}.")
        resolved = []
        for value in values:
            parse_opts([f"{key}={value}"])  # its YAML syntax, with the phases' own message
            got = [get_dotted(load_config(sources[phase], phase, [f"{key}={value}"]), key) for phase in phases]
            resolved.append(json.dumps(got, sort_keys=True, default=str))
        if len(set(resolved)) < len(resolved):
            twice = [v for v, r in zip(values, resolved) if resolved.count(r) > 1]
            raise UserError(f"--grid {key}: the values {', '.join(twice)} are the same setting; give each value once.")
        keys.append(GridKey(key, tuple(values), tuple(phases)))
    leaves = [k.key.rsplit(".", 1)[-1] for k in keys]
    return [replace(k, label=leaf if leaves.count(leaf) == 1 else k.key) for k, leaf in zip(keys, leaves)]


def applies(method: Method, key: GridKey) -> bool:
    """Whether runs of ``method`` (on the CE backbone) read grid key ``key``: a phase I method reads phase I
    keys only; a phase III method reads every phase I / II key (through its backbone) and the phase III keys
    shared by all, and of the method sections only its own (``PhaseIIIMethod.reads``): a key of another
    method's section collapses for it."""
    if isinstance(method, PhaseIMethod):
        return "phase_i" in key.phases
    if key.upstream:
        return True
    section = key.key.split(".", 1)[0]
    return method.reads(section) or section not in {s.name for s in METHODS.sections()}


def _reading_methods(key: GridKey) -> str:
    return ", ".join(m.id for m in METHODS if applies(m, key)) or "none"


# ------------------------------------------------------------------------------------------------
# Points and notes
# ------------------------------------------------------------------------------------------------
Point = tuple[tuple[str, str], ...]  # ((key, value as typed), ...) in grid order

_VALUE_CHARS = re.compile(r"[A-Za-z0-9.-]+")
POINT_ID_LENGTH = 60  # characters of a readable point id before it is shortened to a prefix and a hash


def _digest(data: object, length: int = 8) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]


def point_text(point: Point) -> str:
    return ", ".join(f"{k}={v}" for k, v in point) or "(no grid key applies)"


@dataclass
class Notes:
    """The notes of a sweep: the base note of each seed, and each point's (over the keys that apply)."""

    note: str | None
    seeds: list[int] | None
    labels: dict[str, str]

    def seed_keys(self) -> list[int | None]:
        return list(self.seeds) if self.seeds else [None]

    @staticmethod
    def pair_key(seed: int | None) -> str:
        """The name of a seed in per-seed tables and paired differences."""
        return "default" if seed is None else f"seed{seed}"

    def base(self, seed: int | None) -> str:
        """The pipeline's note of a seed: ``seedN`` (``NOTE-seedN``), or ``NOTE`` / ``default`` without seeds."""
        if seed is None:
            return check_run_name(self.note or "default", "--note")
        return check_run_name(f"{self.note}-seed{seed}" if self.note else f"seed{seed}", "--note")

    def point_id(self, point: Point) -> str:
        """``lr0.001_iterations200``: each key's label and value; a value with other characters than letters,
        digits, '.' and '-', or an id past POINT_ID_LENGTH characters, gets a hash of the point."""
        parts, exact = [], True
        for key, value in point:
            clean = "-".join(_VALUE_CHARS.findall(value)).strip(".-") or "x"
            exact = exact and clean == value
            parts.append(f"{self.labels[key]}{clean}")
        text = "_".join(parts)
        if exact and len(text) <= POINT_ID_LENGTH:
            return text
        return f"{text[:POINT_ID_LENGTH - 9].rstrip('._-')}-{_digest(point)}"

    def of(self, point: Point, seed: int | None) -> str:
        """The note of a point's runs for one seed (the base note for the empty point)."""
        if not point:
            return self.base(seed)
        core = f"{self.note}-sweep-{self.point_id(point)}" if self.note else f"sweep-{self.point_id(point)}"
        return check_run_name(core if seed is None else f"{core}-seed{seed}", "a sweep point's note")


def _restrict(point: Point, keys: set[str]) -> Point:
    return tuple((k, v) for k, v in point if k in keys)


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
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
    ``pipeline.plan_steps`` labels them)."""
    if arm.method.stage == "phase_iii":
        return [Step("phase_iii", f"phase III {arm.label}", arm)]
    steps = []
    if arm.method.teacher:
        teacher = METHODS.arm(arm.method.teacher)
        steps += [Step("phase_i", f"phase I {teacher.label} teacher {k}", teacher, teacher=k)
                  for k in range(1, teachers + 1)]
    return steps + [Step("phase_i", "phase I" if arm.backbone.is_baseline else f"phase I {arm.label}", arm)]


UPSTREAM_STEPS = (Step("phase_i", "phase I", METHODS.arm(BASELINE)), Step("phase_ii", "phase II", METHODS.arm(BASELINE)))


def _route(items: list[str], grid: list[GridKey]) -> dict[str, list[str]]:
    by_key = {k.key: k for k in grid}
    return {phase: [item for item in items if phase in by_key[item.split("=", 1)[0]].phases] for phase in CONFIG_PHASES}


def plan(spec: "SweepSpec") -> Plan:
    """Check everything a sweep asks for and lay out its runs; nothing is run or written."""
    sources = pipeline.config_sources(spec.config)
    name = config_name(sources["phase_i"])
    seeds = list(spec.seeds) if spec.seeds else None
    user = pipeline.route_opts(list(spec.opts), seeded=bool(seeds))
    roles = _roles(spec)
    grid = parse_grid(list(spec.grid), sources, list(spec.opts))
    roles = _with_keys(roles, grid)
    method = roles[0]
    if missing := [k.key for k in grid if k.key not in method.keys]:
        raise UserError(f"--grid {', '.join(missing)}: {'it is' if len(missing) == 1 else 'they are'} not read by "
                        f"{method.id} ({method.arm.label}), so its points would be the same run. "
                        + " ".join(f"{k.key} is read by: {_reading_methods(k)}." for k in grid if k.key in missing)
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
                own = _restrict(point, set(role.keys))
                if own not in arm_runs.notes:
                    arm_runs.points.append(own)
                    arm_runs.notes[own], arm_runs.upstream[own] = {}, {}
                if pair in arm_runs.notes[own]:
                    continue
                note = notes.of(own, seed)
                arm_runs.notes[own][pair] = note
                if role.arm.method.stage == "phase_iii":
                    up = _restrict(own, upstream_keys)
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


def _roles(spec: "SweepSpec") -> list[Role]:
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
    (``pipeline._check_configs_choose_nothing``) and has a validation split. The first point's configs."""
    first = None
    for point in points:
        routed = _route([f"{k}={v}" for k, v in point], grid)
        cfgs = {phase: load_config(sources[phase], phase, [*seeded, *user[phase], *routed[phase]]) for phase in CONFIG_PHASES}
        first = first or cfgs
    for phase in ("phase_i", "phase_iii"):
        if first[phase]["phase"] != "train":
            raise UserError(f"the {phase} config of '{name}' sets phase: {first[phase]['phase']}, but a sweep trains.")
    pipeline._check_configs_choose_nothing(first, name)
    if first["phase_i"]["dataset"]["val"]["source"] == "none":
        raise UserError(
            f"config '{name}' has no validation split (dataset.val.source: none), so a sweep has nothing to choose a "
            f"point on: choosing on the test numbers would report them after selecting on them. Hold out a validation "
            f"split: --opts dataset.val.source=train (a stratified share dataset.val.fraction, default 0.1, of the "
            f"long-tailed training set) or dataset.val.source=test (carved from the balanced test set), or set "
            f"dataset.val in configs/phase_i/{name}.yaml. Runs made without it cannot be reused: with --opts, give the "
            f"sweep its own base notes with --note NAME.")
    return first


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
def _check_existing(plan_: Plan) -> None:
    """``pipeline.check_existing_runs`` note by note: --opts or grid values that an existing run would ignore."""
    by_note: dict[str, list[Run]] = {}
    for run in plan_.runs:
        by_note.setdefault(run.note, []).append(run)
    for note, runs in by_note.items():
        pipeline.check_existing_runs([r.step for r in runs], plan_.sources, plan_.name, [(note, runs[0].opts)],
                                     runs[0].keys)


def _check_upstream_split(plan_: Plan) -> None:
    """An existing phase I run that phase III points read must have a validation split (a run made before
    the config had one would select nothing)."""
    bad = []
    for run in plan_.runs:
        if run.step.kind != "phase_i" or run.step.teacher:
            continue
        saved = RunPaths(run.step.folder(), plan_.name, run.note).checkpoint_dir / "config.yaml"
        if saved.is_file():
            try:
                cfg = load_config(str(saved), "phase_i", saved=True)
            except UserError:
                continue  # the run's own step says why
            if cfg["dataset"]["val"]["source"] == "none":
                bad.append(str(saved.parent))
    if bad:
        raise UserError(f"phase I run(s) {', '.join(bad)} were made without a validation split (their config.yaml: "
                        f"dataset.val.source: none), so nothing built on them could be chosen on validation. Give the "
                        f"sweep its own notes with --note NAME (its base notes become NAME-seedN), or rerun those runs "
                        f"with a validation split (--overwrite).")


def _sha256(path: Path, cache: dict[Path, str]) -> str:
    from engine.artifacts import sha256_file

    if path not in cache:
        cache[path] = sha256_file(path)
    return cache[path]


def check_sources(plan_: Plan) -> None:
    """Every finished phase III run of the swept arms read the phase I / II it should: its results.json's
    ``upstream_note`` is the note the plan gives it (a run of that note made otherwise, e.g. by hand, would
    be skipped as finished), and the phase I checkpoint it recorded (``phase_i_checkpoint_sha256``) has the
    content the upstream's best_model.pt has now (not retrained since). A UserError naming each stale run
    and the command that reruns it."""
    stale, cache = [], {}
    for run in plan_.runs:
        if run.step.kind != "phase_iii":
            continue
        results = _results(RunPaths(run.step.folder(), plan_.name, run.note).results)
        if not results or not results.get("finished"):
            continue
        wanted = run.upstream or run.note
        got = results.get("upstream_note", run.note)
        best = RunPaths(run.step.arm.backbone.folder, plan_.name, wanted).best
        why = None
        if got != wanted:
            why = f"it read the phase I / II of note '{got}', the sweep's point reads note '{wanted}'"
        elif best.is_file() and results.get("phase_i_checkpoint_sha256") not in (None, _sha256(best, cache)):
            why = f"its phase I checkpoint has changed since it was trained ({best}: retrained or edited)"
        if why:
            args = pipeline.step_opts(run.step, run.opts)
            extra = [*(["--upstream-note", run.upstream] if run.upstream else []), "--overwrite", "--opts", *args]
            stale.append(f"{RunPaths(run.step.folder(), plan_.name, run.note).checkpoint_dir}: {why}; rerun it: "
                         f"{run.step.arm.command(plan_.name, run.note, *extra)}")
    if stale:
        raise UserError(f"{len(stale)} finished phase III run(s) of this sweep do not pair with the phase I / II runs "
                        f"the sweep gives them, and a finished run is not rerun: {'; '.join(stale)}.")


def _pending(plan_: Plan) -> list[Run]:
    return [run for run in plan_.runs if pipeline.step_state(run.step, plan_.name, run.note)[0] != "finished"]


def _describe(plan_: Plan) -> None:
    """The sweep's grid, what collapses for which arm, and its size (points x seeds x runs)."""
    seeds = plan_.notes.seed_keys()
    grid = " x ".join(f"{k.key}={','.join(k.values)}" for k in plan_.grid)
    swept = plan_.swept
    say(f"config '{plan_.name}': {' and '.join(f'{a.role.id} ({a.role.role})' for a in swept)} over the grid {grid} "
        f"({len(plan_.points)} points), seeds {', '.join('none' if s is None else str(s) for s in seeds)}; chosen by "
        f"mean validation mean class accuracy over the seeds, reported once on test")
    for arm_runs in swept:
        role = arm_runs.role
        collapsed = [k for k in plan_.grid if k.key not in role.keys]
        if collapsed:
            say(f"{role.id}: {', '.join(k.key for k in collapsed)} {'does' if len(collapsed) == 1 else 'do'} not apply "
                f"to it (read by {'; '.join(_reading_methods(k) for k in collapsed)}): its grid collapses to "
                f"{len(arm_runs.points)} point(s), each run once")
    per_point = len(swept)
    distinct = sum(len(a.points) for a in swept) * len(seeds)
    total = len(plan_.points) * len(seeds) * per_point
    others = [r for r in plan_.runs if not any(r.note in n.values() and r.step.arm.id == a.role.id
                                               for a in swept for n in a.notes.values())]
    against = [a.role.id for a in plan_.arms if a.role.role == "against"]
    say(f"size: {len(plan_.points)} points x {len(seeds)} seed(s) x {per_point} run(s) "
        f"({', '.join(a.role.id for a in swept)}) = {total} runs"
        + (f", {distinct} distinct after collapsing" if distinct != total else "")
        + f"; besides them {len(others)} step(s) (phase I / II of {len({r.note for r in others if r.step.kind != 'phase_iii'})} "
          f"note(s){'; against: ' + ', '.join(against) if against else ''})")


def _expected(plan_: Plan, pending: list[Run], device) -> None:
    """Expected wall time of the pending steps (:mod:`engine.cost`: a probe of this device, each step's work)."""
    from datasets import build_datasets
    from engine.cost import approx_seconds, probe_rates, step_work
    from engine.workload import Sizes

    phase_i_cfg = load_config(plan_.sources["phase_i"], "phase_i", pending[0].opts["phase_i"])
    bundle = build_datasets(phase_i_cfg["dataset"])
    sizes = Sizes.of(bundle)
    rates = probe_rates(phase_i_cfg, bundle, device, distributed.context().world_size)
    by_kind: dict[str, float] = {}
    for run in pending:
        step = run.step
        seed = pipeline._seed(plan_.sources, run.opts) if step.teacher else None
        cfg = load_config(plan_.sources[step.config_phase()], step.config_phase(), pipeline.step_opts(step, run.opts, seed))
        kind = {"phase_i": "phase I", "phase_ii": "phase II", "phase_iii": "phase III"}[step.kind]
        by_kind[kind] = by_kind.get(kind, 0.0) + step_work(step, cfg, sizes).seconds(rates)
    total = sum(by_kind.values())
    say(f"expected wall time of the {len(pending)} pending step(s): {approx_seconds(total)} ("
        + ", ".join(f"{kind} {approx_seconds(s)}" for kind, s in by_kind.items())
        + f"), from a {rates.probe_s:.1f} s probe of the phase I model on {device}: {rates.trained * 1e3:.3g} ms per image "
          f"trained, {rates.forwarded * 1e3:.3g} ms per image forwarded; classifier-only training counts as free")


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _results(path: Path) -> dict | None:
    """A run's results.json; None when there is none; a UserError naming it when it cannot be read."""
    try:
        return load_results(path)
    except ValueError as exc:
        raise UserError(f"{path} cannot be read ({exc}); rerun that run with --overwrite, or delete its folder and "
                        f"run the sweep again.") from exc


@dataclass
class Scored:
    """One point of an arm: each seed's validation score and results.json."""

    point: Point
    val: dict[str, float]            # pair key (seed0, ...) -> checkpoint_selection.val_mean_class_acc
    sources: dict[str, str]          # pair key -> results.json path
    runs: dict[str, dict]            # pair key -> results.json (test numbers read only for the chosen point)

    @property
    def mean(self) -> float:
        return sum(self.val.values()) / len(self.val)


def _scores(plan_: Plan, arm_runs: ArmRuns) -> list[Scored]:
    """Every point of an arm with its runs' validation scores; a UserError for a run that is not finished or
    selected nothing on validation."""
    out = []
    for point in arm_runs.points:
        val, sources, runs = {}, {}, {}
        for pair, note in arm_runs.notes[point].items():
            path = RunPaths(arm_runs.role.arm.folder, plan_.name, note).results
            results = _results(path)
            if not results or not results.get("finished"):
                raise UserError(f"{path}: no finished run for {arm_runs.role.id} at {point_text(point)} ({pair}); run the "
                                f"sweep command again to finish it.")
            selection = results.get("checkpoint_selection") or {}
            score = selection.get(SELECTION_KEY)
            if selection.get("by") != "val" or not _is_number(score):
                raise UserError(f"{path} selected nothing on validation (checkpoint_selection: {selection}), so its point "
                                f"cannot be chosen on validation: the run was made without a validation split. Rerun it "
                                f"with --overwrite, or give the sweep its own notes with --note NAME.")
            val[pair], sources[pair], runs[pair] = float(score), str(path), results
        out.append(Scored(point, val, sources, runs))
    return out


def select(scored: list[Scored]) -> Scored:
    """The point with the best mean validation score over the seeds; ties: the earlier point. Reads nothing
    but ``Scored.val``."""
    best = scored[0]
    for candidate in scored[1:]:
        if candidate.mean > best.mean:
            best = candidate
    return best


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
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


def sweep_folder(spec: SweepSpec, plan_: Plan) -> str:
    """``sweep-<method>-<grid key labels>-<hash>`` (``NOTE-sweep-...`` with --note): readable, and one folder per
    sweep (the hash covers method, control, against, grid, seeds, note and --opts)."""
    identity = {"method": spec.method, "roles": [(r.role, r.id) for r in plan_.roles], "grid": spec.grid,
                "seeds": spec.seeds, "note": spec.note, "opts": spec.opts}
    labels = "+".join(k.label for k in plan_.grid)
    head = f"{spec.note}-sweep-{spec.method}-{labels}" if spec.note else f"sweep-{spec.method}-{labels}"
    return f"{head[:MAX_NAME_LENGTH - 9].rstrip('._-+')}-{_digest(identity)}"


def report_dir(spec: SweepSpec, plan_: Plan, root: Path | None = None) -> Path:
    return Layout(output_root() if root is None else Path(root)).reports_dir(plan_.name) / sweep_folder(spec, plan_)


def _val_text(values: list[float]) -> str:
    from analysis.stats import Stat

    stat = Stat(values)
    return f"{stat.mean:.2f}" + (f" ± {stat.std:.2f}" if stat.std is not None else "")


def _stat_json(values: dict[str, float]) -> dict:
    from analysis.stats import Stat

    return {**Stat(list(values.values())).as_dict(), "per_seed": values}


def build_report(spec: SweepSpec, plan_: Plan, root: Path | None = None, *, echo: bool = True) -> dict:
    """Choose each swept arm's point on validation, write sweep.md and sweep.json (test numbers of the chosen
    points only) into :func:`report_dir`, and return the JSON."""
    from analysis.render import _paired_markdown, format_value
    from analysis.rows import METRICS
    from analysis.stats import Stat, _paired

    out = report_dir(spec, plan_, root)
    scored = {arm_runs.role.id: _scores(plan_, arm_runs) for arm_runs in plan_.arms}
    chosen = {role_id: select(points) for role_id, points in scored.items()}
    seeds = [Notes.pair_key(s) for s in plan_.notes.seed_keys()]
    several = len(seeds) > 1

    def label(role: Role) -> str:
        point = chosen[role.id].point
        return f"{role.arm.label} ({point_text(point)})" if role.role != "against" else role.arm.label

    method = plan_.roles[0]
    diffs = []
    for role in plan_.roles[1:]:
        diffs += _paired(label(method), chosen[method.id].runs, label(role), chosen[role.id].runs)

    grid_text = "; ".join(f"`{k.key}` = {', '.join(k.values)}" for k in plan_.grid)
    seeds_text = ", ".join(seeds)
    parts = [f"# Sweep: `{plan_.name}`, {method.arm.label} (`{method.id}`)", "",
             f"`{spec.command()}`", "",
             f"Grid: {grid_text} ({len(plan_.points)} points), notes {seeds_text}. Each swept arm's point is the one with "
             f"the best **mean validation score** over the seeds (mean class accuracy on the validation split, "
             f"`checkpoint_selection.{SELECTION_KEY}` of each run's results.json: the score every run already selects "
             f"its checkpoint by; ties go to the earlier point). The control gets the same grid and the same rule. "
             f"Test images choose nothing: only the chosen points' test numbers are read, below.", "",
             "## Chosen points: test accuracy (%)", "",
             "| arm | id | chosen point | validation | " + " | ".join(METRICS) + " | n |",
             "|:---|:---|:---|---:|" + "---:|" * len(METRICS) + "---:|"]
    for role in plan_.roles:
        best = chosen[role.id]
        runs = list(best.runs.values())
        cells = [role.arm.label, f"`{role.id}`" + (" (not swept)" if role.role == "against" else ""),
                 point_text(best.point) if role.role != "against" else "its own run", _val_text(list(best.val.values())),
                 *(format_value(Stat([float(r[m]) for r in runs if _is_number(r.get(m))]), several, len(runs))
                   for m in METRICS), str(len(runs))]
        parts.append("| " + " | ".join(cells) + " |")
    parts += ["", f"Test accuracy of each chosen run's selected model (its results.json top level), mean ± sample sd over "
                  f"the notes; — = the group has no class. Every other point's test numbers stay in its own "
                  f"results.json (run folders in sweep.json) and are not shown: a table of them would invite choosing "
                  f"on test."
              + (" The --against rows are not swept: their own runs on the seeds' base notes."
                 if any(r.role == "against" for r in plan_.roles) else "")]
    parts += ["", "## Validation score of every point (mean class accuracy %)"]
    for arm_runs in plan_.swept:
        role = arm_runs.role
        collapsed = [k.key for k in plan_.grid if k.key not in role.keys]
        parts += ["", f"### {role.arm.label} (`{role.id}`, {role.role})", ""]
        if collapsed:
            parts += [f"{', '.join(f'`{k}`' for k in collapsed)} {'does' if len(collapsed) == 1 else 'do'} not apply to "
                      f"it: its grid collapses to {len(arm_runs.points)} point(s).", ""]
        parts += ["| point | mean ± sd | " + " | ".join(seeds) + " | |", "|:---|---:|" + "---:|" * len(seeds) + ":---|"]
        for point in scored[role.id]:
            mark = "**chosen**" if point is chosen[role.id] else ""
            parts.append(f"| {point_text(point.point)} | {_val_text(list(point.val.values()))} | "
                         + " | ".join(f"{point.val[s]:.2f}" for s in seeds) + f" | {mark} |")
    parts += _paired_markdown(diffs, "chosen method − chosen reference, same seed = pair",
                              "the two chosen runs of the same seed (same data, seed and, on a grid of phase III keys, "
                              "the same phase I backbone)")
    markdown = "\n".join(parts) + "\n"

    def arm_json(arm_runs: ArmRuns) -> dict:
        role = arm_runs.role
        best = chosen[role.id]
        return {
            "role": role.role, "id": role.id, "label": role.arm.label, "folder": role.arm.folder,
            "keys": list(role.keys), "collapsed": [k.key for k in plan_.grid if k.key not in role.keys],
            # every point: its validation score and where its runs are; no test number
            "points": [{"point": dict(s.point), "chosen": s is best, "notes": arm_runs.notes[s.point],
                        "upstream_notes": arm_runs.upstream.get(s.point, {}), "val": _stat_json(s.val),
                        "results": s.sources} for s in scored[role.id]],
            "chosen": {"point": dict(best.point), "notes": arm_runs.notes[best.point], "val": _stat_json(best.val),
                       "test": {m: Stat([float(r[m]) for r in best.runs.values() if _is_number(r.get(m))]).as_dict()
                                for m in METRICS},
                       "results": best.sources},
        }

    files = {"sweep.md": str(out / "sweep.md"), "sweep.json": str(out / "sweep.json")}
    data = {
        "format": SWEEP_FORMAT, "config": plan_.name, "command": spec.command(), "method": method.id,
        "control": next((r.id for r in plan_.roles if r.role == "control"), None),
        "against": [r.id for r in plan_.roles if r.role == "against"],
        "grid": {k.key: list(k.values) for k in plan_.grid}, "seeds": list(spec.seeds) if spec.seeds else None,
        "notes": seeds, "opts": list(spec.opts),
        "selection": f"the point with the best mean over the notes of checkpoint_selection.{SELECTION_KEY} (validation "
                     f"split); ties: the earlier point",
        "arms": [arm_json(a) for a in plan_.arms],
        "paired": [d.as_dict() for d in diffs],
        "files": files,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(markdown)
    write_json_atomic(out / "sweep.json", data)
    if echo:
        print(markdown, flush=True)
        print(f"sweep report written to {out}/ (sweep.md, sweep.json)", flush=True)
    return data


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def resolved_configs(spec: SweepSpec) -> str:
    """--print-config: each phase's config as the swept method's first run of the first grid point reads it
    (first seed; phase I / II: the run of the note it reads them from)."""
    plan_ = plan(spec)
    method = plan_.arms[0]
    point = method.points[0]
    pair, note = next(iter(method.notes[point].items()))
    upstream = method.upstream[point].get(pair, note)
    run = next(r for r in plan_.runs if r.note == note and r.step.arm.id == method.role.id and not r.step.teacher)
    out = []
    for phase in CONFIG_PHASES:
        own = phase == run.step.config_phase()
        opts = pipeline.step_opts(run.step, run.opts) if own else run.opts[phase]
        where = note if own or method.role.arm.method.stage == "phase_i" else upstream
        out.append(f"--- # {phase} of note {where} ({point_text(point)})\n"
                   f"{config_text(load_config(plan_.sources[phase], phase, opts))}")
    return "".join(out)


def run(spec: SweepSpec) -> dict:
    """Plan the sweep, print its size and expected wall time, run every pending step, then the report."""
    from app.data_install import ensure_fashion_mnist
    from utils.provenance import git_state

    plan_ = plan(spec)
    torch_device = distributed.setup_device(spec.device)
    _check_existing(plan_)
    _check_upstream_split(plan_)
    check_sources(plan_)
    _describe(plan_)
    pending = _pending(plan_)
    if pending:
        phase_i_cfg = load_config(plan_.sources["phase_i"], "phase_i", pending[0].opts["phase_i"])
        distributed.on_main(lambda: ensure_fashion_mnist(phase_i_cfg["dataset"], say))
        distributed.barrier()
        _expected(plan_, pending, torch_device)
    else:
        say(f"all {len(plan_.runs)} step(s) finished: nothing to run")
    if spec.dry_run:
        say("--dry-run: nothing run, no report written")
        return {}
    started, head = time.perf_counter(), git_state()
    total = len(plan_.runs)
    for i, one in enumerate(plan_.runs, 1):
        pipeline._run_step(one.step, f"{plan_.name}/{one.note} {i}/{total} {one.step.label}:", plan_.sources, one.note,
                           spec.device, one.opts, head, None, upstream=one.upstream, talk=say)
    if not distributed.context().is_main:
        return {}
    check_sources(plan_)
    data = build_report(spec, plan_)
    say(f"done in {time.perf_counter() - started:.1f} s; report in {report_dir(spec, plan_)}/")
    return data
