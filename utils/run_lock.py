"""One process per run: an OS file lock beside the run folder, held for the life of the process.

`lock_run` holds an flock on the run's lock file (`RunPaths.lock_file`, ``.<note>.lock`` beside its
main folder) until the process ends or calls `release_locks`, which removes the file. A second process
on a live run is refused with an error naming the holder; since the lock dies with its process,
`kill -9` leaves no stale lock.
"""
from __future__ import annotations

import fcntl
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from utils import distributed
from utils.errors import UserError
from utils.layout import RunPaths


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
                f"The run {paths.run_dir} is in use by {holder}{_liveness(holder)}. One process per run: wait for "
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
