"""Nothing lost, nothing touched outside its run: safe run names, the one deletion, --overwrite that
restores the old run on failure, one process per run folder, and errors instead of tracebacks."""
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, copy_phase_i, run_main_in_process, script_command, script_env
from utils.checkpoint import save_checkpoint
from utils.cli import script_command as user_command
from utils.errors import UserError
from utils import run_dir
from utils.json_files import write_json_atomic
from utils.layout import RunPaths, check_run_name
from utils.run_dir import open_pending, prepare_run, recover_replaced, remove_run_folder, restore_replaced, run_started
from utils.run_lock import lock_run, release_locks

PHASE_I = "phase_i_train_or_test.py"
SMOKE = ["--config", "smoke", "--device", "cpu"]
QUICK = ["--opts", "train.epochs=1"]
BAD_NOTES = ["", ".", "..", "/some/other/folder", "a/b", ".hidden", "x" * 101, "semi;colon"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to prove nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def finished_run(smoke_phase_i, tmp_path) -> Path:
    """A private copy of the session's finished smoke phase I run, and a bystander folder outside it."""
    copy_phase_i(smoke_phase_i, tmp_path)
    bystander = tmp_path / "some/other/folder"
    bystander.mkdir(parents=True)
    (bystander / "precious.txt").write_text("keep me")
    return tmp_path


# ------------------------------------------------------------------------------------------------
# Run names and the one deletion
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("note", BAD_NOTES)
def test_bad_notes_are_refused(note):
    with pytest.raises(UserError, match="cannot name a run folder"):
        RunPaths("phase_i", "smoke", note)


@pytest.mark.parametrize("good", ["default", "seed0", "lr-0.1_bs.128", "A" * 100])
def test_good_notes_are_accepted(good):
    assert check_run_name(good, "--note") == good


@pytest.mark.parametrize("script,extra", [
    (PHASE_I, ["--overwrite"]),
    ("phase_ii_extract_feature.py", ["--overwrite"]),
    ("phase_iii_online_train_or_test.py", ["--overwrite"]),
    ("phase_iii_offline_train_or_test.py", ["--overwrite"]),
    ("visualize.py", []),
    ("pipeline.py", []),
])
@pytest.mark.parametrize("note", ["", "..", "/some/other/folder"])
def test_no_script_deletes_outside_its_run(finished_run, script, extra, note):
    """The reported data losses: `--note ""|..|/abs --overwrite` deleted other notes, configs or folders."""
    note = str(finished_run / "some/other/folder") if note.startswith("/") else note
    before = snapshot(finished_run)
    code, err = run_main_in_process(script, *SMOKE, "--note", note, *extra, cwd=finished_run)
    assert code == 2 and "cannot name a run folder" in err and "Traceback" not in err, err
    assert snapshot(finished_run) == before


def test_config_file_name_must_be_a_safe_folder_name(tmp_path):
    bad = tmp_path / "my exp.yaml"
    bad.write_text("inherit: smoke\n")
    code, err = run_main_in_process(PHASE_I, "--config", str(bad), "--device", "cpu", cwd=tmp_path)
    assert code == 2 and "rename the file" in err
    assert not (tmp_path / "checkpoints").exists()


def test_remove_run_folder_refuses_anything_but_the_runs_folders(tmp_path):
    paths = RunPaths("phase_i", "cfg", "n", tmp_path)
    other_note = RunPaths("phase_i", "cfg", "m", tmp_path)
    for folder in (*paths.folders, *other_note.folders):
        folder.mkdir(parents=True)
        (folder / "f").write_text("x")
    for wrong in (other_note.checkpoint_dir, paths.checkpoint_dir.parent, tmp_path / "checkpoints", tmp_path,
                  paths.checkpoint_dir / "..", paths.features_dir, paths.checkpoint_dir / "sub"):
        with pytest.raises(UserError, match="refusing to delete"):
            remove_run_folder(wrong, paths)
    assert all((f / "f").is_file() for f in (*paths.folders, *other_note.folders))
    remove_run_folder(paths.checkpoint_dir, paths)
    assert not paths.checkpoint_dir.exists() and (other_note.checkpoint_dir / "f").is_file()


def test_remove_run_folder_does_not_follow_a_symlinked_run(tmp_path):
    paths = RunPaths("phase_i", "cfg", "n", tmp_path)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "data").write_text("x")
    paths.checkpoint_dir.parent.mkdir(parents=True)
    paths.checkpoint_dir.symlink_to(target)
    with pytest.raises(UserError, match="refusing"):
        remove_run_folder(paths.checkpoint_dir, paths)
    assert (target / "data").is_file()


# ------------------------------------------------------------------------------------------------
# --overwrite: validate, move aside, remove once started, restore on failure
# ------------------------------------------------------------------------------------------------
def test_failed_overwrite_leaves_the_finished_run_as_it_was(finished_run):
    run = finished_run / "checkpoints/phase_i/smoke/default"
    summary = finished_run / "run_summary/phase_i/smoke/default"
    before, before_summary = snapshot(run), snapshot(summary)
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--overwrite", "--opts", "dataset.name=image-folder",
                                    cwd=finished_run)
    assert code == 2 and "dataset.root" in err
    assert snapshot(run) == before and snapshot(summary) == before_summary
    assert not list(run.parent.glob(".*.replaced")) and not list(summary.parent.glob(".*.replaced"))


def test_successful_overwrite_replaces_the_run_and_leaves_no_copy(finished_run):
    run = finished_run / "checkpoints/phase_i/smoke/default"
    old_last = (run / "last.pt").read_bytes()
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--overwrite", *QUICK, cwd=finished_run)
    assert code == 0, err
    assert (run / "last.pt").read_bytes() != old_last
    assert json.loads((run / "results.json").read_text())["epochs"] == 1
    assert not list(run.parent.glob(".*.replaced"))
    assert not list((finished_run / "run_summary/phase_i/smoke").glob(".*.replaced"))


def _fake_run(tmp_path: Path, note: str = "n") -> RunPaths:
    paths = RunPaths("phase_i", "cfg", note, tmp_path)
    save_checkpoint(paths.last, {"epoch": 1})
    write_json_atomic(paths.results, {"finished": True})
    paths.summary_dir.mkdir(parents=True)
    (paths.summary_dir / "events").write_text("old")
    return paths


def test_overwrite_is_restored_on_failure_and_removed_once_started(tmp_path):
    paths = _fake_run(tmp_path)
    old = snapshot(tmp_path)
    assert prepare_run(paths, resume=False, overwrite=True, command="cmd") == "fresh"
    assert not paths.checkpoint_dir.exists()
    paths.checkpoint_dir.mkdir(parents=True)
    (paths.checkpoint_dir / "log.txt").write_text("new, failing run")
    restore_replaced()
    assert snapshot(tmp_path) == old

    prepare_run(paths, resume=False, overwrite=True, command="cmd")
    paths.checkpoint_dir.mkdir(parents=True)
    run_started(paths)
    restore_replaced()  # nothing pending any more: the new run stays
    assert not paths.last.exists() and not paths.summary_dir.exists()
    assert not list(tmp_path.rglob("*.replaced"))


def test_a_killed_overwrite_is_recovered_by_the_next_command(tmp_path, monkeypatch):
    """`kill -9` between moving the old run aside and starting the new one: the next command restores it."""
    paths = _fake_run(tmp_path)
    old = snapshot(tmp_path)
    open_pending(paths, replace=True)
    paths.checkpoint_dir.mkdir(parents=True)
    (paths.checkpoint_dir / "config.yaml").write_text("new run, killed before it started")
    monkeypatch.setattr(run_dir, "_PENDING", [])  # the process died: nothing of it remains
    with pytest.raises(UserError, match="finished run already exists"):
        prepare_run(paths, resume=False, overwrite=False, command="cmd")
    assert snapshot(tmp_path) == old

    # killed after the new run had started: the moved-aside copy is the part to drop
    open_pending(paths, replace=True)
    monkeypatch.setattr(run_dir, "_PENDING", [])
    save_checkpoint(paths.last, {"epoch": 1, "new": True})
    assert recover_replaced(paths) is False
    assert not list(tmp_path.rglob("*.replaced")) and torch.load(paths.last, weights_only=True)["new"]


# ------------------------------------------------------------------------------------------------
# One process per run
# ------------------------------------------------------------------------------------------------
def _wait_for_lock_holder(lock: Path, pid: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.is_file() and f"process {pid} " in lock.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the first process ended early: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("the first process never took the lock")


def test_a_second_process_on_a_live_run_is_refused_and_kill_9_leaves_no_stale_lock(tmp_path):
    first = subprocess.Popen(script_command(PHASE_I, *SMOKE, "--opts", "train.epochs=200"), cwd=tmp_path,
                             env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "checkpoints/phase_i/smoke/.default.lock"
        _wait_for_lock_holder(lock, first.pid, first)
        saved = tmp_path / "checkpoints/phase_i/smoke/default/config.yaml"
        deadline = time.monotonic() + 120
        while not saved.is_file() and time.monotonic() < deadline:  # the holder writes it just after locking
            time.sleep(0.2)
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, err = run_main_in_process(PHASE_I, *SMOKE, "--opts", "train.epochs=200", *extra, cwd=tmp_path)
            assert code == 2 and f"in use by process {first.pid} " in err, (extra, err)
        assert saved.is_file()  # --overwrite touched nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    lock_run(RunPaths("phase_i", "smoke", "default", tmp_path))  # the dead process's lock is gone with it
    release_locks()


def test_lock_is_per_run_and_reentrant_in_one_process(tmp_path):
    a, b = RunPaths("phase_i", "c", "a", tmp_path), RunPaths("phase_i", "c", "b", tmp_path)
    lock_run(a)
    lock_run(a)  # the pipeline runs several steps of one run in one process
    code = ("import sys; from pathlib import Path; from utils.layout import RunPaths; from utils.run_lock import lock_run\n"
            "from utils.errors import UserError\n"
            f"lock_run(RunPaths('phase_i', 'c', 'b', Path({str(tmp_path)!r})))\n"
            f"try:\n    lock_run(RunPaths('phase_i', 'c', 'a', Path({str(tmp_path)!r})))\n"
            "except UserError as e:\n    print(e); sys.exit(3)\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=script_env(), capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        assert proc.returncode == 3 and f"process {os.getpid()} " in proc.stdout, proc
    finally:
        release_locks()
    lock_run(b)  # released on the way out: free again
    release_locks()


# ------------------------------------------------------------------------------------------------
# Errors instead of tracebacks, and fix commands that run as written
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", [0, 100, 5000])
def test_truncated_last_checkpoint_on_resume_is_an_error(smoke_phase_i, tmp_path, cut):
    copy_phase_i(smoke_phase_i, tmp_path)
    run = tmp_path / "checkpoints/phase_i/smoke/default"
    results = json.loads((run / "results.json").read_text())
    write_json_atomic(run / "results.json", {**results, "finished": False})  # interrupted
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:cut])
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--resume", cwd=tmp_path)
    assert code == 2 and "truncated or corrupt" in err and "--overwrite" in err and "Traceback" not in err, err


def test_truncated_best_model_read_by_phase_ii_is_an_error(smoke_phase_i, tmp_path):
    copy_phase_i(smoke_phase_i, tmp_path)
    best = tmp_path / "checkpoints/phase_i/smoke/default/best_model.pt"
    best.write_bytes(best.read_bytes()[:5000])
    code, err = run_main_in_process("phase_ii_extract_feature.py", *SMOKE, cwd=tmp_path)
    assert code == 2 and "truncated or corrupt" in err and "phase_i_train_or_test.py" in err, err
    assert not (tmp_path / "features/smoke/default").exists()


def test_resume_without_the_saved_config_is_an_error(smoke_phase_i, tmp_path):
    copy_phase_i(smoke_phase_i, tmp_path)
    run = tmp_path / "checkpoints/phase_i/smoke/default"
    write_json_atomic(run / "results.json", {"finished": False})
    (run / "config.yaml").unlink()
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--resume", cwd=tmp_path)
    assert code == 2 and "config.yaml is missing or unreadable" in err and "--overwrite" in err, err


def test_unwritable_output_folder_is_an_error(tmp_path, monkeypatch):
    """As root (CI) permissions do not bite, so the file system's refusal is simulated where runs write."""
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if "checkpoints" in str(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    code, err = run_main_in_process(PHASE_I, *SMOKE, cwd=tmp_path)
    assert code == 2 and "Permission denied" in err and "writable" in err and "Traceback" not in err, err

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    monkeypatch.setattr("engine.recorder.dump_config", read_only)  # the run's first write
    code, err = run_main_in_process(PHASE_I, *SMOKE, *QUICK, "--note", "ro", cwd=tmp_path)
    assert code == 2 and "Read-only file system" in err, err


def test_other_os_errors_are_not_disguised(tmp_path, monkeypatch):
    """Only a refused write becomes a user error: any other OSError is a bug and keeps its traceback."""
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("engine.phase_i.build_datasets", broken)
    with pytest.raises(OSError):
        run_main_in_process(PHASE_I, *SMOKE, cwd=tmp_path)


def test_fix_commands_name_the_config_file_the_user_gave(tmp_path, monkeypatch):
    tree = tmp_path / "exp"
    for phase in ("phase_i", "phase_ii"):
        (tree / phase).mkdir(parents=True)
    (tree / "phase_i/mine.yaml").write_text("inherit: smoke\ntrain: {epochs: 1}\n")
    monkeypatch.setattr(sys, "argv", ["x.py", "--config", str(tree / "phase_i/mine.yaml")])
    assert shlex.split(user_command(PHASE_I, "mine", "default"))[3] == str(tree / "phase_i/mine.yaml")
    assert shlex.split(user_command("phase_ii_extract_feature.py", "mine", "s 1"))[3:6] == [
        str(tree / "phase_ii/mine.yaml"), "--note", "s 1"]
    assert shlex.split(user_command(PHASE_I, "smoke", "default"))[3] == "smoke"  # shipped names stay names


def test_suggested_overwrite_command_runs_as_written(tmp_path):
    tree = tmp_path / "exp"
    (tree / "phase_i").mkdir(parents=True)
    config = tree / "phase_i/mine.yaml"
    config.write_text("inherit: smoke\ntrain: {epochs: 1}\n")
    assert run_main_in_process(PHASE_I, "--config", str(config), "--device", "cpu", cwd=tmp_path)[0] == 0
    code, err = run_main_in_process(PHASE_I, "--config", str(config), "--device", "cpu", cwd=tmp_path)
    assert code == 2 and "finished run already exists" in err
    suggested = err[err.index("(python ") + 1:err.index(")", err.index("(python "))]
    argv = shlex.split(suggested)
    assert argv[:2] == ["python", PHASE_I] and "--overwrite" in argv
    code, err = run_main_in_process(PHASE_I, *argv[2:], "--device", "cpu", cwd=tmp_path)
    assert code == 0, err
