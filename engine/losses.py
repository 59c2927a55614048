"""Losses for long-tailed training: CE, focal, class-balanced CE, balanced softmax.

`LOSSES` is the one list of `train.loss` values: the config schema takes its choices from it, so a
new loss is one entry here (plus a schema key for any option of its own).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Lin et al. 2017: CE scaled by (1 - p_t)^gamma, mean over the batch."""

    def __init__(self, gamma: float, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        return loss.mean()


class LogitAdjustedLoss(nn.Module):
    """Menon et al. 2021, logit-adjusted loss: CE on logits + tau * log(class prior). tau = 1 is the
    balanced softmax of Ren et al. 2020 (LOSSES["balanced_softmax"])."""

    def __init__(self, counts: list[int], tau: float = 1.0):
        super().__init__()
        prior = torch.tensor(counts, dtype=torch.float32).clamp_min(1)
        self.tau = float(tau)
        self.register_buffer("log_prior", (prior / prior.sum()).log(), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.tau * self.log_prior.to(logits.device), target)


def class_balanced_weights(counts: list[int], beta: float) -> torch.Tensor:
    """Cui et al. 2019: weight_c proportional to (1 - beta) / (1 - beta^n_c), normalised to sum C."""
    n = torch.tensor(counts, dtype=torch.float64).clamp_min(1)
    weights = (1 - beta) / (1 - beta ** n)
    return (weights / weights.sum() * len(counts)).float()


# name -> factory(counts, *, focal_gamma, cb_beta, la_tau): counts are the training images per class.
# Every name is also a phase I method of engine.methods (its run folder phase_i-<name>).
LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": lambda counts, **_: nn.CrossEntropyLoss(),
    "focal": lambda counts, *, focal_gamma, **_: FocalLoss(focal_gamma),
    "class_balanced": lambda counts, *, cb_beta, **_: nn.CrossEntropyLoss(weight=class_balanced_weights(counts, cb_beta)),
    "balanced_softmax": lambda counts, **_: LogitAdjustedLoss(counts, 1.0),
    "la_loss": lambda counts, *, la_tau, **_: LogitAdjustedLoss(counts, la_tau),
}


def build_loss(name: str, counts: list[int], *, focal_gamma: float = 1.0, cb_beta: float = 0.9999,
               la_tau: float = 1.0) -> nn.Module:
    """The `LOSSES` entry `name` for a training set with `counts` images per class."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name}; available: {', '.join(LOSSES)}")
    return LOSSES[name](counts, focal_gamma=focal_gamma, cb_beta=cb_beta, la_tau=la_tau)
