"""A new phase I loss from one file (tests/extensions/label_smoothing_loss.py) and its registration is
all phase I needs to train with it (docs/ARCHITECTURE.md, "Adding a phase I loss")."""
import json

import pytest
import torch

from engine.artifacts import open_phase_i_run
from engine.losses import LOSSES
from engine.methods import METHODS
from tests.extensions.label_smoothing_loss import METHOD, LabelSmoothingLoss, label_smoothing
from tests.helpers import run_main_in_process
from utils.config import load_config
from utils.errors import UserError

SMALL = ["train.epochs=2", "dataset.synthetic.train_per_class=40", "dataset.synthetic.test_per_class=5"]


@pytest.fixture
def label_smoothing_loss(monkeypatch):
    monkeypatch.setitem(LOSSES, "label_smoothing", label_smoothing)  # the one registration (undone after the test)
    METHODS.register(METHOD)
    yield
    METHODS.unregister(METHOD.id)


def test_without_the_registration_the_loss_is_refused():
    with pytest.raises(UserError, match="train.loss.*must be one of"):
        load_config("smoke", "phase_i", ["train.loss=label_smoothing"])


def test_phase_i_trains_with_the_new_loss_and_the_run_reloads(label_smoothing_loss, monkeypatch, tmp_path):
    scored = []  # the rows every call of the new loss scored
    forward = LabelSmoothingLoss.forward

    def counting_forward(self, logits, target):
        scored.append(len(target))
        return forward(self, logits, target)

    monkeypatch.setattr(LabelSmoothingLoss, "forward", counting_forward)
    code, err = run_main_in_process("phase_i_train_or_test.py", "--config", "smoke", "--device", "cpu", "--opts",
                                    "train.loss=label_smoothing", *SMALL, cwd=tmp_path)
    assert code == 0, err
    results = json.loads((tmp_path / "checkpoints/phase_i-label_smoothing/smoke/default/results.json").read_text())
    assert results["finished"] and results["method"] == "label_smoothing" and results["loss"] == "label_smoothing"
    assert sum(scored) == results["samples_seen"] > 0  # every training row of both epochs went through it
    run = open_phase_i_run("smoke", "default", tmp_path, backbone=METHOD.id, need_checkpoint=True)
    assert run.cfg["train"]["loss"] == "label_smoothing"  # its saved config reads back
    run.load_model(torch.device("cpu"))  # and best_model.pt loads into the model it builds
