"""Where a result comes from: the ``provenance`` object of every ``results.json``.

    git_commit, git_dirty    the checkout's HEAD and whether tracked files differ from it (null: not a
                             git checkout, or git missing / failing)
    command                  this process's command line, interpreter first
    python, torch, torchvision, cuda, cudnn   versions (cuda / cudnn null where torch has none)
    device, device_name, host                 what computed it: "cpu" / "cuda:0", the CPU or GPU model
    started, finished        ISO 8601 local time, seconds
    deterministic            whether torch's deterministic mode was on (the ``determinism`` config key)
    accel                    the run's autocast dtype and channels-last as computed (``auto`` resolved:
                             utils.device.resolve_accel)
    threads                  the CPU thread policy and what it used (utils/threads.py)
    resumed                  whether this process continued an interrupted run

A run marks its start with :func:`begin_run` when it opens (training runs: ``engine.recorder.open_run``),
which also applies its ``determinism`` setting and its thread policy. ``started`` is this process's start of the run: a
resumed run says ``resumed: true`` and its ``started`` is when the resume began (the first attempt's
start is in its log.txt); a run that noted no start (a ``phase: test`` evaluation) gives the start of
this process.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import platform
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import torch

from utils import threads
from utils.device import device_in_use, resolve_accel
from utils.errors import UserError
from utils.seeding import set_determinism

REPO_ROOT = Path(__file__).resolve().parent.parent
GIT_TIMEOUT_S = 5.0


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


_PROCESS_STARTED = _now()   # when the toolkit was imported: a run that noted no start of its own
_run_started: str | None = None  # the start begin_run noted for the run now open, until its provenance is taken
_run_accel: dict = {}  # the accel section of the run begin_run opened last


def begin_run(cfg: dict) -> None:
    """Open a run of `cfg`: refuse settings that cannot go together, apply its ``determinism``
    (:func:`utils.seeding.set_determinism`) and its thread policy (:func:`utils.threads.apply`), and note
    its start. Call it on every process of the run, before the run builds models or moves data to a GPU."""
    global _run_started, _run_accel
    deterministic = bool(cfg.get("determinism", False))
    if deterministic and cfg.get("accel", {}).get("compile"):
        # torch's switch covers eager kernels; the kernels torch.compile generates and tunes are not bound by it
        raise UserError("determinism: true cannot be combined with accel.compile: true: torch.compile's generated "
                        "kernels are outside torch's deterministic mode, so reruns could differ. Set "
                        "accel.compile=false for a reproducible run, or determinism=false for the compiled speed.")
    set_determinism(deterministic)
    _run_accel = dict(cfg.get("accel", {}))
    threads.apply(_run_accel.get("threads", "auto"), fixed=deterministic)
    _run_started = _now()


def git_state(root: Path = REPO_ROOT) -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it) of the checkout at `root`; None for what git
    cannot tell (not a checkout, git missing, too slow)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=GIT_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return (head.strip() if head else None), (None if status is None else bool(status.strip()))


def _torchvision_version() -> str | None:
    """torchvision.__version__ (with its build tag, e.g. +cu130), read from the package's version.py without
    importing torchvision, whose import costs every process about 1.5 s; the installed distribution's
    version where that file cannot be read."""
    try:
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            return None
        text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        return found[1] if found else importlib.metadata.version("torchvision")
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(*, resumed: bool = False) -> dict:
    """The provenance of the run this process is finishing now (see the module docstring); it takes the
    start :func:`begin_run` noted, so the next run of this process (the pipeline's next step) notes its own."""
    global _run_started
    started, _run_started = _run_started or _PROCESS_STARTED, None
    commit, dirty = git_state()
    device = device_in_use()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _torchvision_version(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),  # None without cuDNN
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "host": socket.gethostname(),
        "started": started,
        "finished": _now(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "accel": dict(zip(("amp", "channels_last"), resolve_accel(_run_accel, device))),
        "threads": threads.summary(),
        "resumed": resumed,
    }


def changes_since(recorded: dict | None, now: tuple[str | None, bool | None]) -> list[str]:
    """How the code behind a result (`recorded`: its results.json's provenance, None for a result made
    before provenance was recorded) differs from the checkout's `now` (:func:`git_state`), in words:
    ``made by commit abc1234, now def5678``, ``made with a dirty tree``; [] when nothing is known to differ."""
    if not recorded:
        return []
    out = []
    commit, head = recorded.get("git_commit"), now[0]
    if commit and head and commit != head:
        out.append(f"made by commit {commit[:7]}, now {head[:7]}")
    if recorded.get("git_dirty"):
        out.append("made with a dirty tree")
    return out
