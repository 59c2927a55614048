"""Losses for long-tailed training: CE, focal, class-balanced CE, balanced softmax, logit-adjusted, LDAM-DRW.

`LOSSES` is the one list of `train.loss` values: the config schema takes its choices from it, so a
new loss is one entry here (plus a schema key for any option of its own).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Softmax focal loss, mean over the batch of ``-(1 - p_y)^gamma log p_y`` (Lin et al. 2017's modulating
    factor on the softmax cross-entropy), as the LDAM-DRW release's focal baseline (losses.py ``FocalLoss``,
    ``cifar_train.py``: ``gamma=1``, no class weights). ``train.focal_gamma`` defaults to that release's 1
    (Cui et al.'s release also runs focal at ``GAMMA=1.0``); Lin et al.'s detection setting is 2 (with a
    sigmoid and alpha = 0.25, neither used here)."""

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = float(gamma)

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
    """Cui et al. 2019: weight_c proportional to (1 - beta) / (1 - beta^n_c), normalised to sum C (their
    release, src/cifar_main.py: ``weights / np.sum(weights) * data_version``; LDAM-DRW's the same)."""
    n = torch.tensor(counts, dtype=torch.float64).clamp_min(1)
    weights = (1 - beta) / (1 - beta ** n)
    return (weights / weights.sum() * len(counts)).float()


CB_REDUCTIONS = ("mean", "weighted_mean")  # train.cb_reduction


class ClassBalancedLoss(nn.Module):
    """Class-balanced softmax cross-entropy (Cui et al. 2019): per-sample CE ``l_i`` weighted by ``w_{y_i}``
    of :func:`class_balanced_weights`, averaged by ``reduction``:

    - ``mean`` (the default): ``mean_i(w_{y_i} l_i)``, Cui et al.'s release (src/cifar_main.py, loss type
      ``softmax``: ``tf.losses.softmax_cross_entropy(..., weights=w_y)``, whose default reduction
      SUM_BY_NONZERO_WEIGHTS divides by the batch size as every weight is > 0).
    - ``weighted_mean``: ``sum_i(w_{y_i} l_i) / sum_i(w_{y_i})``, PyTorch's weighted ``cross_entropy`` as the
      LDAM-DRW release's re-weighting (``--train_rule Reweight``) and DRW use it; the per-batch denominator
      undoes the weights' overall size, so the step size does not shrink on head-heavy batches."""

    def __init__(self, counts: list[int], beta: float, reduction: str = "mean"):
        super().__init__()
        if reduction not in CB_REDUCTIONS:
            raise ValueError(f"class-balanced reduction must be one of {', '.join(CB_REDUCTIONS)}, got {reduction!r}")
        self.reduction = reduction
        self.register_buffer("weight", class_balanced_weights(counts, beta), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(logits.device)
        if self.reduction == "weighted_mean":
            return F.cross_entropy(logits, target, weight=weight.to(logits.dtype))
        return (weight[target] * F.cross_entropy(logits, target, reduction="none")).mean()


def ldam_margins(counts: list[int], max_margin: float) -> torch.Tensor:
    """Cao et al. 2019: m_c proportional to n_c^(-1/4), the rarest class's margin = max_margin."""
    inv = torch.tensor(counts, dtype=torch.float64).clamp_min(1) ** -0.25
    return (inv * (max_margin / inv.max())).float()


class LDAMDRWLoss(nn.Module):
    """LDAM with deferred re-weighting (Cao et al. 2019), as the release (kaidic/LDAM-DRW losses.py
    ``LDAMLoss``, cifar_train.py ``--loss_type LDAM --train_rule DRW``), on the logits ``s * cos`` of the
    bias-free ``normed`` classifier (the release's ``NormedLinear``) with fixed scale ``s`` (30): the true
    class's logit loses ``s * m_y``, i.e. cross-entropy of ``s * (cos - m_y 1_y)``, ``m_y`` from
    :func:`ldam_margins` (``max_m`` 0.5). From epoch ``drw_epoch`` on (0-based; the release's
    ``epoch // 160`` picks beta 0.9999 from epoch 160 of 200) the cross-entropy is weighted by the
    effective-number weights (``class_balanced_weights(counts, beta)``) and averaged as PyTorch's weighted
    ``cross_entropy`` (sum of w l / sum of w over the batch, as the release); before it, unweighted (the
    release's beta 0 gives all-one weights). The weights are a pure function of the epoch
    (:meth:`set_epoch`), so a resumed run gets the same."""

    def __init__(self, counts: list[int], *, scale: float, max_margin: float = 0.5, drw_epoch: int = 160,
                 beta: float = 0.9999):
        super().__init__()
        self.scale, self.drw_epoch = float(scale), int(drw_epoch)
        self.register_buffer("margins", ldam_margins(counts, max_margin), persistent=False)
        self.register_buffer("drw_weights", class_balanced_weights(counts, beta), persistent=False)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def weights(self) -> torch.Tensor | None:
        return self.drw_weights if self.epoch >= self.drw_epoch else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        margin = self.scale * self.margins.to(logits.device)[target]
        shifted = logits.scatter_add(1, target[:, None], -margin[:, None].to(logits.dtype))
        weight = self.weights()
        return F.cross_entropy(shifted, target, weight=None if weight is None else weight.to(logits.device, logits.dtype))


# name -> factory(counts, options): counts are the training images per class, options the phase I config's
# `train` section plus `scale` (the cosine classifier's). Every name is also in a phase I method of
# engine.methods (its run folder phase_i-<method id>).
LOSSES: dict[str, Callable[[list[int], dict], nn.Module]] = {
    "ce": lambda counts, o: nn.CrossEntropyLoss(),
    "focal": lambda counts, o: FocalLoss(o["focal_gamma"]),
    "class_balanced": lambda counts, o: ClassBalancedLoss(counts, o["cb_beta"], o["cb_reduction"]),
    "balanced_softmax": lambda counts, o: LogitAdjustedLoss(counts, 1.0),
    "la_loss": lambda counts, o: LogitAdjustedLoss(counts, o["la_tau"]),
    "ldam_drw": lambda counts, o: LDAMDRWLoss(counts, scale=o["scale"], max_margin=o["ldam_max_margin"],
                                              drw_epoch=drw_start(o), beta=o["cb_beta"]),
}


def build_loss(name: str, counts: list[int], **options) -> nn.Module:
    """The `LOSSES` entry `name` for a training set with `counts` images per class; `options` are keys of
    the phase I `train` section and `scale` (of `model`), the schema's defaults where not given."""
    from utils.schema import PHASE_I, defaults

    if name not in LOSSES:
        raise ValueError(f"unknown loss {name}; available: {', '.join(LOSSES)}")
    return LOSSES[name](counts, {**defaults(PHASE_I["train"]), "scale": defaults(PHASE_I["model"])["scale"], **options})


def drw_start(train: dict) -> int:
    """The epoch deferred re-weighting starts: train.drw_epoch, else 80% of train.epochs (the LDAM-DRW
    release: 160 of 200)."""
    return train["drw_epoch"] if train["drw_epoch"] is not None else int(0.8 * train["epochs"])
