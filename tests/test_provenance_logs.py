"""Quiet logs off a terminal, the provenance of every results.json, and the determinism switch."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from engine import loops
from engine.loops import PlainProgress, progress_display
from engine.methods import METHODS
from app.steps import Step, skip_notes, step_opts
from engine.recorder import open_run, saved_config_differences
from tests.helpers import REPO, script_command, script_env
from utils import device, provenance
from utils.config import dump_config, load_config
from utils.errors import UserError
from utils.layout import RunPaths

PIPED_OPTS = ("train.epochs=1", "dataset.synthetic.train_per_class=20", "dataset.synthetic.test_per_class=6")
PROVENANCE_KEYS = {"git_commit", "git_dirty", "command", "python", "torch", "torchvision", "cuda", "cudnn", "device",
                   "device_name", "host", "started", "finished", "deterministic", "accel", "threads", "resumed"}


def _head() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# ------------------------------------------------------------------------------------------------
# Progress display
# ------------------------------------------------------------------------------------------------
def _lines(items, seconds_per_item: float, capsys) -> list[str]:
    """The stderr lines of iterating `items` (100 of them, or 1000) when each takes `seconds_per_item`."""
    ticks = iter(range(10**6))
    clock = lambda: next(ticks) * seconds_per_item  # noqa: E731
    assert len(list(PlainProgress(items, "epoch 1/9", clock=clock))) in (100, 1000)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    return err.splitlines()


def test_plain_progress_prints_a_bounded_number_of_lines(capsys):
    # slow batches: a line every 10% of the loop, none at its end
    lines = _lines(range(1000), 1.0, capsys)
    assert len(lines) == 9 and lines[0].endswith("epoch 1/9: 100/1000 (10%), 100 s, about 900 s left"), lines
    assert len(_lines(range(1000), 500.0, capsys)) == 9  # however slow: 10% of the loop between lines
    assert _lines(range(1000), 0.01, capsys) == []  # a 10-second loop: nothing but its log line
    # no length: a line every 30 s
    assert [line.split(" ", 1)[1] for line in _lines(iter(range(100)), 1.0, capsys)] == [
        "epoch 1/9: 30, 30 s", "epoch 1/9: 60, 60 s", "epoch 1/9: 90, 90 s"]


class _Stderr:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def test_progress_draws_a_bar_only_on_a_terminal(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(loops.sys, "stderr", _Stderr(tty=True))
    bar = progress_display(items, "eval")
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setattr(loops.sys, "stderr", _Stderr(tty=False))
    assert isinstance(progress_display(items, "eval"), PlainProgress)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_display(items, "eval") is items


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A one-epoch smoke phase I on a fifth of its images, with stdout and stderr to pipes and TQDM_DISABLE
    unset, as in `python pipeline.py --config smoke > out 2> err`."""
    cwd = tmp_path_factory.mktemp("piped")
    env = script_env()
    del env["TQDM_DISABLE"]
    proc = subprocess.run(script_command("phase_i_train_or_test.py", "--config", "smoke", "--device", "cpu",
                                         "--opts", *PIPED_OPTS),
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


def test_piped_output_has_no_bar_redraws(piped_run):
    _, proc = piped_run
    for stream in (proc.stdout, proc.stderr):
        assert "\r" not in stream and "\x1b" not in stream, stream[-2000:]
    assert "epoch 1/1 " in proc.stderr and "finished: test top1" in proc.stderr  # the log lines stay


# ------------------------------------------------------------------------------------------------
# Provenance
# ------------------------------------------------------------------------------------------------
def test_results_json_records_its_provenance(piped_run):
    cwd, _ = piped_run
    record = json.loads((cwd / "checkpoints/phase_i/smoke/default/results.json").read_text())["provenance"]
    assert set(record) == PROVENANCE_KEYS
    head = _head()
    if head is None:
        pytest.skip("the repository is not a git checkout here")
    assert record["git_commit"] == head and isinstance(record["git_dirty"], bool)
    opts = " ".join(PIPED_OPTS)
    assert record["command"].endswith(f"phase_i_train_or_test.py --config smoke --device cpu --opts {opts}")
    assert record["device"] == "cpu" and record["torch"] == torch.__version__
    assert record["deterministic"] is False and record["resumed"] is False
    assert record["started"] <= record["finished"] and record["started"][10] == "T"
    assert record["accel"] == dict(zip(("amp", "channels_last"), device.resolve_accel({"amp": "auto", "channels_last": "auto"},
                                                                                   torch.device("cpu"))))
    # the scripts' environment sets OMP_NUM_THREADS=2 (tests/helpers.script_env): auto keeps it, fixed
    assert record["threads"]["setting"] == "auto" and record["threads"]["usable_cores"] == 2
    assert not record["threads"]["adaptive"] and set(record["threads"]["seconds_at"]) == {"2"}


def test_provenance_device_is_the_one_resolved(monkeypatch):
    monkeypatch.setattr(device, "_resolved", None)  # put back after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device.resolve_device("1") == device.device_in_use() == torch.device("cuda", 1)
    assert device.resolve_device("cpu") == device.device_in_use() == torch.device("cpu")


def test_git_state_is_null_outside_a_checkout(tmp_path):
    assert provenance.git_state(tmp_path) == (None, None)


def test_collect_takes_the_start_of_the_open_run(torch_determinism, monkeypatch):
    monkeypatch.setattr(provenance, "_PROCESS_STARTED", "(process start)")
    provenance.begin_run({})
    noted = provenance._run_started
    assert noted != "(process start)" and provenance.collect(resumed=True)["started"] == noted
    # taken: a run of this process that notes no start of its own gets the process's start
    assert provenance.collect()["started"] == provenance._PROCESS_STARTED


def test_changes_since_names_the_commit_and_a_dirty_tree():
    made = {"git_commit": "a" * 40, "git_dirty": True}
    assert provenance.changes_since(made, ("b" * 40, False)) == ["made by commit aaaaaaa, now bbbbbbb",
                                                                  "made with a dirty tree"]
    assert provenance.changes_since({"git_commit": "b" * 40, "git_dirty": False}, ("b" * 40, True)) == []
    assert provenance.changes_since(None, ("b" * 40, False)) == []  # made before provenance was recorded


def test_pipeline_skip_notes_say_what_changed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "checkpoints/phase_i/smoke/default"
    run.mkdir(parents=True)
    made = load_config("smoke", "phase_i", ["train.lr=0.2", "accel.channels_last=true"])
    dump_config(made, run / "config.yaml")
    results = run / "results.json"
    results.write_text(json.dumps({"finished": True, "provenance": {"git_commit": "a" * 40, "git_dirty": True}}))
    notes = skip_notes(Step("phase_i", "phase I"), "smoke", "smoke", "default", [], results, ("b" * 40, False))
    # the speed setting is no change to the results
    assert notes == ["made by commit aaaaaaa, now bbbbbbb", "made with a dirty tree",
                     "made with other settings than now: train.lr"]
    # phase III with finetune.iterations: null, which the run resolved into a number: no change
    step = Step("phase_iii", "phase III FSA offline", METHODS.arm("fsa_offline"))
    args = step_opts(step, {"phase_iii": ["finetune.iterations=null"]})
    run = tmp_path / "checkpoints/phase_iii_offline/smoke/default"
    run.mkdir(parents=True)
    dump_config(load_config("smoke", "phase_iii", [*args, "finetune.iterations=123"]), run / "config.yaml")
    assert skip_notes(step, "smoke", "smoke", "default", args, run / "results.json", (None, None)) == []


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def torch_determinism(monkeypatch):
    """Put torch's deterministic settings (and CUBLAS_WORKSPACE_CONFIG) back as they were; the CPU as the
    device this process resolved (test_device resolves GPUs it only pretends to have)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(device, "_resolved", torch.device("cpu"))
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]
    provenance._run_started = None


def test_determinism_key_switches_torch_on_and_off(torch_determinism, tmp_path):
    torch.backends.cudnn.benchmark = True
    cfg = load_config("smoke", "phase_i", ["determinism=true"])
    # where training runs apply it: when the run opens
    open_run(RunPaths("phase_i", "smoke", "default", tmp_path), cfg, resume=False, overwrite=False, command="cmd")
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert provenance.collect()["deterministic"] is True
    provenance.begin_run({"determinism": False})  # the pipeline's next step, without it
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_determinism_refuses_compile(torch_determinism):
    with pytest.raises(UserError, match="accel.compile"):
        provenance.begin_run({"determinism": True, "accel": {"compile": True}})
    assert not torch.are_deterministic_algorithms_enabled()  # refused before anything was switched


def test_resume_may_change_speed_settings_only_without_determinism():
    saved = load_config("smoke", "phase_i")
    del saved["determinism"]  # a run saved before the key existed ran without it
    faster = load_config("smoke", "phase_i", ["accel.channels_last=true"])
    assert saved_config_differences(saved, faster) == []
    assert saved_config_differences(saved, {**faster, "determinism": True}) == ["accel.channels_last", "determinism"]
