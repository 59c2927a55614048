"""BatchLoader: batches ``(x, y, idx)`` on a device from any re-iterable of index lists.

In-memory datasets are gathered and augmented in one vectorised ``get_batch`` call per batch (no
DataLoader, no per-sample loop); file datasets go through a ``torch.utils.data.DataLoader``.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

__all__ = ["BatchLoader", "sequential_batches", "shuffled_batches", "RandomBatches"]


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


class RandomBatches:
    """Re-iterable sampler: every iteration is a fresh :func:`shuffled_batches` from ``generator``."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False):
        self.n, self.batch_size, self.generator, self.drop_last = int(n), int(batch_size), generator, bool(drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(shuffled_batches(self.n, self.batch_size, self.generator, self.drop_last))

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


class BatchLoader:
    """Iterate ``(x, y, idx)`` batches on ``device``.

    ``batch_sampler`` is any re-iterable of index lists (a list of lists, a ``BatchSampler``, ...).
    ``generator`` (optional) drives the in-memory augmentation randomness.
    """

    def __init__(
        self,
        dataset,
        batch_sampler: Iterable[Sequence[int]],
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        self.generator = generator
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
            for batch in self.batch_sampler:
                idx = torch.as_tensor(batch, dtype=torch.long).reshape(-1)
                x = self.dataset.get_batch(idx, self.device, self.generator)
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
