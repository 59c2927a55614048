"""Class-balanced distillation (CBD; Iscen et al., "Class-Balanced Distillation for Long-Tailed Visual
Recognition", BMVC 2021) as the TailCalibX release runs it (github.com/rahulvigneswaran/TailCalibX:
experiment 0.4 of ``libs/utils/experiments_maker.py``, ``libs/core/ecbd.py``, ``libs/loss/CosineDistill.py``).

A student (a cosine-classifier :class:`models.LTModel`) learns from ``K`` frozen teachers, CosineCE
runs of the same config that differ in their seed (the release: ``K = 1``, the CosineCE run of seed
10 / 20 / 30 for student seed 1 / 2 / 3, on CIFAR-100-LT and mini-ImageNet-LT alike):

- teacher features: each teacher's pooled feature L2-normalised, the ``K`` concatenated, the result
  L2-normalised again (:class:`TeacherEnsemble`). The release's teachers are trainable modules with
  frozen weights that its loop switches to ``train()`` with the student, so their batch norm uses the
  batch's statistics (``batch_statistics=True``; ``distill.teacher_bn: batch``);
- student features: the pooled feature L2-normalised; with ``K > 1`` then mapped by a linear layer to
  the teachers' dimension ``K * D`` and L2-normalised again (:class:`DistillStudent`, the release's
  ``ecbd_converter``, used in training only), with ``K = 1`` compared as it is (the release builds no
  converter for one teacher);
- loss: ``(1 - alpha) * CE(student logits, y) + alpha * beta * mean(1 - cos(student, teachers))``
  (:func:`cbd_loss`), the release's weighting (CIFAR-100-LT: alpha 0.8, beta 100 at imbalance 100 and
  10, 200 at 50; mini-ImageNet-LT: alpha 0.4, beta 100);
- sampling: every batch class-aware, the release's ``ClassAwareSampler`` with 4 samples per class
  draw (``datasets.loader.EpochBatches(samples_per_class=...)``). The CBD paper trains its second
  stage with class-balanced sampling; the ``mixed`` variant (part of every batch instance-balanced,
  ``distill.sampler: mixed``) is this project's own, not the paper's nor the release's.
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
    """The student model and (``project``, the release's rule: more than one teacher) its projection to
    the teachers' feature space; ``forward(x)`` returns ``(logits, normalised student feature)`` in one
    pass (the module DDP wraps). Without projection the student's feature is its normalised pooled
    feature itself, which must then have the teachers' dimension."""

    def __init__(self, model: LTModel, teacher_dim: int, project: bool = True):
        super().__init__()
        self.model = model
        if not project and teacher_dim != model.feature_dim:
            raise ValueError(f"without a projection the student's feature ({model.feature_dim}-d) must match the "
                             f"teachers' ({teacher_dim}-d)")
        self.projection = nn.Linear(model.feature_dim, teacher_dim) if project else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = _pooled(self.model, x)
        student = F.normalize(feature, dim=1)
        if self.projection is not None:
            student = F.normalize(self.projection(student), dim=1)
        return self.model.fc(feature), student


class TeacherEnsemble(nn.Module):
    """Frozen teachers; ``forward(x)`` = the normalised concatenation of their normalised pooled
    features, without a graph. Their mode is fixed at construction and ``train()`` / ``eval()`` leave it
    alone: ``batch_statistics=True`` (the release) keeps them in train mode, so batch norm normalises with
    the batch's statistics (and updates the in-memory running averages, which nothing reads; the teachers'
    checkpoints are untouched); ``False`` keeps them in eval mode, with their stored statistics."""

    def __init__(self, teachers: list[LTModel], batch_statistics: bool = True):
        super().__init__()
        if not teachers:
            raise ValueError("CBD needs at least one teacher")
        self.teachers = nn.ModuleList(teachers)
        self.batch_statistics = bool(batch_statistics)
        for p in self.parameters():
            p.requires_grad_(False)
        self.train()

    @property
    def feature_dim(self) -> int:
        return sum(t.feature_dim for t in self.teachers)

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(self.batch_statistics)  # the mode chosen at construction

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
