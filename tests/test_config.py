"""Config loading: inheritance, --opts, schema errors that name the key."""
from pathlib import Path

import pytest
import yaml

from utils.config import available_configs, load_config, parse_opts
from utils.errors import UserError


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_shipped_configs_all_validate():
    for phase in ("phase_i", "phase_ii", "phase_iii"):
        names = available_configs(phase)
        assert "smoke" in names
        for name in names:
            load_config(name, phase)


def test_inheritance_variant_changes_only_its_keys():
    base = load_config("cifar10-LT_resnet18", "phase_i")
    variant = load_config("cifar10-LT_resnet18_imb10", "phase_i")
    assert variant["dataset"]["imbalance"] == 10.0 and base["dataset"]["imbalance"] == 100.0
    variant["dataset"]["imbalance"] = 100.0
    assert variant == base
    c100 = load_config("cifar100-LT_resnet34_imb50", "phase_i")
    assert (c100["dataset"]["name"], c100["model"]["arch"], c100["dataset"]["imbalance"]) == ("cifar100-LT", "resnet34_cifar", 50.0)
    assert c100["train"]["step_size"] == 150  # the paper recipe inherited two levels down


def test_opts_override_nested_values_with_yaml_types():
    cfg = load_config("smoke", "phase_i", ["train.lr=0.01", "train.milestones=[3, 5]", "dataset.root=null", "model.arch=resnet20"])
    assert cfg["train"]["lr"] == 0.01 and cfg["train"]["milestones"] == [3, 5]
    assert cfg["model"]["arch"] == "resnet20" and cfg["dataset"]["root"] is None
    assert isinstance(load_config("smoke", "phase_i", ["train.lr=1"])["train"]["lr"], float)


def test_defaults_fill_missing_keys(tmp_path):
    cfg = load_config(write(tmp_path, "mini.yaml", "train: {epochs: 3}\n"), "phase_i")
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["batch_size"] == 128 and cfg["eval"]["hr"] == 0.9


def test_unknown_config_lists_available():
    with pytest.raises(UserError, match="Available phase_i configs: .*smoke"):
        load_config("no_such_config", "phase_i")


@pytest.mark.parametrize("opts, key", [(["train.lrr=0.1"], "train.lrr"), (["bogus=1"], "bogus"), (["dataset.synthetic.size=3"], "dataset.synthetic.size")])
def test_unknown_key_is_named(opts, key):
    with pytest.raises(UserError, match=f"Unknown config key '{key}'"):
        load_config("smoke", "phase_i", opts)


@pytest.mark.parametrize("opts, fragment", [
    (["train.epochs=ten"], "'train.epochs' must be an integer"),
    (["train.lr=fast"], "'train.lr' must be a number"),
    (["train.milestones=[1, x]"], "'train.milestones' must be a list of integers"),
    (["train.optimizer=adam"], "'train.optimizer' must be one of sgd, adamw"),
    (["dataset.augment=3"], "'dataset.augment' must be a boolean"),
    (["train.lr=0"], "'train.lr' must be > 0"),
    (["train.lr=-0.1"], "'train.lr' must be > 0"),
    (["dataset.imbalance=0.5"], "'dataset.imbalance' must be >= 1"),
    (["train.batch_size=0"], "'train.batch_size' must be >= 1"),
    (["eval.hr=1.5"], "'eval.hr' must be in"),
])
def test_wrong_types_and_values(opts, fragment):
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        load_config("smoke", "phase_i", opts)


def test_phase_ii_and_iii_value_checks():
    with pytest.raises(UserError, match="tg < ts"):
        load_config("smoke", "phase_ii", ["split.ts=0.2", "split.tg=0.5"])
    with pytest.raises(UserError, match="split.hr moved: .*eval.hr"):
        load_config("smoke", "phase_ii", ["split.hr=0"])
    with pytest.raises(UserError, match="batch = 2\\*nt"):
        load_config("smoke", "phase_iii", ["finetune.nt=0"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "broken.yaml", "train:\n  lr: 0.1\n  epochs: [1, 2\n")
    with pytest.raises(UserError) as info:
        load_config(path, "phase_i")
    assert "broken.yaml" in str(info.value) and "line" in str(info.value)


def test_inheritance_cycle_is_reported(tmp_path):
    write(tmp_path, "a.yaml", "inherit: b.yaml\n")
    write(tmp_path, "b.yaml", "inherit: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"), "phase_i")


def test_parse_opts_rejects_malformed():
    with pytest.raises(UserError, match="key.sub=value"):
        parse_opts(["train.lr"])
    assert parse_opts(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_resolved_config_round_trips_through_safe_load(tmp_path):
    cfg = load_config("fashion-mnist-LT_resnet32", "phase_i")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert load_config(str(path), "phase_i") == cfg


def test_exponent_numbers_without_a_dot_are_numbers():
    """PyYAML (YAML 1.1) reads 5e-4 as a string; a number key takes it as 0.0005 (a word stays an error)."""
    assert load_config("smoke", "phase_i", ["train.weight_decay=5e-4"])["train"]["weight_decay"] == 0.0005
    with pytest.raises(UserError, match="must be a number"):
        load_config("smoke", "phase_i", ["train.weight_decay=lots"])
