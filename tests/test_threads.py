"""The CPU thread policy (accel.threads, utils/threads.py) and the accel auto settings (utils.device.resolve_accel)."""
from __future__ import annotations

import time

import pytest
import torch

from engine import loops
from engine.accel import Accel
from utils import device as device_mod, provenance, threads
from utils.config import load_config
from utils.errors import UserError

CPU = torch.device("cpu")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    threads._policy = None


# ------------------------------------------------------------------------------------------------
# How many threads, from the load (hand-computed cases)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("others, cpus, usable, expected", [
    (0.0, 2, 2, 2),     # quiet 2-core machine: both cores
    (0.4, 2, 2, 2),     # a neighbour at 40%: 1.6 idle cores round to 2
    (0.67, 2, 2, 1),    # one busy process beside our 2 threads gets 2/3 of a core: 1.33 idle -> 1
    (1.0, 2, 2, 1),     # one busy process: one idle core
    (3.0, 2, 2, 1),     # overloaded: never fewer than 1
    (30.0, 64, 2, 2),   # a big shared host with a 2-core quota: the quota caps
    (62.6, 64, 8, 1),
    (0.0, 8, 3, 3),
])
def test_threads_follow_the_idle_cores(others, cpus, usable, expected):
    assert threads.threads_for(others, cpus, usable) == expected


@pytest.mark.parametrize("cpus, quota, processes, expected", [
    (8, None, 1, 8), (8, 2.5, 1, 2), (8, 0.5, 1, 1), (8, None, 2, 4), (8, None, 3, 2), (2, None, 4, 1), (8, 16.0, 1, 8),
])
def test_usable_cores_are_affinity_capped_by_quota_and_shared_by_local_processes(cpus, quota, processes, expected):
    assert threads.usable_cores(processes, cpus=list(range(cpus)), quota=quota) == expected


def test_cgroup_quota_reads_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads._cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert threads._cgroup_quota(tmp_path) == 2.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads._cgroup_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads._cgroup_quota(v1) is None


class _FakeMachine:
    """A clock and /proc counters: 2 CPUs at 100 ticks/s, this process and a neighbour."""

    def __init__(self):
        self.now, self.busy, self.own = 0.0, 0, 0

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.now += seconds
        self.own += round(own_cores * seconds * 100)
        self.busy += round((own_cores + other_cores) * seconds * 100)


def _policy(monkeypatch, machine: _FakeMachine, setting="auto", fixed=False) -> threads.ThreadPolicy:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_allowed_cpus", lambda: [0, 1])
    monkeypatch.setattr(threads, "_cgroup_quota", lambda root=None: None)
    monkeypatch.setattr(threads, "_busy_ticks", lambda cpus: machine.busy)
    monkeypatch.setattr(threads, "_own_ticks", lambda: machine.own)
    policy = threads.ThreadPolicy(setting, fixed=fixed, clock=lambda: machine.now)
    policy.hz = 100
    return policy


def test_auto_gives_a_core_to_a_busy_neighbour_and_takes_it_back(monkeypatch, restore_threads):
    machine = _FakeMachine()
    policy = _policy(monkeypatch, machine)
    assert policy.current == 2 and torch.get_num_threads() == 2
    machine.run(0.4, own_cores=1.33, other_cores=0.67)
    policy.tick()                      # before the first check: nothing measured yet
    assert policy.current == 2
    machine.run(0.2, own_cores=1.33, other_cores=0.67)
    policy.tick()                      # 0.6 s: a neighbour holds 0.67 of a core -> 1 thread
    assert policy.current == 1 and torch.get_num_threads() == 1
    machine.run(1.0, own_cores=1.0, other_cores=1.0)
    policy.tick()                      # within 2 s of the last check: not re-measured
    assert policy.current == 1
    machine.run(1.5, own_cores=1.0, other_cores=1.0)
    policy.tick()
    assert policy.current == 1         # still busy
    machine.run(2.0, own_cores=1.0, other_cores=0.0)
    policy.tick()                      # the neighbour stopped: both cores again
    assert policy.current == 2 and torch.get_num_threads() == 2
    machine.run(1.0, own_cores=2.0, other_cores=0.0)
    assert policy.summary() == {"setting": "auto", "usable_cores": 2, "adaptive": True,
                                "seconds_at": {"1": 4.5, "2": 1.6}}


@pytest.mark.parametrize("setting, fixed, expected", [("auto", True, 2), (1, False, 1), (2, False, 2)])
def test_fixed_counts_and_determinism_ignore_the_load(monkeypatch, restore_threads, setting, fixed, expected):
    machine = _FakeMachine()
    policy = _policy(monkeypatch, machine, setting, fixed)
    for _ in range(5):
        machine.run(2.5, own_cores=1.0, other_cores=1.0)
        policy.tick()
    assert policy.current == expected == torch.get_num_threads() and not policy.adaptive


def test_omp_num_threads_in_the_environment_fixes_auto(monkeypatch, restore_threads):
    machine = _FakeMachine()
    policy = _policy(monkeypatch, machine)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    policy = threads.ThreadPolicy("auto", clock=lambda: machine.now)
    assert policy.current == 1 and not policy.adaptive and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "x")  # not a number: ignored, auto adapts
    assert threads.ThreadPolicy("auto", clock=lambda: machine.now).adaptive
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.ThreadPolicy(2, clock=lambda: machine.now).current == 2  # a number in the config wins


def test_real_counters_move_with_work():
    cpus = threads._allowed_cpus()
    busy, own = threads._busy_ticks(cpus), threads._own_ticks()
    if busy is None or own is None:
        pytest.skip("no /proc on this system")
    end = time.process_time() + 0.1
    while time.process_time() < end:
        pass
    assert threads._own_ticks() >= own + 5 and threads._busy_ticks(cpus) >= busy + 5


def test_every_long_loop_lets_the_policy_follow_the_load(monkeypatch):
    calls = []
    monkeypatch.setattr(threads, "tick", lambda: calls.append(1))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert list(loops.progress(range(7), "x")) == list(range(7)) and len(calls) == 7
    monkeypatch.delenv("TQDM_DISABLE")
    calls.clear()
    assert list(loops.progress(range(5), "x")) == list(range(5)) and len(calls) == 5


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt, message", [
    ("accel.threads=0", r"accel.threads' must be in \[1, 4096\]"),
    ("accel.threads=fast", "must be auto or a whole number"),
    ("accel.channels_last=maybe", "channels_last' must be one of"),
    ("accel.amp=fp8", "accel.amp' must be one of"),
])
def test_bad_accel_settings_are_refused_when_the_config_is_read(opt, message):
    with pytest.raises(UserError, match=message):
        load_config("smoke", "phase_i", [opt])


def test_accel_defaults_are_auto_and_numbers_are_accepted():
    cfg = load_config("smoke", "phase_iii", ["accel.threads=3"])
    assert cfg["accel"]["threads"] == 3 and cfg["accel"]["amp"] == "auto" and cfg["accel"]["channels_last"] == "auto"


@pytest.mark.parametrize("fast, section, expected", [
    (True, {"amp": "auto", "channels_last": "auto"}, ("bf16", True)),
    (False, {"amp": "auto", "channels_last": "auto"}, ("none", False)),
    (True, {"amp": "none", "channels_last": "auto"}, ("none", False)),   # float32 one setting away
    (True, {"amp": "none", "channels_last": True}, ("none", True)),
    (False, {"amp": "bf16", "channels_last": "auto"}, ("bf16", True)),   # asked for: given
    (True, {"amp": "auto", "channels_last": False}, ("bf16", False)),
])
def test_auto_resolves_to_bf16_and_channels_last_where_bf16_is_fast(monkeypatch, fast, section, expected):
    monkeypatch.setattr(device_mod, "bf16_is_fast", lambda dev: fast)
    assert device_mod.resolve_accel(section, CPU) == expected
    accel = Accel.from_config({**section, "compile": False}, CPU)
    assert (accel.amp, accel.channels_last) == expected


def test_bf16_speed_probe_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not device_mod.bf16_is_fast(CPU)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert device_mod.bf16_is_fast(CPU)


def test_provenance_records_the_resolved_accel_and_the_threads_used(monkeypatch, restore_threads):
    monkeypatch.setattr(device_mod, "bf16_is_fast", lambda dev: True)
    monkeypatch.setattr(device_mod, "_resolved", CPU)
    provenance.begin_run({"accel": {"amp": "auto", "channels_last": "auto", "threads": 1}})
    record = provenance.collect()
    assert record["accel"] == {"amp": "bf16", "channels_last": True}
    assert record["threads"]["setting"] == 1 and set(record["threads"]["seconds_at"]) == {"1"}
    assert torch.get_num_threads() == 1
