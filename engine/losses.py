"""Losses for long-tailed training: CE, focal, class-balanced CE, balanced softmax, logit-adjusted, LDAM.

`LOSSES` is the one list of `train.loss` values: the config schema takes its choices from it, so a
new loss is one entry here (plus a schema key for any option of its own). Every loss is a
:class:`ClassWeightedLoss`: re-weighting (`train.reweight`, engine.reweighting) is an axis of its own,
which hands any loss its per-class weights epoch by epoch (LDAM-DRW = `ldam` + `drw`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ClassWeightedLoss(nn.Module):
    """What every phase I loss is: ``forward(logits, target)`` gives the batch's loss, weighted by the
    per-class ``class_weights`` that phase I sets from the re-weighting schedule before every epoch
    (:meth:`set_class_weights`; None: unweighted, the loss's own average).

    A weighted batch is averaged as PyTorch's weighted cross-entropy, ``sum_i w_{y_i} l_i / sum_i w_{y_i}``
    (the LDAM-DRW release's DRW and Reweight): a loss built on ``F.cross_entropy`` passes
    ``weight=self.weights_for(logits)``, any other reduces its per-sample losses with
    :func:`class_weighted_mean`."""

    def __init__(self) -> None:
        super().__init__()
        self.class_weights: torch.Tensor | None = None

    def set_class_weights(self, weights: torch.Tensor | None) -> None:
        self.class_weights = weights

    def weights_for(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The class weights on the logits' device and in their dtype (None: unweighted)."""
        return None if self.class_weights is None else self.class_weights.to(logits.device, logits.dtype)


def class_weighted_mean(losses: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None) -> torch.Tensor:
    """The batch's loss from per-sample losses: their mean, or with per-class weights ``w`` PyTorch's
    weighted-CE average ``sum_i w_{y_i} l_i / sum_i w_{y_i}``."""
    if class_weights is None:
        return losses.mean()
    weights = class_weights[target]
    return (weights * losses).sum() / weights.sum()


class CrossEntropyLoss(ClassWeightedLoss):
    """Softmax cross-entropy, batch mean (``nn.CrossEntropyLoss()``)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=self.weights_for(logits))


class FocalLoss(ClassWeightedLoss):
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
        return class_weighted_mean(loss, target, self.weights_for(logits))


class LogitAdjustedLoss(ClassWeightedLoss):
    """Menon et al. 2021, logit-adjusted loss: CE on logits + tau * log(class prior). tau = 1 is the
    balanced softmax of Ren et al. 2020 (LOSSES["balanced_softmax"])."""

    def __init__(self, counts: list[int], tau: float = 1.0):
        super().__init__()
        prior = torch.tensor(counts, dtype=torch.float32).clamp_min(1)
        self.tau = float(tau)
        self.register_buffer("log_prior", (prior / prior.sum()).log(), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.tau * self.log_prior.to(logits.device), target,
                               weight=self.weights_for(logits))


def class_balanced_weights(counts: list[int], beta: float) -> torch.Tensor:
    """Cui et al. 2019: weight_c proportional to (1 - beta) / (1 - beta^n_c), normalised to sum C (their
    release, src/cifar_main.py: ``weights / np.sum(weights) * data_version``; LDAM-DRW's the same)."""
    n = torch.tensor(counts, dtype=torch.float64).clamp_min(1)
    weights = (1 - beta) / (1 - beta ** n)
    return (weights / weights.sum() * len(counts)).float()


CB_REDUCTIONS = ("mean", "weighted_mean")  # train.cb_reduction


class ClassBalancedLoss(ClassWeightedLoss):
    """Class-balanced softmax cross-entropy (Cui et al. 2019): per-sample CE ``l_i`` weighted by ``w_{y_i}``
    of :func:`class_balanced_weights`, averaged by ``reduction``:

    - ``mean`` (the default): ``mean_i(w_{y_i} l_i)``, Cui et al.'s release (src/cifar_main.py, loss type
      ``softmax``: ``tf.losses.softmax_cross_entropy(..., weights=w_y)``, whose default reduction
      SUM_BY_NONZERO_WEIGHTS divides by the batch size as every weight is > 0).
    - ``weighted_mean``: ``sum_i(w_{y_i} l_i) / sum_i(w_{y_i})``, PyTorch's weighted ``cross_entropy`` as the
      LDAM-DRW release's re-weighting (``--train_rule Reweight``) and DRW use it; the per-batch denominator
      undoes the weights' overall size, so the step size does not shrink on head-heavy batches.

    A re-weighting schedule's class weights ``s`` come on top: they average the terms ``w_{y_i} l_i`` of
    ``mean`` (``sum_i s_{y_i} w_{y_i} l_i / sum_i s_{y_i}``) and multiply the weights of ``weighted_mean``."""

    def __init__(self, counts: list[int], beta: float, reduction: str = "mean"):
        super().__init__()
        if reduction not in CB_REDUCTIONS:
            raise ValueError(f"class-balanced reduction must be one of {', '.join(CB_REDUCTIONS)}, got {reduction!r}")
        self.reduction = reduction
        self.register_buffer("weight", class_balanced_weights(counts, beta), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight, scheduled = self.weight.to(logits.device), self.weights_for(logits)
        if self.reduction == "weighted_mean":
            weight = weight.to(logits.dtype)
            return F.cross_entropy(logits, target, weight=weight if scheduled is None else weight * scheduled)
        per_sample = weight[target] * F.cross_entropy(logits, target, reduction="none")
        return class_weighted_mean(per_sample, target, scheduled)


def ldam_margins(counts: list[int], max_margin: float) -> torch.Tensor:
    """Cao et al. 2019: m_c proportional to n_c^(-1/4), the rarest class's margin = max_margin."""
    inv = torch.tensor(counts, dtype=torch.float64).clamp_min(1) ** -0.25
    return (inv * (max_margin / inv.max())).float()


class LDAMLoss(ClassWeightedLoss):
    """LDAM (Cao et al. 2019), as the release (kaidic/LDAM-DRW losses.py ``LDAMLoss``), on the logits
    ``s * cos`` of the bias-free ``normed`` classifier (the release's ``NormedLinear``) with fixed scale
    ``s`` (30): the true class's logit loses ``s * m_y``, i.e. cross-entropy of ``s * (cos - m_y 1_y)``,
    ``m_y`` from :func:`ldam_margins` (``max_m`` 0.5). The release's deferred re-weighting is the ``drw``
    schedule (engine.reweighting): LDAM-DRW is ``train.loss=ldam train.reweight=drw``."""

    def __init__(self, counts: list[int], *, scale: float, max_margin: float = 0.5):
        super().__init__()
        self.scale = float(scale)
        self.register_buffer("margins", ldam_margins(counts, max_margin), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        margin = self.scale * self.margins.to(logits.device)[target]
        shifted = logits.scatter_add(1, target[:, None], -margin[:, None].to(logits.dtype))
        return F.cross_entropy(shifted, target, weight=self.weights_for(logits))


# name -> factory(counts, options): counts are the training images per class, options the phase I config's
# `train` section plus `scale` (the cosine classifier's); the factory returns a ClassWeightedLoss. Every
# name is also in a phase I method of engine.methods (its run folder phase_i-<method id>).
LOSSES: dict[str, Callable[[list[int], dict], ClassWeightedLoss]] = {
    "ce": lambda counts, o: CrossEntropyLoss(),
    "focal": lambda counts, o: FocalLoss(o["focal_gamma"]),
    "class_balanced": lambda counts, o: ClassBalancedLoss(counts, o["cb_beta"], o["cb_reduction"]),
    "balanced_softmax": lambda counts, o: LogitAdjustedLoss(counts, 1.0),
    "la_loss": lambda counts, o: LogitAdjustedLoss(counts, o["la_tau"]),
    "ldam": lambda counts, o: LDAMLoss(counts, scale=o["scale"], max_margin=o["ldam_max_margin"]),
}


def train_options(**options) -> dict:
    """The phase I `train` section's defaults (and `scale`, of `model`) overridden by `options`: what a
    loss or re-weighting factory reads when built outside a run."""
    from utils.fields import defaults
    from utils.schema import PHASE_I

    return {**defaults(PHASE_I["train"]), "scale": defaults(PHASE_I["model"])["scale"], **options}


def build_loss(name: str, counts: list[int], **options) -> ClassWeightedLoss:
    """The `LOSSES` entry `name` for a training set with `counts` images per class; `options` are keys of
    the phase I `train` section and `scale` (of `model`), the schema's defaults where not given."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name}; available: {', '.join(LOSSES)}")
    loss = LOSSES[name](counts, train_options(**options))
    if not isinstance(loss, ClassWeightedLoss):  # re-weighting needs every loss to take class weights
        raise TypeError(f"loss {name} is a {type(loss).__name__}, not an engine.losses.ClassWeightedLoss")
    return loss
