"""BatchLoader: batches ``(x, y, idx)`` on a device from any re-iterable of index lists.

In-memory datasets are gathered and augmented in one vectorised ``get_batch`` call per batch (no
DataLoader, no per-sample loop); file datasets go through a ``torch.utils.data.DataLoader``, whose
augmented samples each carry their own seed (:class:`_SeededBatches`), so the images do not depend on
``num_workers`` nor on the state of the workers' random generators.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from utils import run_lock
from utils.errors import UserError
from utils.seeding import stream_seed

__all__ = ["BatchLoader", "sequential_batches", "shuffled_batches", "EpochBatches", "class_balanced_indices",
           "fresh_class_aware_indices"]


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


def class_balanced_indices(labels: torch.Tensor, num_classes: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` training indices: each row a class drawn uniformly (among classes with samples), then one of
    that class's samples uniformly."""
    labels = labels.cpu()
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    present = torch.nonzero(counts).flatten()
    classes = present[torch.randint(len(present), (n,), generator=generator)]
    offsets = (torch.rand(n, generator=generator, dtype=torch.float64) * counts[classes]).long()
    return order[starts[classes] + offsets]


def fresh_class_aware_indices(labels: torch.Tensor, n: int, samples_per_class: int,
                              generator: torch.Generator) -> torch.Tensor:
    """The first `n` training indices of a freshly made class-aware sampler (cRT / LWS, one per epoch;
    engine.phase_iii_decoupled): classes are visited in cycles, each cycle a random order of the classes
    that have samples; each visit takes the next `samples_per_class` indices of that class's own endless
    list, a random permutation of its samples followed by new permutations as it runs out (a visit may
    straddle two). The sampling of the classifier-balancing release's ``data/ClassAwareSampler.py``
    (``num_samples_cls``; its class and sample lists are reshuffled at every wrap). Vectorised: no loop
    over samples, classes or cycles. CBD's batches too (:class:`EpochBatches`)."""
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
    labels, k = labels.cpu().long(), int(samples_per_class)
    if n <= 0:
        return torch.empty(0, dtype=torch.long)
    counts = torch.bincount(labels)
    members = torch.argsort(labels, stable=True)          # the samples of class c: members[starts[c]:][:counts[c]]
    starts = torch.cumsum(counts, 0) - counts
    present = torch.nonzero(counts).flatten()
    visits = -(-n // k)
    cycles = -(-visits // len(present))
    # class of each visit: one random order of the present classes per cycle
    visit_class = present[torch.argsort(torch.rand(cycles, len(present), generator=generator), dim=1)].flatten()[:visits]
    # how many earlier visits its class has had: visit j of class c reads items j*k .. j*k+k-1 of its list
    by_class = torch.argsort(visit_class, stable=True)
    per_class = torch.bincount(visit_class, minlength=len(counts))
    first_visit = torch.cumsum(per_class, 0) - per_class
    earlier = torch.empty(visits, dtype=torch.long)
    earlier[by_class] = torch.arange(visits) - first_visit[visit_class[by_class]]
    # each class's list: as many permutations of its samples as its visits need, laid end to end
    perms = torch.where(per_class > 0, -(-(per_class * k) // counts.clamp_min(1)), 0)
    length = perms * counts
    list_start = torch.cumsum(length, 0) - length
    owner = torch.repeat_interleave(torch.arange(len(counts)), length)
    item = torch.arange(int(length.sum())) - list_start[owner]
    copy_start = list_start[owner] + item - item % counts[owner]   # where this item's permutation starts
    key = copy_start.double() + torch.rand(len(item), generator=generator, dtype=torch.float64)
    lists = members[starts[owner] + item % counts[owner]][torch.argsort(key)]  # shuffled within each permutation
    at = (list_start[visit_class] + earlier * k)[:, None] + torch.arange(k)
    return lists[at].flatten()[:n]


class EpochBatches:
    """The training batches of one epoch, shuffled and split across processes (a batch sampler).

    ``set_epoch(e)`` selects epoch ``e``, whose order is ``randperm(n)`` seeded by ``(seed, e)``: the
    same on every rank, and replayed exactly by a resumed run. Each global batch of ``batch_size``
    rows is cut into ``world_size`` equal parts and rank ``r`` takes part ``r``, so one step of N
    processes sees the same rows as one step of a single process. The last, short global batch is
    cut into equal parts too (its remainder, fewer than ``world_size`` rows, is left out that epoch).

    With ``labels`` and ``samples_per_class`` >= 1 (CBD's sampling, the TailCalibX release's
    ``ClassAwareSampler``), every row is class-aware instead: epoch ``e`` is the first ``R`` rows of a
    fresh class-aware sampler (:func:`fresh_class_aware_indices`, seeded by ``(seed, "phase_i.balanced",
    e)``), ``R = steps * batch_size`` with ``steps = max(1, n // batch_size)`` full global batches: the
    release's epoch of ``int(len(dataset) / batch_size)`` steps ("based on actual number of training data
    instead of oversampled data number", its ``libs/core/core_base.py``). The release keeps one sampler,
    whose class and per-class cycles run on across epochs; a fresh one per epoch keeps a resumed run exact
    (the difference is where a cycle starts).

    With ``labels`` and ``balanced_share`` > 0 (the ``mixed`` CBD variant of this project), ``round(share *
    size)`` rows of every global batch are i.i.d. class-balanced draws (:func:`class_balanced_indices`,
    seeded by ``(seed, "phase_i.balanced", e)``) and the rest come from the permutation, so an epoch still
    has ``n`` rows.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, *,
                 labels: torch.Tensor | None = None, balanced_share: float = 0.0,
                 samples_per_class: int = 0) -> None:
        if batch_size < 1 or batch_size % world_size:
            raise UserError(
                f"The batch size ({batch_size}) is the global batch and must be a positive multiple of the number of "
                f"processes ({world_size}); every process takes batch_size / {world_size} rows per step. "
                f"Set train.batch_size to a multiple of {world_size}."
            )
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.labels, self.balanced_share = labels, float(balanced_share) if labels is not None else 0.0
        self.samples_per_class = int(samples_per_class) if labels is not None else 0
        if self.samples_per_class and self.balanced_share:
            raise ValueError("class-aware batches (samples_per_class) and a class-balanced share exclude each other")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _global_sizes(self) -> list[int]:
        if self.samples_per_class:
            return [self.batch_size] * max(1, self.n // self.batch_size)
        full, rest = divmod(self.n, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest >= self.world_size else [])

    def __iter__(self) -> Iterator[list[int]]:
        if self.samples_per_class:
            yield from self._class_aware()
            return
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(stream_seed(self.seed, self.epoch)))
        sizes = self._global_sizes()
        balanced_rows = [round(self.balanced_share * size) for size in sizes]
        if any(balanced_rows):
            generator = torch.Generator().manual_seed(stream_seed(self.seed, "phase_i.balanced", self.epoch))
            balanced = class_balanced_indices(self.labels, int(self.labels.max()) + 1, sum(balanced_rows), generator)
        used = taken = 0
        for size, k in zip(sizes, balanced_rows):
            rows = order[used:used + size - k]
            if k:
                rows = torch.cat([rows, balanced[taken:taken + k]])
            used, taken = used + size - k, taken + k
            part = size // self.world_size
            yield rows[self.rank * part:(self.rank + 1) * part].tolist()

    def _class_aware(self) -> Iterator[list[int]]:
        sizes = self._global_sizes()
        total = sum(sizes)
        generator = torch.Generator().manual_seed(stream_seed(self.seed, "phase_i.balanced", self.epoch))
        rows = fresh_class_aware_indices(self.labels, total, self.samples_per_class, generator)
        part = self.batch_size // self.world_size
        for b in range(len(sizes)):
            batch = rows[b * self.batch_size:(b + 1) * self.batch_size]
            yield batch[self.rank * part:(self.rank + 1) * part].tolist()

    def __len__(self) -> int:
        return len(self._global_sizes())

    def samples_per_epoch(self) -> int:
        """Rows of one epoch over all processes (``n`` less the left-out remainder)."""
        return sum(size - size % self.world_size for size in self._global_sizes())


class _SeededBatches:
    """The batch sampler of an augmenting file dataset's DataLoader: each batch as ``[(index, seed), ...]``.

    Row ``k`` of batch ``b`` gets the seed ``stream_seed(batch seed, k)``, and ``FileImageDataset``
    runs its random transform under it. The seeds are made here, in the main process, and travel
    with the indices: persistent workers never see later changes to their copy of the dataset, and
    their own generators depend on ``num_workers``. The batch seed is ``batch_seeds[b]`` when given,
    else ``stream_seed(s, b)`` with ``s`` drawn from ``generator`` (the global generator if None)
    once per pass, as the in-memory path draws from that generator. Seeding rows by position, not
    by dataset index, keeps a sample that occurs twice in one batch (phase III) two different views.
    """

    def __init__(self, batches: Iterable[Sequence[int]], generator: torch.Generator | None,
                 batch_seeds: Sequence[int] | None) -> None:
        self.batches, self.generator, self.batch_seeds = batches, generator, batch_seeds

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        seeds = self.batch_seeds
        if seeds is None:
            pass_seed = int(torch.randint(2**31 - 1, (1,), generator=self.generator))
            seeds = [stream_seed(pass_seed, number) for number in range(len(self))]
        for batch, seed in zip(self.batches, seeds, strict=True):
            yield [(int(i), stream_seed(seed, k)) for k, i in enumerate(batch)]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _detach_worker(worker_id: int, parent: int) -> None:
    """In each DataLoader worker: let go of the parent's run locks, and (Linux) die with the parent, so that a
    `kill -9` of a run frees its lock at once and leaves no orphaned workers."""
    run_lock.forget_inherited_locks()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(0)


def _worker_message(exc: UserError) -> str | None:
    """The original message of a UserError that torch re-raised from a DataLoader worker, else None.

    torch re-raises it with the text "Caught UserError in DataLoader worker process N. Original
    Traceback ..." (on several lines): the worker's formatted traceback, whose last entry is
    ``utils.errors.UserError: <message>`` (a chained cause is printed before it; the message may
    span several lines).
    """
    text = str(exc)
    marker = f"\n{type(exc).__module__}.{type(exc).__qualname__}: "
    at = text.rfind(marker)
    return text[at + len(marker):].strip() if text.startswith("Caught ") and at >= 0 else None


class BatchLoader:
    """Iterate ``(x, y, idx)`` batches on ``device``.

    ``batch_sampler`` is any re-iterable of index lists (a list of lists, a ``BatchSampler``, ...).
    ``generator`` (optional) drives the augmentation randomness; ``batch_seeds`` (optional, one per
    batch) gives every batch its own seed instead, so a batch's augmentation does not depend on
    which batches came before it (nor on how they were shared between processes). In-memory
    datasets augment a batch with a generator seeded so; file datasets give each row a seed derived
    from it (:class:`_SeededBatches`). A UserError raised in a DataLoader worker (a corrupt image)
    is raised again here with its own message, not torch's worker traceback.
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
            # only augmenting file datasets draw random numbers; the others take plain indices
            sampler = batch_sampler
            if getattr(dataset, "augment", False):
                sampler = _SeededBatches(batch_sampler, generator, self.batch_seeds)
            self._loader = DataLoader(
                dataset,
                batch_sampler=sampler,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.num_workers > 0,
                # a private generator for the workers' base seed: iterating leaves the global generator alone
                generator=torch.Generator(),
                worker_init_fn=functools.partial(_detach_worker, parent=os.getpid()),
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
            try:
                for x, y, idx in self._loader:
                    yield (
                        x.to(self.device, non_blocking=nb),
                        y.to(self.device, non_blocking=nb),
                        idx.to(self.device, non_blocking=nb),
                    )
            except UserError as exc:
                message = _worker_message(exc)
                if message is None:
                    raise
                raise type(exc)(message) from None
