"""Run folders: every path a run owns, named here and nowhere else, and read back from the disk here.

Every output lives under one output root (`output_root`): --output-root DIR, else the environment
variable FSA_LT_OUTPUT_ROOT, else the working directory. Below it:

checkpoints/<run>/<config>/<note>/      checkpoints, config.yaml, log.txt, results.json
run_summary/<run>/<config>/<note>/      TensorBoard events (run ``visualize``: visualize.py's images)
features/<config>/<note>/               phase II's outputs on the CE backbone (run ``phase_ii``)
features-<backbone>/<config>/<note>/    phase II's outputs on another backbone (run ``phase_ii-<backbone>``)
visualizations/<config>/<note>/<run>/   visualize.py's PNGs of run <run>'s model
reports/<config>/<notes>/               the report of a set of notes
.<note>.lock, .<note>.replaced          beside a run's main folder: its lock, its copy moved aside by --overwrite

A run name (the folder under checkpoints/ and run_summary/) says the stage, the method and the backbone:

phase_i, phase_i-<method>                             phase I of the baseline (CE), of another phase I method
phase_ii, phase_ii-<backbone>                         phase II on the baseline's backbone, on another one
phase_iii_<mode>, phase_iii_<mode>-<generator>        phase III of the default generator (FSA), of another one
phase_iii_<mode>[-<generator>]-on-<backbone>          ... on a backbone other than the baseline

The method table (engine/methods/) names its runs with the naming functions below; this module knows
no method (utils is the bottom layer), so the baseline's id and the default generator are arguments.
Config names, notes and run names are each one plain folder name (`check_run_name`), so a run's
folders are always exactly the ones above.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserError

PHASE_I = "phase_i"
PHASE_II = "phase_ii"
PHASE_III = "phase_iii"
VISUALIZE = "visualize"  # the run name of visualize.py's TensorBoard images
CHECKPOINTS = "checkpoints"
RUN_SUMMARY = "run_summary"
FEATURES = "features"
VISUALIZATIONS = "visualizations"
REPORTS = "reports"
RESULTS_FILE = "results.json"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best_model.pt"
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.txt"
MAX_NAME_LENGTH = 100
NOTES_HASH_LENGTH = 12  # hex digits of the hash that ends a shortened folder name
_BACKBONE_SEPARATOR = "-on-"
# one path component; a leading '.' is reserved for the lock and moved-aside folders, and a leading '-'
# would read as an option in every command the project prints
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_run_name(value: str, what: str) -> str:
    """`value` if it is a safe run name (a single folder name), else a UserError naming the rule."""
    if not isinstance(value, str) or len(value) > MAX_NAME_LENGTH or not _NAME.fullmatch(value):
        raise UserError(
            f"{what} {value!r} cannot name a run folder: it must be a single folder name of letters, digits, '_', "
            f"'-' and '.' (not starting with '.' or '-', at most {MAX_NAME_LENGTH} characters), so that a run's outputs "
            f"stay inside checkpoints/, run_summary/ and features/. Choose e.g. --note seed0."
        )
    return value


# ------------------------------------------------------------------------------------------------
# The output root
# ------------------------------------------------------------------------------------------------
OUTPUT_ROOT_ENV = "FSA_LT_OUTPUT_ROOT"
_flag_root: Path | None = None  # this command's --output-root (set_output_root)


def set_output_root(path: str | Path | None) -> None:
    """Make `path`, the command line's --output-root, this process's output root (None: the command gave
    none, so FSA_LT_OUTPUT_ROOT or the working directory applies). A UserError if it cannot be a folder."""
    global _flag_root
    _flag_root = None if path is None else _checked_root(Path(path).expanduser(), "--output-root", ".")


def output_root_flag() -> Path | None:
    """The --output-root this command gave, if any (the commands that messages suggest repeat it; a root
    from the environment variable needs no repeating)."""
    return _flag_root


def output_root() -> Path:
    """The folder all outputs live under: --output-root, else $FSA_LT_OUTPUT_ROOT, else the working
    directory (``Path(".")``). It need not exist yet: the first run creates it."""
    if _flag_root is not None:
        return _flag_root
    env = os.environ.get(OUTPUT_ROOT_ENV)
    if env:
        return _checked_root(Path(env).expanduser(), f"{OUTPUT_ROOT_ENV}={env}", f", or unset {OUTPUT_ROOT_ENV}.")
    return Path(".")


def _checked_root(root: Path, source: str, fix_end: str) -> Path:
    """`root` if it is a folder, or can be created: its nearest existing ancestor is a writable folder.
    Else a UserError naming `source` (the flag or the variable), whose advice ends in `fix_end`."""
    fix = ("The output root holds checkpoints/, run_summary/, features*/, visualizations/ and reports/: name a folder "
           f"(a missing one is created){fix_end}")
    if root.exists():
        if not root.is_dir():
            raise UserError(f"{source}: {root} is a file, not a folder. {fix}")
        return root
    ancestor = root.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        why = "a file" if not ancestor.is_dir() else "a folder this user cannot write to"
        raise UserError(f"{source}: {root} cannot be created, as {ancestor} is {why}. {fix}")
    return root


# ------------------------------------------------------------------------------------------------
# Names: run names (engine/methods/ names its runs with these), notes and note sets
# ------------------------------------------------------------------------------------------------
def phase_i_run_name(method_id: str, baseline: str) -> str:
    """``phase_i`` for the baseline, ``phase_i-<method_id>`` for any other phase I method."""
    return PHASE_I if method_id == baseline else f"{PHASE_I}-{method_id}"


def phase_ii_run_name(backbone: str, baseline: str) -> str:
    """``phase_ii`` on the baseline's backbone (in features/), ``phase_ii-<backbone>`` on another
    (in features-<backbone>/)."""
    return PHASE_II if backbone == baseline else f"{PHASE_II}-{backbone}"


def phase_iii_run_name(mode: str, generator: str, default_generator: str) -> str:
    """``phase_iii_<mode>`` for the default generator, ``phase_iii_<mode>-<generator>`` for another."""
    base = f"{PHASE_III}_{mode}"
    return base if generator == default_generator else f"{base}-{generator}"


def arm_run_name(method_run: str, backbone: str, baseline: str) -> str:
    """The run name of a method (run name ``method_run``) trained on ``backbone``: its own name on the
    baseline, ``<method_run>-on-<backbone>`` on another; a phase I run is its own backbone."""
    if stage_of(method_run) == PHASE_I or backbone == baseline:
        return method_run
    return f"{method_run}{_BACKBONE_SEPARATOR}{backbone}"


def stage_of(run_name: str) -> str | None:
    """The stage (PHASE_I, PHASE_II or PHASE_III) of a run name; None for any other name (``visualize``)."""
    for stage in (PHASE_I, PHASE_II):
        if run_name == stage or run_name.startswith(f"{stage}-"):
            return stage
    return PHASE_III if run_name.startswith(f"{PHASE_III}_") else None


def seed_notes(note: str | None, seeds: list[int] | None) -> list[str]:
    """The notes of one variant's runs, as the pipeline names them and the report finds them: `note`
    (default `default`), or `seedN` per seed (`NOTE-seedN` with a note); each checked with `check_run_name`."""
    if not seeds:
        return [check_run_name("default" if note is None else note, "--note")]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: each seed once, please.")
    if any(s < 0 for s in seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: seeds must be >= 0.")
    prefix = "" if note is None else f"{note}-"
    return [check_run_name(f"{prefix}seed{s}", "--note") for s in seeds]


def fitted_folder_name(joined: str) -> str:
    """``joined`` itself, or past MAX_NAME_LENGTH characters a readable prefix and a hash of the whole
    (so that two long names never share a folder)."""
    if len(joined) <= MAX_NAME_LENGTH:
        return joined
    digest = hashlib.sha256(joined.encode()).hexdigest()[:NOTES_HASH_LENGTH]
    return f"{joined[:MAX_NAME_LENGTH - NOTES_HASH_LENGTH - 1]}-{digest}"


def notes_folder(notes: list[str]) -> str:
    """The report folder name of a note set: the note itself (``default``), or the sorted notes joined with
    '+' (``seed0+seed1+seed2``), shortened by `fitted_folder_name`."""
    return fitted_folder_name("+".join(sorted(set(notes))))


# ------------------------------------------------------------------------------------------------
# Names -> paths
# ------------------------------------------------------------------------------------------------
def moved_aside(folder: Path) -> Path:
    """Where --overwrite moves a run folder until the new run has started (``.<note>.replaced``)."""
    return folder.with_name(f".{folder.name}.replaced")


@dataclass(frozen=True)
class RunPaths:
    """Every path of run ``run_name`` of (config, note) under ``root``."""

    run_name: str
    config: str
    note: str
    # resolved per instance (a plain default would be the root at import time, before --output-root is parsed)
    root: Path = field(default_factory=output_root)

    def __post_init__(self) -> None:
        check_run_name(self.run_name, "the run name")
        check_run_name(self.config, "the config name")
        check_run_name(self.note, "--note")

    @property
    def stage(self) -> str | None:
        return stage_of(self.run_name)

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / CHECKPOINTS / self.run_name / self.config / self.note

    @property
    def summary_dir(self) -> Path:
        return self.root / RUN_SUMMARY / self.run_name / self.config / self.note

    @property
    def features_dir(self) -> Path:
        """Phase II's output folder: ``features/`` for ``phase_ii``, ``features-<backbone>/`` for
        ``phase_ii-<backbone>`` (other runs: the CE backbone's)."""
        suffix = self.run_name[len(PHASE_II):] if self.stage == PHASE_II else ""
        return self.root / f"{FEATURES}{suffix}" / self.config / self.note

    @property
    def visualization_dir(self) -> Path:
        """Where visualize.py puts the PNGs explaining this run's model."""
        return self.root / VISUALIZATIONS / self.config / self.note / self.run_name

    @property
    def folders(self) -> tuple[Path, ...]:
        """The folders this run writes; the first one (`run_dir`) holds its state and results."""
        if self.stage == PHASE_II:
            return (self.features_dir,)
        return (self.checkpoint_dir, self.summary_dir)

    @property
    def run_dir(self) -> Path:
        return self.folders[0]

    @property
    def last(self) -> Path:
        return self.run_dir / LAST_CHECKPOINT

    @property
    def best(self) -> Path:
        return self.run_dir / BEST_CHECKPOINT

    @property
    def results(self) -> Path:
        return self.run_dir / RESULTS_FILE

    @property
    def config_file(self) -> Path:
        """The resolved config the run saved."""
        return self.run_dir / CONFIG_FILE

    @property
    def log(self) -> Path:
        return self.run_dir / LOG_FILE

    @property
    def lock_file(self) -> Path:
        """The run's lock (``.<note>.lock`` beside `run_dir`, so that it outlives a moved-aside run folder)."""
        return self.run_dir.with_name(f".{self.run_dir.name}.lock")

    def sibling(self, run_name: str) -> "RunPaths":
        """Run ``run_name`` of the same config name and note."""
        return RunPaths(run_name, self.config, self.note, self.root)


@dataclass(frozen=True)
class Layout:
    """The output root's folders that hold more than one run: what runs exist, and the reports."""

    root: Path = field(default_factory=output_root)

    def runs(self, config: str, note: str | None = None) -> list[tuple[str, str]]:
        """``(run name, note)`` of every phase I and phase III run folder ``checkpoints/<run>/<config>/<note>/``
        (of ``note`` only, when given), sorted; lock files and moved-aside folders are no runs."""
        checkpoints = self.root / CHECKPOINTS
        if not checkpoints.is_dir():
            return []
        found = []
        for run in sorted(checkpoints.iterdir()):
            config_dir = run / config
            if stage_of(run.name) not in (PHASE_I, PHASE_III) or not config_dir.is_dir():
                continue
            notes = [note] if note is not None else sorted(n.name for n in config_dir.iterdir() if _NAME.fullmatch(n.name))
            found += [(run.name, n) for n in notes if (config_dir / n).is_dir()]
        return found

    def reports_dir(self, config: str) -> Path:
        """``reports/<config>/``: the folder of every report of ``config`` (a config name, not a path)."""
        return self.root / REPORTS / config

    def report_dir(self, config: str, notes: list[str]) -> Path:
        """``reports/<config>/<notes_folder(notes)>/``: the folder of one note set's report."""
        return self.reports_dir(config) / notes_folder(notes)


# ------------------------------------------------------------------------------------------------
# Folders -> names
# ------------------------------------------------------------------------------------------------
def features_identity(features_dir: Path, baseline: str) -> tuple[str, str, str]:
    """``(config, note, backbone)`` of phase II folder ``features[-<backbone>]/<config>/<note>/``, read from
    its path (``baseline`` for ``features/``, and for a folder not under a features folder); an empty
    config or note ('' for a too short path) is for the caller to replace."""
    features_dir = Path(features_dir)
    top = features_dir.parent.parent.name
    backbone = top[len(FEATURES) + 1:] if top.startswith(f"{FEATURES}-") else baseline
    return features_dir.parent.name, features_dir.name, backbone
