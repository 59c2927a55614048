"""Feature decomposition (docs/METHOD.md 2.4).

A position of a normalised CAM ``M`` (values in [0, 1]) is class-specific when ``M >= ts`` and
class-generic when ``M < tg``; positions in between belong to neither side. ``ts > tg`` keeps the
two sets disjoint.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from utils.errors import UserError

__all__ = ["validate_thresholds", "split_masks", "SplitStatistics"]


def validate_thresholds(ts: float, tg: float) -> None:
    """Both thresholds in [0, 1] and ``ts > tg``, else UserError."""
    for name, value in (("ts", ts), ("tg", tg)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) \
                or not 0.0 <= float(value) <= 1.0:
            raise UserError(
                f"the decomposition threshold {name} must be a number in [0, 1] (CAMs are "
                f"normalised to [0, 1]); got {value!r}."
            )
    if not ts > tg:
        raise UserError(
            f"the class-specific threshold ts ({ts}) must be greater than the class-generic "
            f"threshold tg ({tg}), so that no position is both; e.g. ts=0.8, tg=0.2."
        )


def split_masks(cam: Tensor, ts: float, tg: float) -> tuple[Tensor, Tensor]:
    """``(specific = cam >= ts, generic = cam < tg)``, both bool with the shape of ``cam``.

    ``ts`` is inclusive and ``tg`` exclusive, as in the paper's definition. Note that an all-zero
    CAM (no evidence for the class) is entirely class-generic and has no specific position.
    """
    validate_thresholds(ts, tg)
    return cam >= ts, cam < tg


class SplitStatistics:
    """Accumulates, per class, the mean share of positions that are specific / generic.

    Feed batches with ``update(cam [B,H,W], labels [B])``; ``result()`` returns a dict of
    ``specific`` and ``generic`` (float64 ``[num_classes]``; NaN for a class that received no
    sample, because a share of nothing is undefined, not 0) and ``count`` (long
    ``[num_classes]``, samples seen per class).
    """

    def __init__(self, num_classes: int, ts: float, tg: float, device: torch.device | str | None = None):
        validate_thresholds(ts, tg)
        self.num_classes = int(num_classes)
        self.ts, self.tg = float(ts), float(tg)
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self._specific = torch.zeros(self.num_classes, dtype=dtype, device=device)
        self._generic = torch.zeros(self.num_classes, dtype=dtype, device=device)
        self._count = torch.zeros(self.num_classes, dtype=torch.long, device=device)

    def update(self, cam: Tensor, labels: Tensor) -> None:
        if cam.dim() != 3 or labels.reshape(-1).numel() != cam.shape[0]:
            raise ValueError(f"expected cam [B,H,W] and labels [B]; got {tuple(cam.shape)} and {tuple(labels.shape)}")
        dev = self._count.device
        labels = labels.reshape(-1).long().to(dev)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise UserError(f"labels must lie in [0, {self.num_classes - 1}]; got {labels.min().item()}..{labels.max().item()}.")
        specific, generic = split_masks(cam.to(dev), self.ts, self.tg)
        # Per-sample shares, then one scatter-add per statistic (no per-class loop).
        self._specific.index_add_(0, labels, specific.flatten(1).to(self._specific.dtype).mean(1))
        self._generic.index_add_(0, labels, generic.flatten(1).to(self._generic.dtype).mean(1))
        self._count.index_add_(0, labels, torch.ones_like(labels))

    def result(self) -> dict[str, Tensor]:
        count = self._count.to(self._specific.dtype)
        empty = self._count == 0
        denom = torch.where(empty, torch.ones_like(count), count)
        nan = torch.full_like(count, float("nan"))
        return {
            "specific": torch.where(empty, nan, self._specific / denom),
            "generic": torch.where(empty, nan, self._generic / denom),
            "count": self._count.clone(),
        }

