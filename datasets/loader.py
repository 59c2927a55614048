"""BatchLoader: batches ``(x, y, idx)`` on a device from any re-iterable of index lists.

In-memory datasets are gathered and augmented in one vectorised ``get_batch`` call per batch (no
DataLoader, no per-sample loop); file datasets go through a ``torch.utils.data.DataLoader``.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from utils.errors import UserError
from utils.seeding import derived_seed

__all__ = ["BatchLoader", "sequential_batches", "shuffled_batches", "EpochBatches"]


def _chunks(order: Sequence[int], batch_size: int, drop_last: bool) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(order)
    stop = n - n % batch_size if drop_last else n
    return [list(order[i : i + batch_size]) for i in range(0, stop, batch_size)]


def sequential_batches(n: int, batch_size: int) -> list[list[int]]:
    """``[[0..b-1], [b..2b-1], ...]`` covering ``range(n)`` in order (last batch may be short)."""
    return _chunks(range(n), batch_size, drop_last=False)


def shuffled_batches(
    n: int, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False
) -> list[list[int]]:
    """One random permutation of ``range(n)`` cut into batches (call again for a new epoch)."""
    order = torch.randperm(n, generator=generator).tolist()
    return _chunks(order, batch_size, drop_last)


class EpochBatches:
    """The training batches of one epoch, shuffled and split across processes (a batch sampler).

    ``set_epoch(e)`` selects epoch ``e``, whose order is ``randperm(n)`` seeded by ``(seed, e)``: the
    same on every rank, and replayed exactly by a resumed run. Each global batch of ``batch_size``
    rows is cut into ``world_size`` equal parts and rank ``r`` takes part ``r``, so one step of N
    processes sees the same rows as one step of a single process. The last, short global batch is
    cut into equal parts too (its remainder, fewer than ``world_size`` rows, is left out that epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or batch_size % world_size:
            raise UserError(
                f"The batch size ({batch_size}) is the global batch and must be a positive multiple of the number of "
                f"processes ({world_size}); every process takes batch_size / {world_size} rows per step. "
                f"Set train.batch_size to a multiple of {world_size}."
            )
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _global_sizes(self) -> list[int]:
        full, rest = divmod(self.n, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest >= self.world_size else [])

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(derived_seed(self.seed, self.epoch)))
        for b, size in enumerate(self._global_sizes()):
            part = size // self.world_size
            start = b * self.batch_size + self.rank * part
            yield order[start:start + part].tolist()

    def __len__(self) -> int:
        return len(self._global_sizes())

    def samples_per_epoch(self) -> int:
        """Rows of one epoch over all processes (``n`` less the left-out remainder)."""
        return sum(size - size % self.world_size for size in self._global_sizes())


class BatchLoader:
    """Iterate ``(x, y, idx)`` batches on ``device``.

    ``batch_sampler`` is any re-iterable of index lists (a list of lists, a ``BatchSampler``, ...).
    ``generator`` (optional) drives the in-memory augmentation randomness; ``batch_seeds`` (optional,
    one per batch) gives every batch its own seeded generator instead, so a batch's augmentation does
    not depend on which batches came before it (nor on how they were shared between processes).
    """

    def __init__(
        self,
        dataset,
        batch_sampler: Iterable[Sequence[int]],
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        generator: torch.Generator | None = None,
        batch_seeds: Sequence[int] | None = None,
    ) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        self.generator = generator
        self.batch_seeds = list(batch_seeds) if batch_seeds is not None else None
        self.in_memory = hasattr(dataset, "get_batch")
        self._loader = None
        if not self.in_memory:
            self._loader = DataLoader(
                dataset,
                batch_sampler=batch_sampler,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.num_workers > 0,
            )

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.in_memory:
            targets = self.dataset.targets
            for number, batch in enumerate(self.batch_sampler):
                idx = torch.as_tensor(batch, dtype=torch.long).reshape(-1)
                generator = self.generator
                if self.batch_seeds is not None:
                    generator = torch.Generator().manual_seed(self.batch_seeds[number])
                x = self.dataset.get_batch(idx, self.device, generator)
                y = targets.index_select(0, idx).to(self.device, non_blocking=True)
                yield x, y, idx.to(self.device, non_blocking=True)
        else:
            nb = self.device.type == "cuda"
            for x, y, idx in self._loader:
                yield (
                    x.to(self.device, non_blocking=nb),
                    y.to(self.device, non_blocking=nb),
                    idx.to(self.device, non_blocking=nb),
                )
