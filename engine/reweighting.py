"""Re-weighting schedules: the per-class loss weights of every epoch, the `train.reweight` axis beside
`train.loss` (any loss of engine.losses takes them; LDAM-DRW = `train.loss=ldam train.reweight=drw`).

`REWEIGHTINGS` is the one list of `train.reweight` values: the config schema takes its choices from
it, so a new schedule is one entry here (or one registration from the user's own file:
``REWEIGHTINGS["name"] = factory``). An entry is a factory(counts, options) -> schedule: counts are the
training images per class, options the phase I config's `train` section. A schedule maps a 0-based
epoch to per-class weights (a float tensor of one weight a class) or None (unweighted); phase I hands
them to the loss before every epoch (`ClassWeightedLoss.set_class_weights`), and a weighted batch is
averaged as PyTorch's weighted cross-entropy, ``sum_i w_{y_i} l_i / sum_i w_{y_i}``. A schedule is a
pure function of the epoch, so a resumed run gets the same weights.
"""
from __future__ import annotations

from typing import Callable

import torch

from engine.losses import class_balanced_weights, train_options

ClassWeightSchedule = Callable[[int], torch.Tensor | None]  # epoch -> per-class weights, None: unweighted


def drw_start(train: dict) -> int:
    """The epoch deferred re-weighting starts: train.drw_epoch, else 80% of train.epochs (the LDAM-DRW
    release: 160 of 200)."""
    return train["drw_epoch"] if train["drw_epoch"] is not None else int(0.8 * train["epochs"])


def deferred_reweighting(counts: list[int], train: dict) -> ClassWeightSchedule:
    """Deferred re-weighting (Cao et al. 2019), as the LDAM-DRW release (cifar_train.py ``--train_rule DRW``):
    unweighted before epoch :func:`drw_start` (the release's beta 0 gives all-one weights), then the
    effective-number weights ``class_balanced_weights(counts, train.cb_beta)`` (the release's
    ``idx = epoch // 160`` picks beta 0.9999 from epoch 160 of 200)."""
    weights, start = class_balanced_weights(counts, train["cb_beta"]), drw_start(train)
    return lambda epoch: weights if epoch >= start else None


REWEIGHTINGS: dict[str, Callable[[list[int], dict], ClassWeightSchedule]] = {
    "none": lambda counts, o: lambda epoch: None,
    "drw": deferred_reweighting,
}


def build_reweighting(name: str, counts: list[int], **options) -> ClassWeightSchedule:
    """The `REWEIGHTINGS` entry `name` for a training set with `counts` images per class; `options` are keys
    of the phase I `train` section, the schema's defaults where not given."""
    if name not in REWEIGHTINGS:
        raise ValueError(f"unknown re-weighting {name}; available: {', '.join(REWEIGHTINGS)}")
    return REWEIGHTINGS[name](counts, train_options(**options))
