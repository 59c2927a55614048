"""Evaluation metrics for long-tailed classification.

Groups come from the training counts: many-shot > 100, medium 20..100, few < 20, and the
head / tail split of the hr rule. A group with no class is reported as None (absent), never 0.
"""
from __future__ import annotations

import torch

from fsa.class_split import head_tail_split

MANY_SHOT_ABOVE = 100
FEW_SHOT_BELOW = 20


def shot_groups(counts: list[int]) -> dict[str, list[int]]:
    return {
        "many": [c for c, n in enumerate(counts) if n > MANY_SHOT_ABOVE],
        "medium": [c for c, n in enumerate(counts) if FEW_SHOT_BELOW <= n <= MANY_SHOT_ABOVE],
        "few": [c for c, n in enumerate(counts) if n < FEW_SHOT_BELOW],
    }


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true, predicted] counts, one bincount (no Python loop over samples)."""
    flat = targets.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def group_accuracy(per_class: torch.Tensor, classes: list[int]) -> float | None:
    """Mean of per-class accuracies (the convention of LT papers): classes weigh equally."""
    if not classes:
        return None
    values = per_class[classes]
    values = values[~torch.isnan(values)]
    return float(values.mean()) * 100 if len(values) else None


def classification_report(preds: torch.Tensor, targets: torch.Tensor, train_counts: list[int], hr: float) -> dict:
    """top-1 and group accuracies (percent), per-class accuracy, confusion matrix, and the groups used."""
    num_classes = len(train_counts)
    cm = confusion_matrix(preds.cpu(), targets.cpu(), num_classes)
    support = cm.sum(1)
    per_class = torch.where(support > 0, cm.diag().double() / support.clamp_min(1), torch.full_like(support, float("nan"), dtype=torch.float64))
    groups = shot_groups(train_counts)
    head, tail = head_tail_split(train_counts, hr)
    report = {
        "top1": float(cm.diag().sum()) / max(int(cm.sum()), 1) * 100,
        "mean_class_acc": group_accuracy(per_class, list(range(num_classes))),
        **{name: group_accuracy(per_class, classes) for name, classes in groups.items()},
        "head": group_accuracy(per_class, head),
        "tail": group_accuracy(per_class, tail),
        "per_class": [None if torch.isnan(v) else float(v) * 100 for v in per_class],
        "confusion": cm.tolist(),
        "train_counts": list(train_counts),
        "groups": {**groups, "head": head, "tail": tail, "hr": hr},
        "num_test_samples": int(cm.sum()),
    }
    return report


SCALAR_KEYS = ("top1", "mean_class_acc", "many", "medium", "few", "head", "tail")


def summary_line(report: dict) -> str:
    parts = []
    for key in SCALAR_KEYS:
        value = report.get(key)
        parts.append(f"{key} {'absent' if value is None else f'{value:.2f}'}")
    return " | ".join(parts)
