"""Head / tail split from training counts (docs/METHOD.md 2.2). Never hard-coded."""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from utils.errors import UserError

__all__ = ["head_tail_split"]

# Tolerance on the share comparison, so that e.g. 900 of 1000 samples reaches hr = 0.9 even
# though the binary float 0.9 is a hair above 9/10.
_SHARE_TOL = 1e-9


def head_tail_split(counts: Sequence[int] | Tensor, hr: float) -> tuple[list[int], list[int]]:
    """Split classes into ``(head, tail)`` lists of class indices, each sorted ascending.

    Classes are ranked by training count, largest first, ties broken by the smaller class index;
    head = the shortest prefix of that ranking whose share of all training samples reaches
    ``hr`` (in (0, 1]); every other class is tail (including classes with zero samples).
    """
    if isinstance(hr, bool) or not isinstance(hr, (int, float)) or math.isnan(hr) or not 0.0 < hr <= 1.0:
        raise UserError(f"the head ratio hr must be in (0, 1] (share of training samples owned by head classes, e.g. 0.9); got {hr!r}.")
    values = counts.tolist() if isinstance(counts, Tensor) else list(counts)
    if not values:
        raise UserError("cannot split head / tail classes: the class-count list is empty.")
    if any(int(c) != c or c < 0 for c in values):
        raise UserError(f"class counts must be non-negative integers; got {values}.")
    values = [int(c) for c in values]
    total = sum(values)
    if total == 0:
        raise UserError("cannot split head / tail classes: the training set has no samples.")
    order = sorted(range(len(values)), key=lambda c: (-values[c], c))
    head: list[int] = []
    running = 0
    for cls in order:
        head.append(cls)
        running += values[cls]
        if running / total >= hr - _SHARE_TOL:
            break
    head_set = set(head)
    tail = [c for c in range(len(values)) if c not in head_set]
    return sorted(head), tail
