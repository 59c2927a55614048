"""Phase III batch composition (docs/METHOD.md 2.7): `Nt` tail samples, their `Nt*Na` generated maps, and
`Nt*(1+Na)` head samples: `2*Nt*(1+Na)` rows in all.

Every draw of iteration `it` is a pure function of (seed, it), so a resumed run replays the same
batches. Tail samples are tail-class balanced: the tail classes are consumed from an endless stream
of random permutations, so every tail class is visited at least once in any `ceil((2T - 1) / Nt)`
consecutive iterations (2T - 1 stream positions always hold one whole permutation); the sample
within a class is uniform. Head samples are drawn uniformly over all head images
(instance-balanced), as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fsa.fusion import DonorPool
from utils.errors import UserError
from utils.seeding import stream_seed


@dataclass(frozen=True)
class BatchPlan:
    tail: Tensor  # [Nt] sample indices
    head: Tensor  # [Nt*(1+Na)] sample indices


def batch_size(nt: int, na: int) -> int:
    return 2 * nt * (1 + na)


# The paper's budget, 6,400 iterations of 128 rows on CIFAR-10-LT's 12,406 training images: about 66 rows
# per training image. `finetune.iterations: null` keeps that ratio for any training set, so that a small
# image folder is not fine-tuned for 6,400 iterations (and CIFAR-10-LT at the paper's batch gets 6,400).
PAPER_ROWS_PER_IMAGE = 6400 * 128 / 12406


def auto_iterations(train_images: int, nt: int, na: int) -> int:
    """Phase III iterations that show `PAPER_ROWS_PER_IMAGE` rows per training image at batch 2*nt*(1+na)."""
    return max(1, round(PAPER_ROWS_PER_IMAGE * train_images / batch_size(nt, na)))


class TailHeadComposer:
    """Draws the real (tail, head) sample indices of each phase III iteration."""

    def __init__(self, labels: Tensor, tail_classes: list[int], head_classes: list[int], nt: int, na: int, seed: int):
        if nt < 1 or na < 0:
            raise UserError(f"finetune.nt must be >= 1 and finetune.na >= 0 (batch 2*nt*(1+na)); got nt={nt}, na={na}.")
        labels = torch.as_tensor(labels).long().cpu()
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
        self.pool = DonorPool.from_labels(labels, num_classes)
        counts = self.pool.counts()
        self.tail_classes = torch.tensor([c for c in tail_classes if c < num_classes and counts[c] > 0], dtype=torch.long)
        if len(self.tail_classes) == 0:
            raise UserError("phase III needs at least one tail class with training samples; phase II's split.json lists none. "
                            "Lower eval.hr in the phase I config (more classes become tail; it is the one head / tail "
                            "share of every phase), then rerun phases I and II.")
        is_head = torch.zeros(num_classes, dtype=torch.bool)
        is_head[[c for c in head_classes if c < num_classes]] = True
        self.head_samples = torch.nonzero(is_head[labels]).squeeze(1)
        if len(self.head_samples) == 0:
            raise UserError("phase III needs head-class training samples; phase II's split.json lists no head class.")
        self.nt, self.na, self.seed = nt, na, seed

    def tail_class_stream(self, start: int, count: int) -> Tensor:
        """Positions [start, start+count) of the endless stream of tail-class permutations."""
        t = len(self.tail_classes)
        positions = torch.arange(start, start + count)
        rounds = positions // t
        first, last = start // t, (start + max(count, 1) - 1) // t
        # one permutation per round touched (a handful), each seeded by its round number
        perms = torch.stack([torch.randperm(t, generator=torch.Generator().manual_seed(stream_seed(self.seed, -1 - r)))
                             for r in range(first, last + 1)])
        return self.tail_classes[perms[rounds - first, positions % t]]

    def sample_from_classes(self, classes: Tensor, generator: torch.Generator) -> Tensor:
        """One uniformly drawn sample index of each given class (vectorised)."""
        counts = self.pool.counts()[classes]
        member = (torch.rand(len(classes), generator=generator) * counts).long().clamp_max(counts - 1)
        return self.pool.indices[self.pool.offsets[classes] + member]

    def plan(self, iteration: int) -> tuple[BatchPlan, torch.Generator]:
        """The iteration's tail and head indices, and a generator for the iteration's other draws."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, iteration))
        tail = self.sample_from_classes(self.tail_class_stream(iteration * self.nt, self.nt), generator)
        n_head = self.nt * (1 + self.na)
        head = self.head_samples[torch.randint(len(self.head_samples), (n_head,), generator=generator)]
        return BatchPlan(tail=tail, head=head), generator
