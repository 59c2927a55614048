"""What a researcher meets first: one output root for a project (--output-root / FSA_LT_OUTPUT_ROOT),
"did you mean" for a mistyped config key, --print-config, and lr decay epochs that follow train.epochs."""
import importlib
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import run_main_in_process
from utils import config as config_module
from utils.config import available_configs, config_text, load_config
from utils.errors import UserError
from utils.layout import OUTPUT_ROOT_ENV, RunPaths, output_root, set_output_root
from utils.schema import SCHEMAS

PHASE_I = "phase_i_train_or_test.py"
PHASE_II = "phase_ii_extract_feature.py"
SMOKE = ["--config", "smoke", "--device", "cpu"]


@pytest.fixture(autouse=True)
def clean_root(monkeypatch):
    """No output root from the environment of whoever runs the tests, and none left behind for the next test."""
    monkeypatch.delenv(OUTPUT_ROOT_ENV, raising=False)
    yield
    set_output_root(None)


@pytest.fixture
def fresh_notes(monkeypatch):
    """Forget the notes said so far (each is said once per process)."""
    monkeypatch.setattr(config_module, "_SAID", set())


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------------
# --output-root and FSA_LT_OUTPUT_ROOT
# ------------------------------------------------------------------------------------------------
def test_run_paths_follow_the_output_root(tmp_path, monkeypatch):
    assert output_root() == Path(".") and RunPaths("phase_i", "c", "n").checkpoint_dir == Path("checkpoints/phase_i/c/n")
    monkeypatch.setenv(OUTPUT_ROOT_ENV, str(tmp_path / "env"))
    assert RunPaths("phase_i", "c", "n").checkpoint_dir == tmp_path / "env/checkpoints/phase_i/c/n"
    set_output_root(tmp_path / "flag")  # the flag beats the variable
    paths = RunPaths("phase_ii", "c", "n")
    assert paths.root == tmp_path / "flag" and paths.features_dir == tmp_path / "flag/features/c/n"
    assert paths.sibling("phase_i").root == tmp_path / "flag"
    assert not (tmp_path / "flag").exists() and not (tmp_path / "env").exists()  # created by a run, not by naming it
    set_output_root(None)
    assert output_root() == tmp_path / "env"


def test_phase_i_and_ii_write_under_the_flag_or_variable_from_any_working_directory(tmp_path, monkeypatch, fresh_notes):
    root, cwd, elsewhere = tmp_path / "project", tmp_path / "cwd", tmp_path / "elsewhere"
    cwd.mkdir()
    elsewhere.mkdir()
    # a 2-epoch multistep run: the default milestones are scaled to it, said on stderr, saved in config.yaml
    opts = ["--opts", "train.epochs=2", "train.schedule=multistep"]
    monkeypatch.setenv(OUTPUT_ROOT_ENV, str(tmp_path / "loses"))  # the flag beats the variable
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--output-root", str(root), *opts, cwd=cwd)
    assert code == 0, err
    assert files_under(cwd) == [] and not (tmp_path / "loses").exists()
    saved = root / "checkpoints/phase_i/smoke/default"
    assert (saved / "results.json").is_file() and (root / "run_summary/phase_i/smoke/default").is_dir()
    assert yaml.safe_load((saved / "config.yaml").read_text())["train"]["milestones"] == [1]
    assert "note: train.milestones not set" in err and "train.epochs = 2: [1]" in err
    assert output_root() == tmp_path / "loses"  # the flag was that command's only

    # the finished run is found; the suggested command repeats the flag (as given) ...
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--output-root", str(root), *opts, cwd=elsewhere)
    assert code == 2 and f"A finished run already exists in {saved}" in err
    assert f"--config smoke --output-root {root} --opts train.epochs=2 train.schedule=multistep --overwrite" in err
    # ... but not a root that came from the variable, which holds for the next command as well
    monkeypatch.setenv(OUTPUT_ROOT_ENV, str(root))
    code, err = run_main_in_process(PHASE_I, *SMOKE, *opts, cwd=elsewhere)
    assert code == 2 and f"A finished run already exists in {saved}" in err and "--output-root" not in err

    # phase II reads phase I from the root and writes its outputs there (the variable's root, another cwd)
    code, err = run_main_in_process(PHASE_II, *SMOKE, cwd=elsewhere)
    assert code == 0, err
    assert (root / "features/smoke/default/results.json").is_file()
    assert files_under(elsewhere) == [] and files_under(cwd) == []


@pytest.mark.parametrize("make_bad", [
    lambda tmp: tmp / "a_file",             # a file
    lambda tmp: tmp / "a_file" / "below",   # below a file: cannot be created
])
def test_a_root_that_cannot_be_a_folder_is_an_error(tmp_path, monkeypatch, make_bad):
    (tmp_path / "a_file").write_text("x")
    bad = make_bad(tmp_path)
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--output-root", str(bad), cwd=tmp_path)
    assert code == 2 and err.startswith(f"error: --output-root: {bad} ") and "name a folder" in err
    monkeypatch.setenv(OUTPUT_ROOT_ENV, str(bad))
    code, err = run_main_in_process("report.py", "--config", "smoke", cwd=tmp_path)
    assert code == 2 and err.startswith(f"error: {OUTPUT_ROOT_ENV}={bad}: ") and f"unset {OUTPUT_ROOT_ENV}" in err
    with pytest.raises(UserError, match="is a file|cannot be created"):
        RunPaths("phase_i", "c", "n")
    assert files_under(tmp_path) == ["a_file"]


@pytest.mark.parametrize("script, print_config", [
    (PHASE_I, True), (PHASE_II, True), ("phase_iii_online_train_or_test.py", True),
    ("phase_iii_offline_train_or_test.py", True), ("visualize.py", True), ("pipeline.py", True), ("report.py", False),
])
def test_every_script_takes_output_root_and_those_with_a_config_print_config(capsys, script, print_config):
    module = importlib.import_module(Path(script).stem)
    old_argv = sys.argv
    try:
        sys.argv = [script, "--help"]
        with pytest.raises(SystemExit):
            module.main()
    finally:
        sys.argv = old_argv
    usage = capsys.readouterr().out
    assert "--output-root DIR" in usage and ("--print-config" in usage) == print_config


# ------------------------------------------------------------------------------------------------
# Unknown keys: did you mean ...
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("phase, opt, meant", [
    ("phase_i", "train.lrr=1", "Did you mean 'train.lr'?"),
    ("phase_i", "lr=1", "Did you mean 'train.lr'?"),               # the right name in the wrong section
    ("phase_i", "milestones=[5]", "Did you mean 'train.milestones'?"),
    ("phase_i", "trian.lr=1", "Did you mean 'train'?"),
    ("phase_i", "model.archi=resnet8", "Did you mean 'model.arch'?"),
    ("phase_ii", "gradcam.layers=x", "Did you mean 'gradcam.layer'?"),
    ("phase_iii", "finetune.lrr=1", "Did you mean 'finetune.lr'?"),
    ("phase_iii", "lr=1", "Did you mean 'finetune.lr', 'decoupled.lr' or 'tailcalib.lr'?"),
])
def test_unknown_key_suggests_the_key_meant(phase, opt, meant):
    with pytest.raises(UserError) as err:
        load_config("smoke", phase, [opt])
    assert str(err.value).startswith("Unknown config key ") and meant in str(err.value)


def test_unknown_key_lists_only_its_sections_keys_and_guesses_nothing_wild(tmp_path):
    with pytest.raises(UserError) as err:
        load_config("smoke", "phase_i", ["bogus=1"])
    assert "Did you mean" not in str(err.value)
    assert str(err.value).endswith(f"Valid keys there: {', '.join(sorted(SCHEMAS['phase_i']))}.")  # not train's keys
    with pytest.raises(UserError) as err:  # the section holding the key is no guess
        load_config("smoke", "phase_i", ["dataset.synthetic.size=3"])
    assert "'dataset.synthetic'?" not in str(err.value) and "'dataset.synthetic.seed'" in str(err.value)
    code, stderr = run_main_in_process(PHASE_I, *SMOKE, "--opts", "train.epoch=3", cwd=tmp_path)
    assert code == 2 and stderr.startswith("error: Unknown config key 'train.epoch'") and "'train.epochs'?" in stderr


# ------------------------------------------------------------------------------------------------
# --print-config
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script, phase", [
    (PHASE_I, "phase_i"), (PHASE_II, "phase_ii"), ("phase_iii_online_train_or_test.py", "phase_iii"),
    ("phase_iii_offline_train_or_test.py", "phase_iii"), ("visualize.py", "phase_ii"),
])
def test_print_config_prints_the_resolved_config_and_touches_nothing(tmp_path, capsys, script, phase):
    opts = ["seed=7", "accel.amp=bf16"]
    code, err = run_main_in_process(script, *SMOKE, "--opts", *opts, "--print-config",
                                    "--output-root", str(tmp_path / "new_root"), cwd=tmp_path)
    assert code == 0, err
    assert yaml.safe_load(capsys.readouterr().out) == load_config("smoke", phase, opts)
    assert files_under(tmp_path) == []  # not even the output root


def test_pipeline_prints_each_phases_config(tmp_path, capsys, fresh_notes):
    code, err = run_main_in_process("pipeline.py", "--config", "smoke", "--seeds", "3", "4", "--print-config",
                                    "--opts", "train.epochs=30", "train.schedule=multistep", "split.ts=0.7", cwd=tmp_path)
    assert code == 0, err
    out = capsys.readouterr().out
    assert out.startswith("--- # phase_i of note seed3 (the other notes differ in seed only)\n")
    documents = list(yaml.safe_load_all(out))
    assert documents == [load_config("smoke", "phase_i", ["seed=3", "train.epochs=30", "train.schedule=multistep"]),
                         load_config("smoke", "phase_ii", ["seed=3", "split.ts=0.7"]),
                         load_config("smoke", "phase_iii", ["seed=3"])]
    assert documents[0]["train"]["milestones"] == [24, 27] and "scaled to train.epochs = 30" in err
    assert files_under(tmp_path) == []


def test_print_config_of_a_bad_config_is_the_usual_error(tmp_path):
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--opts", "train.lrr=1", "--print-config", cwd=tmp_path)
    assert code == 2 and err.startswith("error: Unknown config key 'train.lrr'")


# ------------------------------------------------------------------------------------------------
# Decay epochs relative to train.epochs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epochs, milestones, step_size", [
    (200, [160, 180], 150), (30, [24, 27], 23), (300, [240, 270], 225), (10, [8, 9], 8), (3, [2], 2), (1, [], 1),
])
def test_unstated_decay_epochs_scale_with_train_epochs(epochs, milestones, step_size):
    multistep = load_config("smoke", "phase_i", [f"train.epochs={epochs}", "train.schedule=multistep"])["train"]
    step = load_config("smoke", "phase_i", [f"train.epochs={epochs}", "train.schedule=step"])["train"]
    assert multistep["milestones"] == milestones and step["step_size"] == step_size


def test_scaling_is_said_once_and_only_when_it_changes_something(capsys, fresh_notes):
    load_config("smoke", "phase_i", ["train.epochs=30", "train.schedule=multistep"])
    load_config("smoke", "phase_i", ["train.epochs=30", "train.schedule=multistep"])
    err = capsys.readouterr().err
    assert err == ("note: train.milestones not set: its default [160, 180] (for 200 epochs) scaled to train.epochs = "
                   "30: [24, 27]. Set train.milestones to choose others.\n")
    for opts in (["train.epochs=200", "train.schedule=multistep"], ["train.epochs=30"],  # smoke: cosine
                 ["train.epochs=30", "train.schedule=multistep", "train.milestones=[10, 20]"]):
        load_config("smoke", "phase_i", opts)
    assert capsys.readouterr().err == ""


def test_shipped_configs_keep_their_decay_epochs():
    for name in available_configs("phase_i"):
        train = load_config(name, "phase_i")["train"]
        assert (train["milestones"], train["step_size"]) == ([160, 180], 150), name
    assert load_config("cifar100-LT_resnet32_imb10", "phase_i")["train"]["schedule"] == "multistep"


@pytest.mark.parametrize("opts, key, fix", [
    (["train.schedule=multistep", "train.epochs=30", "train.milestones=[10, 30]"], "train.milestones = [10, 30]",
     "--opts 'train.milestones=[24, 27]'"),
    (["train.schedule=multistep", "train.epochs=100", "train.milestones=[160, 180]"], "train.milestones = [160, 180]",
     "--opts 'train.milestones=[80, 90]'"),
    (["train.schedule=step", "train.epochs=30", "train.step_size=30"], "train.step_size = 30", "--opts 'train.step_size=23'"),
])
def test_stated_decay_epochs_past_the_run_are_an_error(opts, key, fix):
    with pytest.raises(UserError) as err:
        load_config("smoke", "phase_i", opts)
    message = str(err.value)
    epochs = opts[1].split("=")[1]
    assert message.startswith(f"{key} reaches past the run: train.epochs is {epochs}") and fix in message


def test_milestones_stated_anywhere_in_the_chain_count_as_stated(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text("train: {schedule: multistep, milestones: [160, 180]}\n")
    child = tmp_path / "child.yaml"
    child.write_text("inherit: parent.yaml\ntrain: {epochs: 50}\n")
    with pytest.raises(UserError, match="train.milestones = \\[160, 180\\] reaches past the run: train.epochs is 50"):
        load_config(str(child), "phase_i")
    # a one-epoch run has no step to place: any step_size is accepted
    assert load_config("smoke", "phase_i", ["train.schedule=step", "train.epochs=1", "train.step_size=1"])


def test_a_saved_config_is_read_as_it_ran(tmp_path, fresh_notes, capsys):
    scaled = load_config("smoke", "phase_i", ["train.epochs=30", "train.schedule=multistep"])
    capsys.readouterr()
    saved = tmp_path / "config.yaml"
    saved.write_text(config_text(scaled))
    assert load_config(str(saved), "phase_i") == scaled  # stated now: never scaled twice
    # a run saved before the rule, with milestones past its epochs, stays readable as a saved config
    old = dict(scaled, train=dict(scaled["train"], milestones=[160, 180]))
    saved.write_text(config_text(old))
    assert load_config(str(saved), "phase_i", saved=True) == old
    with pytest.raises(UserError, match="reaches past the run"):
        load_config(str(saved), "phase_i")
    assert capsys.readouterr().err == ""


def test_suggested_commands_carry_one_opts_group():
    """argparse keeps only the last --opts group: a method's selecting opts and the run's own are merged."""
    from utils.cli import script_command

    command = script_command("phase_iii_offline_train_or_test.py", "smoke", "seed0", "--opts", "finetune.generator=crt",
                             "--opts", "seed=0", "finetune.generator=crt", "--overwrite")
    assert command.endswith("--note seed0 --opts finetune.generator=crt seed=0 --overwrite")
    assert command.count("--opts") == 1
