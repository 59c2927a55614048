"""How many CPU threads PyTorch's operations use: the ``accel.threads`` setting of every phase.

    accel:
      threads: auto   # or a whole number: exactly that many

Why a policy. PyTorch splits an operation over its OpenMP threads, and the threads wait for each other
at the operation's end. When another process keeps a core busy, the thread sharing that core runs only
part of the time while the others wait for it at every operation, so a step of many small operations
slows down many-fold. Measured on this project's 2-core machine beside one busy process (benchmarks/
README.md): a feature classifier's training step 3.2x slower than quiet with 2 threads, 1.0x with 1
thread; a ResNet-20 bf16 training step 4.2x with 2 threads, 2.0x with 1.

``auto`` (the default): ``OMP_NUM_THREADS`` when the environment sets it (a job scheduler's or the
user's explicit choice: fixed); else the usable cores -- the CPUs this process may run on (its affinity),
at most the container's CPU quota (cgroup ``cpu.max``), shared evenly by the torchrun processes of this
machine -- minus the cores other processes keep busy, at least 1. The load is read from ``/proc/stat`` and
re-measured while the run goes on (:func:`tick`, called by every long loop: ``engine.loops.progress``),
so a run takes the cores back when its neighbour stops. Where there is no ``/proc`` the usable cores
are used throughout. With ``determinism: true`` auto stays at the usable cores: a floating-point sum
split over another number of threads may differ in its last bits, and a deterministic run must not
depend on its neighbours. A number fixes the thread count whatever the load.

What a run used is recorded in its results.json (``provenance.threads``: the setting, the usable
cores, and the seconds spent at each thread count).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

from utils.errors import UserError

FIRST_CHECK_S = 0.5  # the first load reading after a run starts (short steps must adapt too)
CHECK_EVERY_S = 2.0  # later readings: a /proc/stat read costs microseconds, but a thread change is not free
_PROC_STAT = Path("/proc/stat")
_PROC_SELF_STAT = Path("/proc/self/stat")


def parse_setting(value: str | int, key: str = "accel.threads") -> str | int:
    """``'auto'`` or a whole number >= 1 (a UserError naming `key` otherwise)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise UserError(f"Config key '{key}' must be auto or a whole number of threads >= 1, got {value!r}. auto uses "
                    f"the cores this process may run on that other processes leave idle.")


def _allowed_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The container's CPU quota in cores (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None without one."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores(local_processes: int = 1, *, cpus: list[int] | None = None, quota: float | None = None) -> int:
    """The cores one of `local_processes` processes of this machine may use: its affinity, at most the
    quota (rounded down, at least 1), split evenly; at least 1."""
    cpus = _allowed_cpus() if cpus is None else cpus
    count = len(cpus)
    if quota is not None:
        count = min(count, max(1, math.floor(quota)))
    return max(1, count // max(1, local_processes))


def _environment_threads() -> int | None:
    """OMP_NUM_THREADS as a whole number >= 1, None when unset or not such a number."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


def _busy_ticks(cpus: list[int]) -> int | None:
    """Clock ticks the CPUs `cpus` spent busy (user, nice, system, irq, softirq, steal) since boot; None
    without /proc/stat."""
    try:
        lines = _PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    wanted, total = set(cpus), 0
    for line in lines:
        if not (line.startswith("cpu") and line[3:4].isdigit()):
            continue
        name, *values = line.split()
        if int(name[3:]) in wanted:
            v = [int(x) for x in values] + [0] * 8
            total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    return total


def _own_ticks() -> int | None:
    """Clock ticks this process (all its threads) has run, user + system; None without /proc."""
    try:
        fields = _PROC_SELF_STAT.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)


def _set_torch_threads(count: int) -> None:
    import torch  # here, not at import: the config schema imports this module, and reading a config needs no torch

    torch.set_num_threads(count)


def threads_for(others_busy: float, cpus: int, usable: int) -> int:
    """The thread count beside `others_busy` cores of other processes' work on `cpus` CPUs: the idle
    cores (rounded to nearest), at most `usable`, at least 1."""
    return max(1, min(usable, int(cpus - others_busy + 0.5)))


class ThreadPolicy:
    """The process's thread policy (one per process: :func:`apply` sets it for each run)."""

    def __init__(self, setting: str | int, *, local_processes: int = 1, fixed: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.setting = parse_setting(setting)
        self.cpus = _allowed_cpus()
        self.usable = usable_cores(local_processes, cpus=self.cpus, quota=_cgroup_quota())
        environment = _environment_threads()
        if self.setting == "auto" and environment is not None:
            self.usable, fixed = environment, True
        self.adaptive = self.setting == "auto" and not fixed
        self.clock = clock
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.current = self.usable if self.setting == "auto" else int(self.setting)
        self.seconds: dict[int, float] = {}
        self._since = self._checked = clock()
        self._next = self._since + FIRST_CHECK_S
        self._sample = self._read()
        _set_torch_threads(self.current)

    def _read(self) -> tuple[int, int] | None:
        busy, own = _busy_ticks(self.cpus), _own_ticks()
        return None if busy is None or own is None else (busy, own)

    def tick(self) -> None:
        """Re-measure the load when it is time (cheap otherwise) and follow it (auto only)."""
        now = self.clock()
        if not self.adaptive or now < self._next:
            return
        sample = self._read()
        if sample is None or self._sample is None:
            self.adaptive = False
            return
        wall = now - self._checked
        others = max(0.0, ((sample[0] - self._sample[0]) - (sample[1] - self._sample[1])) / (wall * self.hz))
        self._sample, self._checked, self._next = sample, now, now + CHECK_EVERY_S
        self.set(threads_for(others, len(self.cpus), self.usable), now)

    def set(self, threads: int, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if threads == self.current:
            return
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self._since
        self.current, self._since = threads, now
        _set_torch_threads(threads)

    def summary(self) -> dict:
        """The setting, the usable cores and the seconds spent at each thread count so far."""
        seconds = dict(self.seconds)
        seconds[self.current] = seconds.get(self.current, 0.0) + self.clock() - self._since
        return {"setting": self.setting, "usable_cores": self.usable, "adaptive": self.adaptive,
                "seconds_at": {str(k): round(v, 1) for k, v in sorted(seconds.items())}}


_policy: ThreadPolicy | None = None


def apply(setting: str | int, *, fixed: bool = False) -> ThreadPolicy:
    """Set this process's thread policy for the run it opens (``utils.provenance.begin_run``)."""
    global _policy
    _policy = ThreadPolicy(setting, local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), fixed=fixed)
    return _policy


def tick() -> None:
    """Follow the load if this process's policy adapts (a no-op before :func:`apply`)."""
    if _policy is not None:
        _policy.tick()


def summary() -> dict | None:
    """What the policy of the run now open chose (None before :func:`apply`)."""
    return None if _policy is None else _policy.summary()
