"""A phase I loss from one file (docs/ARCHITECTURE.md, "Adding a phase I loss"): label-smoothed
cross-entropy (Szegedy et al. 2016), the target one-hot mixed with the uniform distribution.

Use: ``LOSSES["label_smoothing"] = label_smoothing`` and ``METHODS.register(METHOD)``, then
``--opts train.loss=label_smoothing``. As a :class:`ClassWeightedLoss` it takes any re-weighting
schedule (``train.reweight``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.losses import ClassWeightedLoss
from engine.methods import PhaseIMethod

SMOOTHING = 0.1  # a loss option of its own would be a schema key of the train section


class LabelSmoothingLoss(ClassWeightedLoss):
    """Cross-entropy against ``(1 - smoothing) one_hot(y) + smoothing / C``, batch mean (class-weighted:
    PyTorch's weighted average)."""

    def __init__(self, smoothing: float):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=self.weights_for(logits), label_smoothing=self.smoothing)


def label_smoothing(counts: list[int], options: dict) -> LabelSmoothingLoss:
    """The `LOSSES` factory: `counts` (images per class) and `options` (the train section) are not needed."""
    return LabelSmoothingLoss(SMOOTHING)


# its phase I method: the run folder checkpoints/phase_i-label_smoothing, the report's row
METHOD = PhaseIMethod("label_smoothing", "Label-smoothed CE", "losses", settings=(("train.loss", "label_smoothing"),),
                      versus_baseline=True, summary=f"CE against targets smoothed by {SMOOTHING}")
