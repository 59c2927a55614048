"""Re-weighting is an axis beside the loss: any loss takes a schedule's class weights (CE + DRW needs no
loss or method of its own), handed over by phase I before every epoch."""
import math

import pytest
import torch

from datasets import build_datasets
from engine.accel import Accel
from engine.artifacts import build_phase_i_model
from engine.losses import LOSSES, build_loss, class_balanced_weights
from engine.phase_i import BackboneTraining
from utils.config import load_config

CPU = torch.device("cpu")


def _weighted_ce_by_hand(logits: list[list[float]], target: list[int], weights: list[float]) -> float:
    """sum_i w_{y_i} l_i / sum_i w_{y_i}, l_i = log(sum_c e^{z_ic}) - z_{i y_i}: PyTorch's weighted CE."""
    losses = [math.log(sum(math.exp(z) for z in row)) - row[y] for row, y in zip(logits, target)]
    return sum(weights[y] * l for y, l in zip(target, losses)) / sum(weights[y] for y in target)


def test_ce_with_drw_switches_the_class_balanced_weights_on_at_drw_epoch():
    cfg = load_config("smoke", "phase_i", ["train.reweight=drw", "train.drw_epoch=2", "train.cb_beta=0.99",
                                           "dataset.synthetic.train_per_class=40",
                                           "dataset.synthetic.test_per_class=5"])
    bundle = build_datasets(cfg["dataset"], None)
    model = build_phase_i_model(cfg, bundle, CPU)
    task = BackboneTraining(cfg, bundle, model, model, CPU, Accel.from_config(cfg["accel"], CPU))
    counts = bundle.train_counts
    weights = class_balanced_weights(counts, 0.99).tolist()
    torch.manual_seed(0)
    logits, target = torch.randn(4, len(counts), dtype=torch.float64), torch.tensor([0, 0, 1, len(counts) - 1])
    plain = _weighted_ce_by_hand(logits.tolist(), target.tolist(), [1.0] * len(counts))
    weighted = _weighted_ce_by_hand(logits.tolist(), target.tolist(), weights)
    assert not math.isclose(plain, weighted, rel_tol=1e-3)  # the weights matter on this batch
    task.begin(1)  # before drw_epoch: the plain batch mean
    assert task.criterion.class_weights is None
    assert math.isclose(float(task.criterion(logits, target)), plain, rel_tol=1e-9)
    for epoch in (2, 3):  # from drw_epoch on: the effective-number weights, PyTorch's weighted average
        task.begin(epoch)
        torch.testing.assert_close(task.criterion.class_weights, torch.tensor(weights))
        assert math.isclose(float(task.criterion(logits, target)), weighted, rel_tol=1e-6)  # (weights are float32)


@pytest.mark.parametrize("name, options", [*((name, {}) for name in sorted(LOSSES)),
                                           ("class_balanced", {"cb_reduction": "weighted_mean"})])
def test_every_loss_averages_class_weights_as_pytorchs_weighted_mean(name, options):
    """The uniform interface, sum_i w_{y_i} l_i / sum_i w_{y_i}: equal weights leave every loss as it is, and
    weights on one class alone give the loss of that class's rows alone."""
    loss = build_loss(name, [30, 10, 3], scale=30.0, **options)
    torch.manual_seed(1)
    logits, target = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 2, 1, 0])
    unweighted = loss(logits, target)
    loss.set_class_weights(torch.full((3,), 2.5))
    torch.testing.assert_close(loss(logits, target), unweighted)
    loss.set_class_weights(torch.tensor([0.0, 3.0, 0.0]))
    on_class_1 = loss(logits, target)
    loss.set_class_weights(None)
    torch.testing.assert_close(on_class_1, loss(logits[target == 1], target[target == 1]))
