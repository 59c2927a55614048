"""Run folders: a finished run is never overwritten silently; resume needs something to resume."""
import pytest
import torch

from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import UserError
from utils.run_dir import RunPaths, prepare_run, write_json_atomic


def make_run(tmp_path, finished: bool) -> RunPaths:
    paths = RunPaths("phase_i", "cfg", "default", tmp_path)
    save_checkpoint(paths.last, {"epoch": 1})
    write_json_atomic(paths.results, {"finished": finished})
    return paths


def test_fresh_when_nothing_exists(tmp_path):
    assert prepare_run(RunPaths("phase_i", "c", "n", tmp_path), resume=False, overwrite=False, command="cmd") == "fresh"


def test_finished_run_needs_overwrite(tmp_path):
    paths = make_run(tmp_path, finished=True)
    with pytest.raises(UserError, match="--overwrite"):
        prepare_run(paths, resume=False, overwrite=False, command="cmd")
    assert paths.last.is_file()  # nothing lost
    assert prepare_run(paths, resume=True, overwrite=False, command="cmd") == "finished"
    assert prepare_run(paths, resume=False, overwrite=True, command="cmd") == "fresh"
    assert not paths.last.exists()


def test_interrupted_run_needs_resume_or_overwrite(tmp_path):
    paths = make_run(tmp_path, finished=False)
    with pytest.raises(UserError, match="--resume"):
        prepare_run(paths, resume=False, overwrite=False, command="cmd")
    assert prepare_run(paths, resume=True, overwrite=False, command="cmd") == "resume"


def test_resume_with_nothing_names_the_command(tmp_path):
    with pytest.raises(UserError, match="nothing to resume.*python phase_i"):
        prepare_run(RunPaths("phase_i", "c", "n", tmp_path), resume=True, overwrite=False, command="python phase_i_train_or_test.py --config c")


def test_checkpoint_is_weights_only_loadable_and_atomic(tmp_path):
    path = tmp_path / "x.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 3, "history": [{"loss": 0.5}]})
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3 and torch.equal(raw["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temp file left behind


def test_truncated_and_missing_checkpoints(tmp_path):
    path = tmp_path / "x.pt"
    save_checkpoint(path, {"model": {"w": torch.randn(1000)}})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="truncated or corrupt.*make-it"):
        load_checkpoint(path, produced_by="make-it")
    with pytest.raises(UserError, match="does not exist.*make-it"):
        load_checkpoint(tmp_path / "none.pt", produced_by="make-it")
