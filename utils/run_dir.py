"""The rules that keep runs safe: no finished run replaced silently, nothing deleted outside a run,
and an --overwrite that can be undone until the new run has started.

Where a run's folders are is `utils.layout`; the one-process-per-run lock is `utils.run_lock`.

- `remove_run_folder` is the project's only deletion, and it refuses anything but a run folder (or
  its moved-aside copy) of the run it is given;
- `prepare_run` decides how a training run starts (fresh, resume, finished) and refuses to throw work
  away: a finished run needs --overwrite, an interrupted one --resume or --overwrite;
- `--overwrite` moves the old run aside (`.<note>.replaced`) and deletes it only once the new run has
  written its first checkpoint or finished (`run_started`); if the new run fails before that,
  `restore_replaced` removes what it created and puts the old run back (a fresh run that fails in
  set-up likewise leaves no files), and `recover_replaced` finishes what a killed process left half-done.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError
from utils.json_files import read_results
from utils.layout import LAST_CHECKPOINT, RunPaths, moved_aside


def is_finished(paths: RunPaths) -> bool:
    """Whether the run wrote a results.json that says it finished."""
    results = read_results(paths.results)
    return bool(results and results.get("finished"))


# ------------------------------------------------------------------------------------------------
# Deletion and replacement
# ------------------------------------------------------------------------------------------------
def remove_run_folder(folder: Path, paths: RunPaths) -> None:
    """Delete `folder`, which must be one of `paths`' run folders or a moved-aside copy of one.

    The project's only deletion: whatever a caller computes, nothing outside the run it names goes.
    """
    allowed = {os.path.abspath(p) for f in paths.folders for p in (f, moved_aside(f))}
    if os.path.abspath(folder) not in allowed or Path(folder).is_symlink():
        raise UserError(f"refusing to delete {folder}: it is not a run folder of {paths.run_name}/{paths.config}/"
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
    """Whether the run has a checkpoint or results (its state: from then on it is kept)."""
    return paths.last.is_file() or paths.results.is_file()


def open_pending(paths: RunPaths, *, replace: bool) -> None:
    """Register a new run before it writes anything; with `replace` (--overwrite) first move its existing
    folders aside (`.<note>.replaced`). `run_started` makes the new run permanent (and deletes what was
    moved aside); until then `restore_replaced` undoes everything."""
    if replace:
        for folder in paths.folders:
            if folder.exists():
                remove_run_folder(moved_aside(folder), paths)  # a copy from an earlier try that is already replaced
                folder.rename(moved_aside(folder))
    _PENDING.append(_Pending(paths, tuple(f for f in paths.folders if not f.exists())))


def run_started(paths: RunPaths) -> None:
    """The new run has written its first checkpoint (or finished): the run it replaces goes for good."""
    for pending in [p for p in _PENDING if p.paths == paths]:
        _PENDING.remove(pending)
        for folder in paths.folders:
            remove_run_folder(moved_aside(folder), paths)


def _restore(paths: RunPaths, created: tuple[Path, ...]) -> None:
    for folder in paths.folders:
        if folder in created or moved_aside(folder).exists():
            remove_run_folder(folder, paths)
        if moved_aside(folder).exists():
            moved_aside(folder).rename(folder)


def restore_replaced() -> None:
    """On failure: remove what every not yet started run of this process created, and put back the runs
    their --overwrite moved aside."""
    while _PENDING:
        pending = _PENDING.pop()
        _restore(pending.paths, pending.created)


def recover_replaced(paths: RunPaths) -> bool:
    """Finish an `--overwrite` that a killed process left half-done; True if the old run came back.

    If the new run had started, the moved-aside copy is deleted; otherwise the old run is restored."""
    if not any(moved_aside(f).exists() for f in paths.folders):
        return False
    if _started(paths):
        for folder in paths.folders:
            remove_run_folder(moved_aside(folder), paths)
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
        print(f"note: restored the run in {paths.run_dir} that an interrupted --overwrite had moved aside.",
              file=sys.stderr)
    ckpt_dir = paths.checkpoint_dir
    has_state = _started(paths)
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
