"""Losses for long-tailed training: CE, focal, class-balanced CE, balanced softmax."""
from __future__ import annotations

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


class BalancedSoftmaxLoss(nn.Module):
    """Ren et al. 2020 (= logit adjustment with tau 1): CE on logits + log(class prior)."""

    def __init__(self, counts: list[int]):
        super().__init__()
        prior = torch.tensor(counts, dtype=torch.float32).clamp_min(1)
        self.register_buffer("log_prior", (prior / prior.sum()).log(), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.log_prior.to(logits.device), target)


def class_balanced_weights(counts: list[int], beta: float) -> torch.Tensor:
    """Cui et al. 2019: weight_c proportional to (1 - beta) / (1 - beta^n_c), normalised to sum C."""
    n = torch.tensor(counts, dtype=torch.float64).clamp_min(1)
    weights = (1 - beta) / (1 - beta ** n)
    return (weights / weights.sum() * len(counts)).float()


def build_loss(name: str, counts: list[int], *, focal_gamma: float = 1.0, cb_beta: float = 0.9999) -> nn.Module:
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "focal":
        return FocalLoss(focal_gamma)
    if name == "class_balanced":
        return nn.CrossEntropyLoss(weight=class_balanced_weights(counts, cb_beta))
    if name == "balanced_softmax":
        return BalancedSoftmaxLoss(counts)
    raise ValueError(f"unknown loss {name}")
