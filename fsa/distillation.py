"""Class-balanced distillation (CBD; Iscen et al., "Class-Balanced Distillation for Long-Tailed Visual
Recognition", BMVC 2021), the strongest backbone of the TailCalibX release.

A student (a cosine-classifier :class:`models.LTModel`) learns from ``K`` frozen teachers, CosineCE
runs of the same config that differ in their seed:

- teacher features: each teacher's pooled feature L2-normalised, the ``K`` concatenated, the result
  L2-normalised again (:class:`TeacherEnsemble`);
- student features: the pooled feature L2-normalised, mapped by a linear layer to the teachers'
  dimension ``K * D`` and L2-normalised (:class:`DistillStudent`; the layer is used in training only);
- loss: ``(1 - alpha) * CE(student logits, y) + alpha * beta * mean(1 - cos(student, teachers))``
  (:func:`cbd_loss`), the release's weighting (its sweep: alpha in {0.2, 0.4, 0.8}, beta in
  {50, 100, 200});
- sampling: part of every batch class-balanced, the rest instance-balanced
  (``datasets.loader.EpochBatches(balanced_share=...)``); the paper combines the two samplings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import LTModel

__all__ = ["DistillStudent", "TeacherEnsemble", "cbd_loss"]


def _pooled(model: LTModel, x: torch.Tensor) -> torch.Tensor:
    return model.pool(model.features(x))


class DistillStudent(nn.Module):
    """The student model and its projection to the teachers' feature space; ``forward(x)`` returns
    ``(logits, projected normalised feature)`` in one pass (the module DDP wraps)."""

    def __init__(self, model: LTModel, teacher_dim: int):
        super().__init__()
        self.model = model
        self.projection = nn.Linear(model.feature_dim, teacher_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = _pooled(self.model, x)
        projected = self.projection(F.normalize(feature, dim=1))
        return self.model.fc(feature), F.normalize(projected, dim=1)


class TeacherEnsemble(nn.Module):
    """Frozen teachers in eval mode; ``forward(x)`` = the normalised concatenation of their normalised
    pooled features, without a graph."""

    def __init__(self, teachers: list[LTModel]):
        super().__init__()
        if not teachers:
            raise ValueError("CBD needs at least one teacher")
        self.teachers = nn.ModuleList(teachers)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @property
    def feature_dim(self) -> int:
        return sum(t.feature_dim for t in self.teachers)

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(False)  # teachers keep their batch-norm statistics

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [F.normalize(_pooled(t, x).float(), dim=1) for t in self.teachers]
        return F.normalize(torch.cat(features, dim=1), dim=1)


def cbd_loss(logits: torch.Tensor, target: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, *,
             alpha: float, beta: float) -> torch.Tensor:
    """``(1 - alpha) * CE + alpha * beta * mean(1 - cos(student, teacher))`` (student / teacher rows
    already unit-norm, so the cosine is their dot product)."""
    distill = (1 - (student.float() * teacher.float()).sum(dim=1)).mean()
    return (1 - alpha) * F.cross_entropy(logits.float(), target) + alpha * beta * distill
