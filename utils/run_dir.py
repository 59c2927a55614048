"""Where each phase's outputs live, and the rules that keep runs safe.

Every output lives under one output root (`output_root`): --output-root DIR, else the environment
variable FSA_LT_OUTPUT_ROOT, else the working directory. Below it:

checkpoints/<phase>/<config>/<note>/   checkpoints, config.yaml, log.txt, results.json
run_summary/<phase>/<config>/<note>/   TensorBoard events
features/<config>/<note>/              phase II outputs (on the CE backbone)
features-<backbone>/<config>/<note>/   phase II outputs on another phase I method's backbone (phase_ii-<backbone>)
visualizations/<config>/<note>/<phase>/, reports/<config>/<notes>/

Safety rules, all here:
- a config name and a note are each one plain folder name (`check_run_name`), so a run's folders
  are always exactly the ones above;
- `remove_run_folder` is the project's only deletion, and it refuses anything but a run folder (or
  its moved-aside copy) of the run it is given;
- `--overwrite` moves the old run aside (`.<note>.replaced`) and deletes it only once the new run has
  written its first checkpoint or finished (`run_started`); if the new run fails before that,
  `restore_replaced` removes what it created and puts the old run back (a fresh run that fails in
  set-up likewise leaves no files);
- `lock_run` holds an OS file lock (`.<note>.lock` beside the run folder) for the life of the
  process (the file goes when it is let go), so a second process on a live run is refused, and
  `kill -9` leaves no stale lock.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from utils import distributed
from utils.errors import UserError

RESULTS_FILE = "results.json"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best_model.pt"
PHASE_II = "phase_ii"
MAX_NAME_LENGTH = 100
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


@dataclass(frozen=True)
class RunPaths:
    phase: str
    config: str
    note: str
    # resolved per instance (a plain default would be the root at import time, before --output-root is parsed)
    root: Path = field(default_factory=output_root)

    def __post_init__(self) -> None:
        check_run_name(self.phase, "phase")
        check_run_name(self.config, "the config name")
        check_run_name(self.note, "--note")

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints" / self.phase / self.config / self.note

    @property
    def summary_dir(self) -> Path:
        return self.root / "run_summary" / self.phase / self.config / self.note

    @property
    def is_phase_ii(self) -> bool:
        return self.phase == PHASE_II or self.phase.startswith(f"{PHASE_II}-")

    @property
    def features_dir(self) -> Path:
        """Phase II's output folder: ``features/`` for ``phase_ii``, ``features-<backbone>/`` for
        ``phase_ii-<backbone>`` (other phases: the CE backbone's)."""
        suffix = self.phase[len(PHASE_II):] if self.is_phase_ii else ""
        return self.root / f"features{suffix}" / self.config / self.note

    @property
    def last(self) -> Path:
        return self.checkpoint_dir / LAST_CHECKPOINT

    @property
    def best(self) -> Path:
        return self.checkpoint_dir / BEST_CHECKPOINT

    @property
    def results(self) -> Path:
        return self.checkpoint_dir / RESULTS_FILE

    @property
    def folders(self) -> tuple[Path, ...]:
        """The folders a run of this phase writes; the first one holds its state and results."""
        if self.is_phase_ii:
            return (self.features_dir,)
        return (self.checkpoint_dir, self.summary_dir)

    @property
    def lock_file(self) -> Path:
        main = self.folders[0]
        return main.parent / f".{main.name}.lock"

    def sibling(self, phase: str) -> "RunPaths":
        """The run of another phase for the same config name and note."""
        return RunPaths(phase, self.config, self.note, self.root)


def load_results(path: Path) -> dict | None:
    """The JSON object at `path`; None when there is no file; ValueError saying why when the file
    exists but is not a readable JSON object."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise ValueError(f"not readable as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    return data


def read_results(path: Path) -> dict | None:
    """The JSON object at `path`, or None when it is missing or unreadable (then the run counts as not done)."""
    try:
        return load_results(path)
    except ValueError:
        return None


def is_finished(paths: RunPaths) -> bool:
    results = read_results(paths.results)
    return bool(results and results.get("finished"))


# ------------------------------------------------------------------------------------------------
# Deletion and replacement
# ------------------------------------------------------------------------------------------------
def _aside(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.replaced")


def remove_run_folder(folder: Path, paths: RunPaths) -> None:
    """Delete `folder`, which must be one of `paths`' run folders or a moved-aside copy of one.

    The project's only deletion: whatever a caller computes, nothing outside the run it names goes.
    """
    allowed = {os.path.abspath(p) for f in paths.folders for p in (f, _aside(f))}
    if os.path.abspath(folder) not in allowed or Path(folder).is_symlink():
        raise UserError(f"refusing to delete {folder}: it is not a run folder of {paths.phase}/{paths.config}/"
                        f"{paths.note}. Nothing was deleted; please report this as a bug.")
    if Path(folder).exists():
        shutil.rmtree(folder)


@dataclass
class _Pending:
    """A run of this process that has not started yet (no checkpoint, no results): until it has, a failure
    removes the folders it created and puts back the run that --overwrite moved aside."""

    paths: RunPaths
    created: tuple[Path, ...]  # its folders that did not exist when it was opened


_PENDING: list[_Pending] = []


def _started(paths: RunPaths) -> bool:
    return any((f / name).is_file() for f in paths.folders for name in (LAST_CHECKPOINT, RESULTS_FILE))


def open_pending(paths: RunPaths, *, replace: bool) -> None:
    """Register a new run before it writes anything; with `replace` (--overwrite) first move its existing
    folders aside (`.<note>.replaced`). `run_started` makes the new run permanent (and deletes what was
    moved aside); until then `restore_replaced` undoes everything."""
    if replace:
        for folder in paths.folders:
            if folder.exists():
                remove_run_folder(_aside(folder), paths)  # a copy from an earlier try that is already replaced
                folder.rename(_aside(folder))
    _PENDING.append(_Pending(paths, tuple(f for f in paths.folders if not f.exists())))


def run_started(paths: RunPaths) -> None:
    """The new run has written its first checkpoint (or finished): the run it replaces goes for good."""
    for pending in [p for p in _PENDING if p.paths == paths]:
        _PENDING.remove(pending)
        for folder in paths.folders:
            remove_run_folder(_aside(folder), paths)


def _restore(paths: RunPaths, created: tuple[Path, ...]) -> None:
    for folder in paths.folders:
        if folder in created or _aside(folder).exists():
            remove_run_folder(folder, paths)
        if _aside(folder).exists():
            _aside(folder).rename(folder)


def restore_replaced() -> None:
    """On failure: remove what every not yet started run of this process created, and put back the runs
    their --overwrite moved aside."""
    while _PENDING:
        pending = _PENDING.pop()
        _restore(pending.paths, pending.created)


def recover_replaced(paths: RunPaths) -> bool:
    """Finish an `--overwrite` that a killed process left half-done; True if the old run came back.

    If the new run had started, the moved-aside copy is deleted; otherwise the old run is restored."""
    if not any(_aside(f).exists() for f in paths.folders):
        return False
    if _started(paths):
        for folder in paths.folders:
            remove_run_folder(_aside(folder), paths)
        return False
    _restore(paths, ())
    return True


def prepare_run(paths: RunPaths, *, resume: bool, overwrite: bool, command: str) -> str:
    """Decide how a training run starts: 'fresh', 'resume' or 'finished' (resume of a done run).

    A finished run is never replaced without `overwrite`; an interrupted one needs `resume` or
    `overwrite`, so that no work is thrown away by accident. With `overwrite` the old run is moved
    aside (see `open_pending`), not deleted.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pass only one of them.")
    if recover_replaced(paths):
        print(f"note: restored the run in {paths.folders[0]} that an interrupted --overwrite had moved aside.",
              file=sys.stderr)
    ckpt_dir = paths.checkpoint_dir
    has_state = paths.last.is_file() or paths.results.is_file()
    if overwrite:
        open_pending(paths, replace=True)
        return "fresh"
    if resume:
        if is_finished(paths):
            return "finished"
        if not paths.last.is_file():
            raise UserError(
                f"--resume: nothing to resume in {ckpt_dir} (no {LAST_CHECKPOINT}). Start the run without "
                f"--resume: {command}"
            )
        return "resume"
    if has_state:
        if is_finished(paths):
            raise UserError(
                f"A finished run already exists in {ckpt_dir}. It is not overwritten silently: pass "
                f"--overwrite to replace it ({command} --overwrite), or --note NAME to start a separate experiment."
            )
        raise UserError(
            f"An interrupted run exists in {ckpt_dir}. Pass --resume to continue it ({command} --resume), "
            f"--overwrite to start again from scratch, or --note NAME for a separate experiment."
        )
    open_pending(paths, replace=False)
    return "fresh"


# ------------------------------------------------------------------------------------------------
# One process per run
# ------------------------------------------------------------------------------------------------
@dataclass
class _HeldLock:
    fd: int
    path: Path
    made_dirs: list[Path]  # folders created for the lock file, deepest last (removed again if empty)


_HELD_LOCKS: dict[str, _HeldLock] = {}


def lock_run(paths: RunPaths) -> None:
    """Hold the run's lock until the process ends (or `release_locks`); a UserError if another process has it.

    An OS lock (flock) dies with its process, so a killed run never leaves a stale lock behind.
    Under torchrun rank 0 holds it for the job and every rank raises its error: call it after
    `distributed.setup_device`."""
    distributed.on_main(lambda: _lock(paths))


def _missing_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _lock(paths: RunPaths) -> None:
    lock = paths.lock_file
    key = os.path.abspath(lock)
    if key in _HELD_LOCKS:
        return
    made_dirs = _missing_parents(lock.parent)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run lock {lock}: {exc.strerror}. Check that the folder is writable "
                        f"(permissions, read-only file system, free space).") from exc
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"The run {paths.folders[0]} is in use by {holder}{_liveness(holder)}. One process per run: wait for "
                f"it to finish (or stop it), then --resume; or use --note NAME for a separate experiment."
            ) from None
        # the previous holder removes the file as it lets go: lock again unless ours is still the file there
        if lock.exists() and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f"process {os.getpid()} on {socket.gethostname()} (since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)})\n").encode(), 0)
    _HELD_LOCKS[key] = _HeldLock(fd, lock, made_dirs)


def forget_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited descriptors of the parent's run locks.

    An flock belongs to the open file, which a fork shares: without this, workers orphaned by a `kill -9`
    of their parent would hold the run's lock until they exit. The parent's own descriptors keep it."""
    for held in _HELD_LOCKS.values():
        os.close(held.fd)
    _HELD_LOCKS.clear()


def _liveness(holder: str) -> str:
    """What is known of the lock holder named in the lock file: on this host, whether its process lives."""
    found = re.match(r"process (\d+) on (\S+) ", holder)
    if not found or found.group(2) != socket.gethostname():
        return ""
    try:
        os.kill(int(found.group(1)), 0)
    except ProcessLookupError:
        return (" -- that process has ended, but a child of it (e.g. a DataLoader worker) still holds the lock; "
                "it goes when the child exits, within seconds")
    except PermissionError:
        pass  # alive, another user's
    return ", which is running"


def release_locks() -> None:
    """Let go of every run lock of this process, removing the lock files (and the folders made only for them)."""
    for held in _HELD_LOCKS.values():
        held.path.unlink(missing_ok=True)  # while still holding it: see the check in _lock
        os.close(held.fd)
        for folder in reversed(held.made_dirs):
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote there
                break
    _HELD_LOCKS.clear()


def write_json_atomic(path: Path, data: dict, indent: int | None = 2) -> None:
    """Write `data` as JSON to a temporary file, then rename it over `path` (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=indent, sort_keys=False) + "\n")
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: leave no half-written file behind
        raise
