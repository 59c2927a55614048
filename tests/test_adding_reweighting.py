"""A new re-weighting schedule from one file (tests/extensions/inverse_frequency.py) and its
registration is all phase I needs to train any loss with it (docs/ARCHITECTURE.md, "Adding a
re-weighting schedule")."""
import json

import pytest
import torch

from engine.artifacts import open_phase_i_run
from engine.losses import ClassWeightedLoss, CrossEntropyLoss
from engine.methods import METHODS
from engine.reweighting import REWEIGHTINGS
from tests.extensions.inverse_frequency import METHOD, inverse_frequency
from tests.helpers import copy_phase_i, run_main_in_process
from tests.test_adding_loss import label_smoothing_loss  # noqa: F401  (its fixture)
from utils.config import load_config
from utils.errors import UserError

SMALL = ["train.epochs=2", "dataset.synthetic.train_per_class=40", "dataset.synthetic.test_per_class=5"]


@pytest.fixture
def inverse_frequency_schedule(monkeypatch):
    monkeypatch.setitem(REWEIGHTINGS, "inverse_frequency", inverse_frequency)  # the one registration (undone after)
    METHODS.register(METHOD)
    yield
    METHODS.unregister(METHOD.id)


def test_without_the_registration_the_schedule_is_refused():
    with pytest.raises(UserError, match="train.reweight.*must be one of"):
        load_config("smoke", "phase_i", ["train.reweight=inverse_frequency"])


def test_phase_i_trains_ce_with_the_new_weights_and_the_run_reloads(inverse_frequency_schedule, monkeypatch, tmp_path):
    handed = []  # (loss, weights) of every epoch's set_class_weights
    set_class_weights = ClassWeightedLoss.set_class_weights

    def recording(self, weights):
        handed.append((self, weights))
        set_class_weights(self, weights)

    monkeypatch.setattr(ClassWeightedLoss, "set_class_weights", recording)
    code, err = run_main_in_process("phase_i_train_or_test.py", "--config", "smoke", "--device", "cpu", "--opts",
                                    "train.reweight=inverse_frequency", *SMALL, cwd=tmp_path)
    assert code == 0, err
    results = json.loads((tmp_path / "checkpoints/phase_i-inverse_frequency/smoke/default/results.json").read_text())
    assert results["finished"] and results["method"] == "inverse_frequency"
    assert (results["loss"], results["reweight"]) == ("ce", "inverse_frequency")
    # both epochs' CE got 1 / n_c, normalised to sum to the number of classes
    inverse = [1 / n for n in results["train_counts"]]
    expected = torch.tensor([w / sum(inverse) * len(inverse) for w in inverse])
    assert len(handed) == 2 and all(isinstance(loss, CrossEntropyLoss) for loss, _ in handed)
    for _, weights in handed:
        torch.testing.assert_close(weights, expected)
    run = open_phase_i_run("smoke", "default", tmp_path, backbone=METHOD.id, need_checkpoint=True)
    assert run.cfg["train"]["reweight"] == "inverse_frequency"  # its saved config reads back
    run.load_model(torch.device("cpu"))  # and best_model.pt loads into the model it builds


def test_the_pipeline_trains_a_new_loss_and_a_new_schedule_and_the_report_pairs_them_with_ce(
        label_smoothing_loss, inverse_frequency_schedule, smoke_phase_i, tmp_path):
    """Both extensions (each one file and its registration) reach every step: the default suite trains their
    phase I runs after CE's chain, and the report shows their rows against CE."""
    cwd = copy_phase_i(smoke_phase_i, tmp_path / "work")
    code, err = run_main_in_process("pipeline.py", "--config", "smoke", "--device", "cpu", "--opts",
                                    "finetune.iterations=10", "finetune.eval_every=10", "tailcalib.epochs=1", cwd=cwd)
    assert code == 0, err
    runs = {name: json.loads((cwd / f"checkpoints/phase_i-{name}/smoke/default/results.json").read_text())
            for name in ("label_smoothing", "inverse_frequency")}
    assert (runs["label_smoothing"]["loss"], runs["label_smoothing"]["reweight"]) == ("label_smoothing", "none")
    assert (runs["inverse_frequency"]["loss"], runs["inverse_frequency"]["reweight"]) == ("ce", "inverse_frequency")
    report = json.loads((cwd / "reports/smoke/default/report.json").read_text())
    rows = {row["id"]: row for row in report["rows"]}
    for name, results in runs.items():
        assert rows[name]["metrics"]["top1"]["values"] == [results["top1"]]
    pairs = {(p["method"], p["reference"]) for p in report["paired"]}
    assert {("Label-smoothed CE", "Phase I baseline (CE)"), ("CE re-weighted by 1/n", "Phase I baseline (CE)")} <= pairs
