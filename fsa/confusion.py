"""Confusing classes (docs/METHOD.md 2.5).

``S[t, j]`` = mean softmax score of class ``j`` over the training samples whose TRUE class is
``t`` (rows = true class). The confusing classes of tail class ``t`` are the top-``Nf`` entries of
row ``t`` (excluding ``t`` itself). Ranking column ``t`` instead (the transpose) is a known bug of
the public implementation: it would pick the classes whose samples look like ``t``, not the
classes that ``t``'s samples are mistaken for.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor

from utils.errors import UserError

__all__ = ["ScoreAccumulator", "confusing_classes", "confusing_table"]


class ScoreAccumulator:
    """Accumulate per-true-class sums of softmax scores over batches of logits.

    ``matrix()`` is the ``[C, C]`` mean softmax score matrix (float32, rows = true class). A row
    whose class received no sample is all zeros (not NaN, so it can be saved and ranked safely);
    ``counts`` (long ``[C]``) tells such rows apart.
    """

    def __init__(self, num_classes: int, device: torch.device | str | None = None):
        if int(num_classes) < 1:
            raise UserError(f"num_classes must be at least 1; got {num_classes}.")
        self.num_classes = int(num_classes)
        device = torch.device(device) if device is not None else torch.device("cpu")
        # float64 sums: a head class can contribute tens of thousands of rows.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.sums = torch.zeros(self.num_classes, self.num_classes, dtype=dtype, device=device)
        self.counts = torch.zeros(self.num_classes, dtype=torch.long, device=device)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Add a batch: ``logits [B, C]`` (pre-softmax), ``labels [B]`` true classes."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise UserError(
                f"expected logits of shape [B, {self.num_classes}]; got {tuple(logits.shape)}. "
                "Does the checkpoint's class count match the dataset's?"
            )
        dev = self.sums.device
        labels = labels.reshape(-1).long().to(dev)
        if labels.numel() != logits.shape[0]:
            raise ValueError(f"got {labels.numel()} labels for {logits.shape[0]} logit rows")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise UserError(f"labels must lie in [0, {self.num_classes - 1}]; got {int(labels.min())}..{int(labels.max())}.")
        probs = torch.softmax(logits.detach().to(dev, self.sums.dtype), dim=1)
        self.sums.index_add_(0, labels, probs)
        self.counts.index_add_(0, labels, torch.ones_like(labels))

    def matrix(self) -> Tensor:
        denom = self.counts.clamp_min(1).to(self.sums.dtype)[:, None]
        return (self.sums / denom).float()


def confusing_classes(score_matrix: Tensor, classes: Iterable[int], nf: int) -> dict[int, list[int]]:
    """For each class ``t`` in ``classes``: the ``nf`` classes ``j != t`` with the largest
    ``score_matrix[t, j]`` (row ``t`` = true class ``t``), best first, ties -> smaller index.
    """
    scores = torch.as_tensor(score_matrix).detach().cpu().double()
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise UserError(f"the score matrix must be square [C, C]; got shape {tuple(scores.shape)}.")
    num_classes = scores.shape[0]
    if isinstance(nf, bool) or int(nf) != nf or nf < 1 or nf >= num_classes:
        raise UserError(
            f"the number of confusing classes Nf must be an integer in [1, {num_classes - 1}] "
            f"(there are {num_classes} classes and a class cannot confuse itself); got {nf}."
        )
    nf = int(nf)
    cls = [int(c) for c in classes]
    if not cls:
        return {}
    bad = [c for c in cls if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"classes {bad} are outside [0, {num_classes - 1}].")
    if torch.isnan(scores[cls]).any():
        raise UserError("the score matrix has NaN entries in the requested rows; re-run phase II.")
    idx = torch.tensor(cls, dtype=torch.long)
    rows = scores[idx].clone()                                # [T, C]: rows = true class
    rows[torch.arange(len(cls)), idx] = float("-inf")          # a class never confuses itself
    # Stable ascending sort of the negated scores: equal scores keep ascending class order.
    order = torch.sort(-rows, dim=1, stable=True).indices[:, :nf]
    return {c: order[i].tolist() for i, c in enumerate(cls)}


def confusing_table(confusing: Mapping[int, Iterable[int]], num_classes: int, nf: int) -> Tensor:
    """Dense ``LongTensor[num_classes, nf]`` form of ``confusing`` for :func:`fsa.fusion.sample_donors`;
    rows of classes absent from ``confusing`` (head classes) are filled with -1.
    """
    table = torch.full((int(num_classes), int(nf)), -1, dtype=torch.long)
    for cls, donors in confusing.items():
        donors = list(donors)
        if len(donors) != nf:
            raise ValueError(f"class {cls} has {len(donors)} confusing classes, expected {nf}")
        table[int(cls)] = torch.tensor(donors, dtype=torch.long)
    return table
