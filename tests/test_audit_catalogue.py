"""The audit's catalogue of hostile or careless inputs and faults: every case ends with exit 2 and a
one-paragraph `error:` (no traceback), and nothing that existed before is lost.

Cases that fail while the config is read run in-process on a copy of a finished smoke run, with
`--overwrite` (the flag under which a late failure used to delete the finished run); faults in the
middle of a run (divergence, a failing evaluation, a full disk) are injected by monkeypatching.
Every numeric config key is also checked generically against NaN, infinity and its range.
"""
from __future__ import annotations

import math
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, copy_phase_i, run_main_in_process, run_script, script_env
from utils import run_lock
from utils.config import load_config, parse_opts
from utils.errors import UserError
from utils.json_files import write_json_atomic
from utils.layout import RunPaths
from utils.schema import SCHEMAS, schema_fields

PHASE_I = "phase_i_train_or_test.py"
PHASE_II = "phase_ii_extract_feature.py"
OFFLINE = "phase_iii_offline_train_or_test.py"
ONLINE = "phase_iii_online_train_or_test.py"
SMOKE = ["--config", "smoke", "--device", "cpu"]
RUN = Path("checkpoints/phase_i/smoke/default")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to prove that nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def finished(smoke_phase_i, tmp_path) -> Path:
    """A private copy of the finished smoke phase I run, plus a finished-looking phase III run beside it."""
    copy_phase_i(smoke_phase_i, tmp_path)
    for folder in ("checkpoints/phase_iii_offline/smoke/default", "checkpoints/phase_iii_online/smoke/default"):
        write_json_atomic(tmp_path / folder / "results.json", {"finished": True, "top1": 50.0})
    return tmp_path


def assert_clean_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert err.count("error: ") == 1 and "Traceback" not in err, err  # log lines may come first
    assert fragment in err, err


# ------------------------------------------------------------------------------------------------
# Values that used to fail only mid-run (and with --overwrite delete the finished run), or to train
# silently to garbage: all refused before anything runs
# ------------------------------------------------------------------------------------------------
CONFIG_CASES = [
    # (script, opts, fragment of the message)
    (PHASE_I, ["train.eval_every=0"], "'train.eval_every' must be >= 1"),
    (PHASE_I, ["train.schedule=step", "train.step_size=0"], "'train.step_size' must be >= 1"),
    (PHASE_I, ["train.lr=.inf"], "'train.lr' must be a finite number"),
    (PHASE_I, ["train.momentum=.nan"], "'train.momentum' must be a finite number"),
    (PHASE_I, ["train.momentum=1.5"], "'train.momentum' must be in [0, 1)"),
    (PHASE_I, ["train.warmup_epochs=.inf"], "'train.warmup_epochs' must be a finite number"),
    (PHASE_I, ["train.warmup_epochs=50"], "train.warmup_epochs (50) must be at most train.epochs (20)"),
    (PHASE_I, ["train.milestones=[-5,0]"], "'train.milestones' (every item) must be >= 1"),
    (PHASE_I, ["train.milestones=[10,5]"], "train.milestones must be strictly increasing"),
    (PHASE_I, ["train.gamma=0"], "'train.gamma' must be in (0, 1]"),
    (PHASE_I, ["seed=-1"], "'seed' must be in [0, 4294967295]"),
    (PHASE_I, ["dataset.imbalance=.nan"], "'dataset.imbalance' must be a finite number"),
    (PHASE_I, ["dataset.val.fraction=1"], "'dataset.val.fraction' must be in (0, 1)"),
    (PHASE_I, ["dataset.image_size=1"], "'dataset.image_size' must be in [8, 4096]"),
    (PHASE_I, ["distill.alpha=2"], "'distill.alpha' must be in [0, 1]"),
    (PHASE_I, ["eval.batch_size=0"], "'eval.batch_size' must be >= 1"),
    (PHASE_II, ["split.ts=.nan"], "'split.ts' must be a finite number"),
    (PHASE_II, ["confusion.nf=0"], "'confusion.nf' must be >= 1"),
    (OFFLINE, ["eval.batch_size=0"], "'eval.batch_size' must be >= 1"),
    (OFFLINE, ["finetune.momentum=.nan"], "'finetune.momentum' must be a finite number"),
    (OFFLINE, ["finetune.eval_every=0"], "'finetune.eval_every' must be >= 1"),
    (OFFLINE, ["finetune.nt=0"], "batch = 2*nt*(1+na)"),
    (OFFLINE, ["decoupled.tau_grid=[]"], "decoupled.tau_grid must list at least one tau"),
    (OFFLINE, ["decoupled.tau_grid=[-1]"], "'decoupled.tau_grid' (every item) must be >= 0"),
    (ONLINE, ["tailcalib.lr=.inf"], "'tailcalib.lr' must be a finite number"),
]


@pytest.mark.parametrize("script, opts, fragment", CONFIG_CASES, ids=[f"{s.split('_')[0]}-{' '.join(o)}" for s, o, _ in CONFIG_CASES])
def test_a_bad_value_is_refused_before_anything_runs(finished, script, opts, fragment):
    before = snapshot(finished)
    code, err = run_main_in_process(script, *SMOKE, "--overwrite", "--opts", *opts, cwd=finished)
    assert_clean_error(code, err, fragment)
    assert snapshot(finished) == before


def _numeric_fields():
    for phase in SCHEMAS:
        for key, field in schema_fields(phase).items():
            if field.numeric:
                yield phase, key, field


@pytest.mark.parametrize("phase, key, field", list(_numeric_fields()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_numeric_key_has_a_range_and_refuses_nan_inf_and_out_of_range(phase, key, field):
    assert field.range is not None, f"{phase} {key} declares no range"
    listed = isinstance(field.default, list)
    values = [".nan", ".inf", "-.inf"]
    span = field.range
    if span.low is not None:
        values.append(str(span.low if span.low_open else span.low - (1 if int in field.types or field.item_type is int else 1e-3)))
    if span.high is not None:
        values.append(str(span.high if span.high_open else span.high + (1 if int in field.types or field.item_type is int else 1e-3)))
    for value in values:
        text = f"[{value}]" if listed else value
        with pytest.raises(UserError, match=f"'{key}'"):
            load_config("smoke", phase, [f"{key}={text}"])
    if field.default is not None:  # the default itself lies inside the range
        field.coerce(field.default, key)


# ------------------------------------------------------------------------------------------------
# Config files and --opts that attack the reader
# ------------------------------------------------------------------------------------------------
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b]\n"
FILE_CASES = {
    "non-utf8": (b"seed: 0\ntrain: {lr: \xff\xfe}\n", "is not UTF-8 text"),
    "deep-nesting": (b"train: " + b"[" * 20000 + b"\n", "more than 32 levels deep"),
    "billion-laughs": (LAUGHS.encode(), "anchor or alias"),
    "self-inherit-by-path": (b"inherit: ./self-inherit-by-path.yaml\n", "inheritance cycle"),
    "huge": (b"# " + b"x" * (2 << 20) + b"\n", "a config is a few KB"),
    "not-a-mapping": (b"- 1\n- 2\n", "must hold a mapping"),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_a_hostile_config_file_is_an_error(finished, case):
    text, fragment = FILE_CASES[case]
    path = finished / f"{case}.yaml"
    path.write_bytes(text)
    before = snapshot(finished / "checkpoints")
    code, err = run_main_in_process(PHASE_I, "--config", str(path), "--device", "cpu", cwd=finished)
    assert_clean_error(code, err, fragment)
    assert snapshot(finished / "checkpoints") == before


def test_an_inherited_laugh_is_refused_at_the_parent(tmp_path):
    (tmp_path / "parent.yaml").write_text(LAUGHS)
    (tmp_path / "child.yaml").write_text("inherit: parent.yaml\n")
    with pytest.raises(UserError, match="parent.yaml uses a YAML anchor"):
        load_config(str(tmp_path / "child.yaml"), "phase_i")


@pytest.mark.parametrize("opt, fragment", [("train.lr=&a 1", "anchor"), ("train.milestones=" + "[" * 50, "levels deep")])
def test_hostile_opts_values_are_errors(opt, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_opts([opt])


def test_a_saved_config_that_is_not_utf8_stops_resume_with_a_message(finished):
    run = finished / RUN
    write_json_atomic(run / "results.json", {"finished": False})
    (run / "config.yaml").write_bytes(b"seed: \xff\n")
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--resume", cwd=finished)
    assert_clean_error(code, err, "is not UTF-8 text")
    assert "--overwrite" in err


@pytest.mark.parametrize("note", ["-rf", "--overwrite", "-"])
def test_a_note_may_not_start_with_a_dash(finished, note):
    before = snapshot(finished)
    code, err = run_main_in_process(PHASE_I, *SMOKE, f"--note={note}", cwd=finished)
    assert_clean_error(code, err, "not starting with '.' or '-'")
    assert snapshot(finished) == before


# ------------------------------------------------------------------------------------------------
# Faults in the middle of a run
# ------------------------------------------------------------------------------------------------
def _fail_at_epoch(monkeypatch, epoch: int, make_loss) -> None:
    """From epoch `epoch` (1-based) on, phase I's step returns `make_loss(real loss)`."""
    from engine import phase_i

    real_step, real_begin = phase_i.BackboneTraining.step, phase_i.BackboneTraining.begin

    def begin(self, unit):
        self.unit_now = unit
        return real_begin(self, unit)

    def step(self, batch):
        out = real_step(self, batch)
        if self.unit_now + 1 >= epoch:
            out.loss = make_loss(out.loss)
        return out

    monkeypatch.setattr(phase_i.BackboneTraining, "begin", begin)
    monkeypatch.setattr(phase_i.BackboneTraining, "step", step)


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _fail_at_epoch(monkeypatch, 2, lambda loss: loss * float("nan"))
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--opts", "train.epochs=3", cwd=tmp_path)
    assert_clean_error(code, err, "training diverged: the loss became NaN or infinite in epoch 2 (batch 1 of")
    assert "last.pt of epoch 1, is kept" in err and "train.lr" in err
    run = tmp_path / RUN
    for name in ("last.pt", "best_model.pt"):
        state = torch.load(run / name, weights_only=True)
        assert state["epoch"] == 1
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), name
    assert not (run / "results.json").read_text().count('"finished": true')


def test_a_learning_rate_that_explodes_is_caught_by_the_real_training(finished):
    """No injection: lr 1e6 drives the smoke model to NaN within the first epoch."""
    before = snapshot(finished)
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--overwrite", "--opts", "train.lr=1e6", "train.epochs=2",
                                    cwd=finished)
    assert_clean_error(code, err, "training diverged")
    assert "No checkpoint of this run had been written" in err
    assert snapshot(finished) == before  # --overwrite put the old run back


@pytest.mark.parametrize("fault", [RuntimeError("boom in evaluation"), ZeroDivisionError("integer modulo by zero")])
def test_overwrite_restores_the_old_run_when_the_new_one_fails_before_its_first_checkpoint(finished, monkeypatch, fault):
    from engine import phase_i

    def evaluate(self):
        raise fault

    monkeypatch.setattr(phase_i.BackboneTraining, "evaluate", evaluate)
    before = snapshot(finished)
    with pytest.raises(type(fault)):  # a bug's traceback still reaches the user ...
        run_main_in_process(PHASE_I, *SMOKE, "--overwrite", "--opts", "train.epochs=2", cwd=finished)
    assert snapshot(finished) == before  # ... and the finished run is back, byte for byte
    assert not list(finished.rglob("*.replaced"))


def test_overwrite_removes_the_old_run_once_the_new_one_has_a_checkpoint(finished, monkeypatch):
    _fail_at_epoch(monkeypatch, 2, lambda loss: loss * float("inf"))
    old_last = (finished / RUN / "last.pt").read_bytes()
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--overwrite", "--opts", "train.epochs=3", cwd=finished)
    assert_clean_error(code, err, "training diverged")
    assert (finished / RUN / "last.pt").read_bytes() != old_last
    assert torch.load(finished / RUN / "last.pt", weights_only=True)["epoch"] == 1
    assert not list(finished.rglob("*.replaced"))


def test_a_fresh_run_that_fails_in_set_up_leaves_no_files(tmp_path):
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--opts", "dataset.name=list", "dataset.train_list=/nowhere/a.txt",
                                    "dataset.test_list=/nowhere/b.txt", "dataset.root=/nowhere", cwd=tmp_path)
    assert code == 2 and "Traceback" not in err, err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], list(tmp_path.rglob("*"))


def test_a_full_disk_while_saving_is_an_error_that_leaves_no_temporary_file(tmp_path, monkeypatch):
    import utils.checkpoint

    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 3:  # epoch 2's best_model.pt: epoch 1's checkpoints exist
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(utils.checkpoint.torch, "save", save)
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--opts", "train.epochs=3", cwd=tmp_path)
    assert_clean_error(code, err, "cannot write the checkpoint")
    assert "PytorchStreamWriter failed writing file" in err and "--resume" in err
    run = tmp_path / RUN
    assert not list(run.glob(".*.tmp"))
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1  # the last good one, intact


def test_resume_of_a_last_pt_without_optimizer_state_is_an_error(finished):
    run = finished / RUN
    state = torch.load(run / "last.pt", weights_only=True)
    state.pop("optimizer")
    torch.save(state, run / "last.pt")
    write_json_atomic(run / "results.json", {"finished": False})
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--resume", cwd=finished)
    assert_clean_error(code, err, "holds no optimizer state")
    assert "--overwrite" in err


# ------------------------------------------------------------------------------------------------
# Locks and the commands that messages suggest
# ------------------------------------------------------------------------------------------------
def test_a_lock_held_for_a_dead_process_says_so():
    proc = subprocess.Popen(["true"])
    proc.wait()  # a pid that has ended
    holder = f"process {proc.pid} on {socket.gethostname()} (since 2026-01-01 00:00:00: x)"
    assert "has ended" in run_lock._liveness(holder)
    assert run_lock._liveness(f"process {os.getpid()} on {socket.gethostname()} (since x)") == ", which is running"
    assert run_lock._liveness("process 1 on some-other-host (since x)") == ""


def test_dataloader_workers_do_not_hold_the_run_lock(tmp_path):
    """A worker forked while the run's lock is held closes its copy: the lock dies with the parent
    (`kill -9` of the parent is simulated by closing its descriptor without the clean-up)."""
    import fcntl

    from datasets.loader import _detach_worker

    paths = RunPaths("phase_i", "smoke", "default", tmp_path)
    run_lock.lock_run(paths)
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # the "worker": detach, say so, then outlive the parent's descriptor
        try:
            _detach_worker(0, parent=os.getppid())
            os.write(ready_w, b"x")
            time.sleep(5)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        held = run_lock._HELD_LOCKS.popitem()[1]
        os.close(held.fd)  # the parent is gone; its lock file stays, as after kill -9
        fd = os.open(paths.lock_file, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free although the worker still lives
        finally:
            os.close(fd)
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        run_lock.release_locks()


def _suggested(err: str, flag: str) -> list[str]:
    """The command in parentheses that a message suggests, ending with `flag`."""
    start = err.index("(python ") + 1
    end = err.index(f"{flag})", start) + len(flag)
    return shlex.split(err[start:end])


@pytest.mark.parametrize("state, flag", [("finished", "--overwrite"), ("interrupted", "--resume")])
def test_every_suggested_command_runs_as_printed(finished, state, flag):
    """The messages name a command with the user's own --opts; run exactly that and it succeeds."""
    opts = ["--opts", "train.epochs=1", "train.lr=0.02"]
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--note", "n1", *opts, cwd=finished)
    assert code == 0, err
    if state == "interrupted":
        write_json_atomic(finished / "checkpoints/phase_i/smoke/n1/results.json", {"finished": False})
    proc = run_script(PHASE_I, *SMOKE, "--note", "n1", *opts, cwd=finished, check=False)
    assert proc.returncode == 2, proc.stderr
    command = _suggested(proc.stderr, flag)
    assert command[:2] == ["python", PHASE_I] and "train.lr=0.02" in command
    done = subprocess.run([sys.executable, str(REPO / command[1]), *command[2:]], cwd=finished, env=script_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert load_config(str(finished / "checkpoints/phase_i/smoke/n1/config.yaml"), "phase_i")["train"]["lr"] == 0.02


def test_a_repeated_opts_adds_to_the_first():
    from utils.cli import training_parser

    args = training_parser("x").parse_args(["--config", "smoke", "--opts", "a=1", "--overwrite", "--opts", "b=2"])
    assert args.opts == ["a=1", "b=2"] and args.overwrite
    assert training_parser("x").parse_args(["--config", "smoke"]).opts == []


def test_nan_and_inf_are_never_in_a_range():
    from utils.fields import Range

    for span in (Range(0, None), Range(None, 1), Range(0, 1, True, True)):
        assert not span.contains(math.nan)
