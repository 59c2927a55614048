"""One source per setting: optional phase II / III configs, moved keys, choices from the engine's
registries, dataset defaults from the schema, and the shipped configs resolving as before."""
import subprocess
import sys
from pathlib import Path

import pytest

import datasets
from engine import losses, optim
from utils import schema
from utils.config import CONFIG_ROOT, apply_schema, available_configs, load_config
from utils.errors import UserError
from utils.fields import defaults
from utils.schema import PHASE_II, SCHEMAS

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------------------------
# optional phase II / III configs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("phase", ["phase_ii", "phase_iii"])
def test_absent_phase_ii_iii_config_is_the_defaults(phase):
    assert not (CONFIG_ROOT / phase / "no-such-config.yaml").exists()
    assert load_config("no-such-config", phase) == defaults(SCHEMAS[phase])


def test_absent_phase_ii_iii_config_takes_validated_opts():
    cfg = load_config("no-such-config", "phase_ii", ["confusion.nf=5", "split.ts=0.7"])
    assert cfg == {**defaults(PHASE_II), "confusion": {"nf": 5}, "split": {"ts": 0.7, "tg": 0.2}}
    cfg = load_config("no-such-config", "phase_iii", ["finetune.iterations=7"])
    assert cfg["finetune"]["iterations"] == 7 and cfg["tailcalib"] == defaults(SCHEMAS["phase_iii"])["tailcalib"]
    with pytest.raises(UserError, match="'confusion.nf' must be >= 1"):
        load_config("no-such-config", "phase_ii", ["confusion.nf=0"])
    with pytest.raises(UserError, match="Unknown config key 'finetune.bogus'"):
        load_config("no-such-config", "phase_iii", ["finetune.bogus=1"])


def test_absent_phase_i_config_and_absent_paths_are_errors(tmp_path):
    with pytest.raises(UserError, match="Unknown config 'no-such-config' for phase_i"):
        load_config("no-such-config", "phase_i")
    for phase in ("phase_ii", "phase_iii"):
        with pytest.raises(UserError, match="no YAML file at that path"):
            load_config(str(tmp_path / "missing.yaml"), phase)


def test_a_missing_parent_is_still_an_error(tmp_path):
    with pytest.raises(UserError, match="Unknown config 'no-such-parent' for phase_ii"):
        load_config(write(tmp_path, "child.yaml", "inherit: no-such-parent\n"), "phase_ii")


# ------------------------------------------------------------------------------------------------
# moved keys
# ------------------------------------------------------------------------------------------------
MOVED_HR = r"split.hr moved: .*phase I config's eval.hr .*--opts eval.hr="


def test_split_hr_in_a_phase_ii_file_names_its_new_place(tmp_path):
    path = write(tmp_path, "mine.yaml", "split: {hr: 0.8, ts: 0.8}\n")
    with pytest.raises(UserError, match=MOVED_HR + r".*mine.yaml"):
        load_config(path, "phase_ii")
    child = write(tmp_path, "child.yaml", "inherit: mine.yaml\nconfusion: {nf: 2}\n")
    with pytest.raises(UserError, match=MOVED_HR + r".*mine.yaml"):  # names the file that sets it
        load_config(child, "phase_ii")


@pytest.mark.parametrize("name", ["smoke", "no-such-config"])
def test_split_hr_in_opts_names_its_new_place(name):
    with pytest.raises(UserError, match=MOVED_HR + r".*Remove it from --opts"):
        load_config(name, "phase_ii", ["split.hr=0.8"])


def test_every_moved_key_is_gone_from_its_schema():
    for phase, dotted in schema.MOVED_KEYS:
        assert dotted not in schema.schema_keys(phase)


# ------------------------------------------------------------------------------------------------
# choices from the engine's registries
# ------------------------------------------------------------------------------------------------
def test_a_registered_loss_is_accepted_and_an_unknown_one_lists_the_registry(monkeypatch):
    monkeypatch.setitem(losses.LOSSES, "my_loss", lambda counts, o: losses.LogitAdjustedLoss(counts, 1.0))
    assert load_config("smoke", "phase_i", ["train.loss=my_loss"])["train"]["loss"] == "my_loss"
    with pytest.raises(UserError) as info:
        load_config("smoke", "phase_i", ["train.loss=nope"])
    assert f"'train.loss' must be one of {', '.join(losses.LOSSES)}; got 'nope'" in str(info.value)
    assert "my_loss" in str(info.value)


@pytest.mark.parametrize("phase, key, registry", [
    ("phase_i", "train.schedule", optim.SCHEDULES),
    ("phase_i", "train.optimizer", optim.OPTIMIZERS),
    ("phase_iii", "finetune.optimizer", optim.OPTIMIZERS),
])
def test_schedule_and_optimizer_choices_are_the_registries(phase, key, registry):
    for name in registry:
        load_config("smoke", phase, [f"{key}={name}"])
    with pytest.raises(UserError, match=f"'{key}' must be one of {', '.join(registry)}; got 'nope'"):
        load_config("smoke", phase, [f"{key}=nope"])


def test_utils_config_does_not_import_the_engine():
    code = "import sys, utils.config; sys.exit(any(m.split('.')[0] == 'engine' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ------------------------------------------------------------------------------------------------
# one literal per list / default
# ------------------------------------------------------------------------------------------------
def test_dataset_names_policies_and_defaults_come_from_the_schema():
    assert schema.DATASET["name"].allowed() == tuple(datasets.DATASETS)
    assert datasets.AUGMENT_POLICIES is schema.AUGMENT_POLICIES
    assert datasets._merged({}) == defaults(schema.DATASET)
    assert datasets._merged({"synthetic": {"seed": 3}})["synthetic"] == {**defaults(schema.DATASET)["synthetic"], "seed": 3}


@pytest.mark.parametrize("phase", list(SCHEMAS))
def test_defaults_are_what_an_empty_config_resolves_to(phase):
    assert defaults(SCHEMAS[phase]) == apply_schema({}, SCHEMAS[phase])


# ------------------------------------------------------------------------------------------------
# the shipped configs resolve as before the phase II / III files were thinned out
# ------------------------------------------------------------------------------------------------
PHASE_II_DEFAULTS = {
    "seed": 0,
    "determinism": False,
    "backbone": "ce",
    "gradcam": {"layer": None, "method": "auto", "batch_size": 256},
    "split": {"ts": 0.8, "tg": 0.2},
    "confusion": {"nf": 3},
    "store": {"enabled": True, "views": 0, "num_workers": 0},
    "accel": {"amp": "auto", "channels_last": "auto", "threads": "auto"},
}
PAPER_FINETUNE = {"iterations": 6400, "nt": 16, "na": 3, "lr": 0.001, "eval_every": 400}
RELEASE_TAILCALIB = {"lr": 0.01, "epochs": 150, "batch_size": 128}


@pytest.mark.parametrize("name, changes", [
    ("cifar10-LT_resnet18", {}),
    ("cifar100-LT_resnet34_imb50", {}),
    ("fashion-mnist-LT_resnet20", {}),
    ("smoke", {"confusion": {"nf": 2}}),
    ("imagenet-LT_resnet10", {"store": {"enabled": True, "views": 0, "num_workers": 8}}),
])
def test_shipped_phase_ii_configs(name, changes):
    assert load_config(name, "phase_ii") == {**PHASE_II_DEFAULTS, **changes}


@pytest.mark.parametrize("name, finetune, tailcalib", [
    ("cifar10-LT_resnet18", PAPER_FINETUNE, {**RELEASE_TAILCALIB, "tukey": 1.0, "alpha": 0.0, "k": 3}),
    # the release's TailCalib momentum per imbalance (run_all_CIFAR100-LT.sh): 0.9 at 10, 0.0 at 50
    ("cifar10-LT_resnet32_imb10", PAPER_FINETUNE,
     {**RELEASE_TAILCALIB, "tukey": 0.9, "alpha": 0.0, "k": 2, "momentum": 0.9}),
    ("cifar100-LT_resnet34_imb50", PAPER_FINETUNE,
     {**RELEASE_TAILCALIB, "tukey": 0.9, "alpha": 0.2, "k": 3, "momentum": 0.0}),
    ("imagenet-LT_resnet10", PAPER_FINETUNE, RELEASE_TAILCALIB),
    ("fashion-mnist-LT_resnet20", {"iterations": 600, "nt": 16, "na": 3, "lr": 0.01, "eval_every": 100}, {}),
    ("smoke", {"iterations": 60, "nt": 4, "na": 3, "lr": 0.01, "eval_every": 20},
     {"epochs": 20, "batch_size": 32, "lr": 0.1}),
])
def test_shipped_phase_iii_configs(name, finetune, tailcalib):
    cfg = load_config(name, "phase_iii")
    expected = defaults(SCHEMAS["phase_iii"])
    expected["finetune"].update(finetune)
    expected["tailcalib"].update(tailcalib)
    assert cfg == expected


def test_every_phase_i_name_has_phase_ii_and_iii_settings():
    for name in available_configs("phase_i"):
        assert "hr" not in load_config(name, "phase_ii")["split"]
        assert load_config(name, "phase_iii")["finetune"]["generator"] == "fsa"
