"""A new dataset from one file: a builder plus one `register_dataset` call is all it takes for the config
schema, `build_datasets`, the pipeline and the report to know it (docs/ARCHITECTURE.md, "Adding a dataset")."""
import json
from pathlib import Path

import pytest

from datasets import DATASETS, build_datasets, long_tail_counts, register_dataset, unregister_dataset
from tests.extensions.tiny_dataset import CLASS_NAMES, NAME, TEST_PER_CLASS, TRAIN_PER_CLASS, build_tiny
from tests.helpers import run_main_in_process
from utils.config import load_config
from utils.errors import UserError

IMBALANCE = 20
# the long tail build_datasets draws from the tiny set's balanced training images
TINY_COUNTS = long_tail_counts(TRAIN_PER_CLASS, len(CLASS_NAMES), IMBALANCE, "exp")


@pytest.fixture
def tiny_dataset():
    register_dataset(NAME, build_tiny)
    yield NAME
    unregister_dataset(NAME)


@pytest.fixture
def tiny_configs(tmp_path) -> Path:
    """A config tree whose phase I config trains on the tiny set (the smoke run, shortened); returns its
    phase I file, which pipeline.py takes as --config."""
    phases = {
        "phase_i": f"inherit: smoke\ndataset: {{name: {NAME}, imbalance: {IMBALANCE}}}\ntrain: {{epochs: 2}}\n",
        "phase_ii": "inherit: smoke\n",
        "phase_iii": "inherit: smoke\nfinetune: {iterations: 4, eval_every: 4}\ntailcalib: {epochs: 1}\n",
    }
    for phase, text in phases.items():
        (tmp_path / "configs" / phase).mkdir(parents=True)
        (tmp_path / "configs" / phase / "tiny.yaml").write_text(text)
    return tmp_path / "configs/phase_i/tiny.yaml"


def test_the_registered_name_is_a_schema_choice_and_builds_the_long_tailed_set(tiny_dataset, tiny_configs):
    cfg = load_config(str(tiny_configs), "phase_i")
    assert cfg["dataset"]["name"] == NAME and NAME in DATASETS
    bundle = build_datasets(cfg["dataset"])
    assert (bundle.name, bundle.num_classes, bundle.in_channels, bundle.class_names) == (NAME, 6, 1, CLASS_NAMES)
    assert bundle.train_counts == TINY_COUNTS == [60, 32, 18, 9, 5, 3]
    assert bundle.test.class_counts() == [TEST_PER_CLASS] * len(CLASS_NAMES)


def test_an_unregistered_name_is_refused_with_the_registered_ones(tiny_configs, tmp_path):
    assert NAME not in DATASETS  # only the fixture registers it, and removes it after its test
    available = ", ".join(DATASETS)
    with pytest.raises(UserError, match=f"'dataset.name' must be one of {available}; got '{NAME}'"):
        load_config(str(tiny_configs), "phase_i")
    with pytest.raises(UserError, match=f"unknown dataset name '{NAME}'; available: {available}"):
        build_datasets({"name": NAME})
    code, err = run_main_in_process("pipeline.py", "--config", str(tiny_configs), "--device", "cpu", cwd=tmp_path)
    assert code == 2 and f"must be one of {available}; got '{NAME}'" in err
    assert not (tmp_path / "checkpoints").exists()


def test_the_pipeline_trains_on_it_and_the_report_shows_its_classes(tiny_dataset, tiny_configs, tmp_path):
    code, err = run_main_in_process("pipeline.py", "--config", str(tiny_configs), "--device", "cpu", cwd=tmp_path)
    assert code == 0, err
    phase_i = json.loads((tmp_path / "checkpoints/phase_i/tiny/default/results.json").read_text())
    assert phase_i["train_counts"] == TINY_COUNTS and phase_i["train_samples"] == sum(TINY_COUNTS)
    assert [sum(row) for row in phase_i["confusion"]] == [TEST_PER_CLASS] * len(CLASS_NAMES)
    report = json.loads((tmp_path / "reports/tiny/default/report.json").read_text())
    assert report["config"] == "tiny" and len(report["rows"]) > 1  # phase I and the phase III rows on it
    for row in report["rows"]:
        assert row["per_class"]["train_counts"] == TINY_COUNTS, row["id"]
        assert len(row["per_class"]["accuracy"]) == len(CLASS_NAMES), row["id"]
        assert row["n"] == 1 and len(row["metrics"]["top1"]["values"]) == 1, row["id"]
