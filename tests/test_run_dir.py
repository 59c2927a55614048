"""Run folders: where each run's files are and how a folder reads back as its names (utils/layout.py); a
finished run is never overwritten silently; resume needs something to resume."""
import pytest
import torch

from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import UserError
from utils.json_files import write_json_atomic
from utils.layout import (MAX_NAME_LENGTH, PHASE_I, PHASE_II, PHASE_III, Layout, RunPaths, arm_run_name,
                          features_identity, moved_aside, notes_folder, phase_i_run_name, phase_ii_run_name,
                          phase_iii_run_name, stage_of)
from utils.run_dir import prepare_run


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


# ------------------------------------------------------------------------------------------------
# The layout (utils/layout.py): names -> paths -> names
# ------------------------------------------------------------------------------------------------
# run name -> (stage, its main folder relative to the output root): every kind of run folder, on and off CE
RUNS = {
    "phase_i": (PHASE_I, "checkpoints/phase_i/cfg/n"),
    "phase_i-cosine_ce": (PHASE_I, "checkpoints/phase_i-cosine_ce/cfg/n"),
    "phase_ii": (PHASE_II, "features/cfg/n"),
    "phase_ii-cosine_ce": (PHASE_II, "features-cosine_ce/cfg/n"),
    "phase_iii_offline": (PHASE_III, "checkpoints/phase_iii_offline/cfg/n"),
    "phase_iii_online-tailcalibx": (PHASE_III, "checkpoints/phase_iii_online-tailcalibx/cfg/n"),
    "phase_iii_online-tailcalibx-on-cosine_ce": (PHASE_III, "checkpoints/phase_iii_online-tailcalibx-on-cosine_ce/cfg/n"),
}


def test_naming_functions_give_the_run_names():
    assert phase_i_run_name("ce", "ce") == "phase_i" and phase_i_run_name("cosine_ce", "ce") == "phase_i-cosine_ce"
    assert phase_ii_run_name("ce", "ce") == "phase_ii" and phase_ii_run_name("cosine_ce", "ce") == "phase_ii-cosine_ce"
    assert phase_iii_run_name("offline", "fsa", "fsa") == "phase_iii_offline"
    online = phase_iii_run_name("online", "tailcalibx", "fsa")
    assert online == "phase_iii_online-tailcalibx"
    assert arm_run_name(online, "ce", "ce") == online
    assert arm_run_name(online, "cosine_ce", "ce") == "phase_iii_online-tailcalibx-on-cosine_ce"
    assert arm_run_name("phase_i-cosine_ce", "cosine_ce", "ce") == "phase_i-cosine_ce"  # a phase I run is its own backbone
    assert stage_of("visualize") is None and stage_of("phase_iv") is None


@pytest.mark.parametrize("run_name", RUNS)
def test_every_path_of_a_run(tmp_path, run_name):
    stage, main = RUNS[run_name]
    paths = RunPaths(run_name, "cfg", "n", tmp_path)
    assert paths.stage == stage and paths.run_dir == tmp_path / main
    assert [f.relative_to(tmp_path).as_posix() for f in paths.folders] == (
        [main] if stage == PHASE_II else [main, f"run_summary/{run_name}/cfg/n"])
    assert [p.name for p in (paths.last, paths.best, paths.results, paths.config_file, paths.log)] == [
        "last.pt", "best_model.pt", "results.json", "config.yaml", "log.txt"]
    assert all(p.parent == paths.run_dir for p in (paths.last, paths.best, paths.results, paths.config_file, paths.log))
    assert paths.lock_file == (tmp_path / main).parent / ".n.lock"
    assert moved_aside(paths.run_dir) == (tmp_path / main).parent / ".n.replaced"
    assert paths.visualization_dir == tmp_path / "visualizations/cfg/n" / run_name
    assert paths.sibling("phase_i").checkpoint_dir == tmp_path / "checkpoints/phase_i/cfg/n"


@pytest.mark.parametrize("run_name", [r for r, (stage, _) in RUNS.items() if stage == PHASE_II])
def test_a_features_folder_reads_back_as_its_names(tmp_path, run_name):
    backbone = run_name.partition("-")[2] or "ce"
    assert phase_ii_run_name(backbone, "ce") == run_name
    assert features_identity(RunPaths(run_name, "cfg", "n", tmp_path).features_dir, "ce") == ("cfg", "n", backbone)


def test_runs_reads_back_the_run_folders_on_disk(tmp_path):
    """Every phase I / III run folder of a config is found, with its note; a lock file, a moved-aside
    folder, phase II, visualize and a stranger under checkpoints/ are not runs."""
    made = [(run, note) for run, (stage, _) in RUNS.items() if stage != PHASE_II for note in ("n", "seed0")]
    for run, note in made:
        paths = RunPaths(run, "cfg", note, tmp_path)
        paths.run_dir.mkdir(parents=True)
        paths.lock_file.touch()
        moved_aside(paths.run_dir).mkdir()
    RunPaths("phase_ii", "cfg", "n", tmp_path).run_dir.mkdir(parents=True)
    for stranger in ("visualize", "phase_ii", "notes"):
        (tmp_path / "checkpoints" / stranger / "cfg/n").mkdir(parents=True)
    (tmp_path / "checkpoints/phase_i/other/n").mkdir(parents=True)
    layout = Layout(tmp_path)
    assert layout.runs("cfg") == sorted(made)
    assert layout.runs("cfg", "seed0") == sorted((run, n) for run, n in made if n == "seed0")
    assert layout.runs("other") == [("phase_i", "n")] and layout.runs("none") == []
    assert Layout(tmp_path / "empty").runs("cfg") == []


def test_the_method_tables_runs_read_back(tmp_path):
    """Each arm's run folder and the phase II run it reads round-trip through the layout."""
    from engine.methods import BASELINE, METHODS

    arms = METHODS.arms()
    for arm in arms:
        RunPaths(arm.folder, "cfg", "n", tmp_path).run_dir.mkdir(parents=True)
        assert stage_of(arm.folder) == arm.method.stage
        if arm.method.stage == PHASE_III:
            features_dir = RunPaths(arm.phase_ii, "cfg", "n", tmp_path).features_dir
            assert features_identity(features_dir, BASELINE) == ("cfg", "n", arm.backbone.id)
    assert Layout(tmp_path).runs("cfg") == sorted((arm.folder, "n") for arm in arms)
    assert "phase_iii_online-tailcalibx-on-cosine_ce" in {arm.folder for arm in arms}


def test_report_folders(tmp_path):
    layout = Layout(tmp_path)
    assert layout.report_dir("cfg", ["seed1", "seed0", "seed1"]) == tmp_path / "reports/cfg/seed0+seed1"
    long = layout.report_dir("cfg", [f"experiment-with-a-long-name-seed{s}" for s in range(5)]).name
    assert len(long) == MAX_NAME_LENGTH and long != notes_folder([f"experiment-with-a-long-name-seed{s}" for s in range(4)])
    assert layout.reports_dir("cfg") == tmp_path / "reports/cfg"
