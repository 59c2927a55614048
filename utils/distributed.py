"""torchrun / DistributedDataParallel plumbing shared by every phase.

A script started by ``torchrun --nproc_per_node=N`` finds ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``
in its environment; :func:`setup_device` then joins the process group (NCCL on GPUs, gloo on the
CPU) and pins the process to ``cuda:LOCAL_RANK``. A plain ``python script.py`` is a world of one:
every helper here is then a no-op or the identity, so single-process runs take the same code path.

Who does what:
- rank 0 alone writes run folders, logs, TensorBoard, checkpoints, results (see :func:`on_main`);
- decisions taken on rank 0 (run mode, errors) are broadcast so every rank takes the same branch;
- evaluation shares the test set's batches among the ranks (:func:`interleaved_batches`) and gathers
  the predictions, so no sample is counted twice (unlike a padded ``DistributedSampler``).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from utils.device import parse_device, resolve_device
from utils.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def first_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process (known before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def context() -> DistContext:
    """The current process's place in the process group (a world of one when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistContext()


def setup_device(spec: str) -> torch.device:
    """``--device`` -> torch.device; under torchrun also joins the process group (once).

    With several processes ``--device auto`` (or a GPU index) means ``cuda:LOCAL_RANK`` with NCCL and
    ``--device cpu`` means gloo on the CPU. A GPU index is still checked to exist (no silent fall back
    to the CPU); LOCAL_RANK, not the index, picks each process's GPU."""
    if not launched_by_torchrun():
        return resolve_device(spec)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = parse_device(spec) != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"torchrun started local rank {local_rank}, but only {torch.cuda.device_count()} GPU(s) are visible. "
                f"Use --nproc_per_node={torch.cuda.device_count()} (one process per GPU)."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # a generous timeout: rank 0 writes checkpoints and stores while the others wait at a barrier
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60),
                                **({"device_id": device} if use_cuda else {}))
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if context().enabled:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the process's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable values only)."""
    if not context().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only; a UserError it raises is re-raised on every rank (so no rank waits
    forever in a collective). Other ranks get None."""
    ctx = context()
    if not ctx.enabled:
        return fn()
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)
    return result


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes ``train_subset.json`` or downloads), then the others."""
    ctx = context()
    if ctx.enabled and not ctx.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if ctx.enabled and ctx.is_main:
            dist.barrier()


def sync_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. DDP broadcasts them at the
    start of each forward, so after the last training step every rank holds slightly different ones;
    an evaluation sharded over the ranks must use the statistics the checkpoint (rank 0's) holds."""
    if not context().enabled:
        return
    device = _comm_device()
    for buffer in module.buffers():
        wire = buffer.detach().to(device)
        dist.broadcast(wire, src=0)
        buffer.copy_(wire)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over the ranks (a copy; float64 on the wire for exact counts)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``values`` over the ranks (a copy)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def _all_reduce(values: torch.Tensor, op) -> torch.Tensor:
    if not context().enabled:
        return values
    buf = values.detach().to(_comm_device(), torch.float64).clone()
    dist.all_reduce(buf, op=op)
    return buf.to(values.device, values.dtype)


def _padded_rows(rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``rows`` padded to the largest row count of any rank, and every rank's row count."""
    device = _comm_device()
    counts = torch.zeros(context().world_size, dtype=torch.long, device=device)
    counts[context().rank] = rows.shape[0]
    dist.all_reduce(counts)
    sizes = counts.tolist()
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]), device=device)
    padded[: rows.shape[0]] = rows.to(device)
    return padded, sizes


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenation over the ranks, in rank order, of each rank's ``rows`` (row counts may differ)."""
    if not context().enabled:
        return rows
    padded, sizes = _padded_rows(rows)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(rows.device)


def gather_parts(rows: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's ``rows`` (row counts may differ), as a list in rank order, on rank 0 only; the
    other ranks get None. A single process gets ``[rows]``."""
    ctx = context()
    if not ctx.enabled:
        return [rows]
    padded, sizes = _padded_rows(rows)
    parts = [torch.empty_like(padded) for _ in sizes] if ctx.is_main else None
    dist.gather(padded, parts, dst=0)
    if not ctx.is_main:
        return None
    return [p[:n].to(rows.device) for p, n in zip(parts, sizes)]


def interleaved_batches(n: int, batch_size: int, rank: int | None = None,
                        world_size: int | None = None) -> tuple[list[list[int]], list[int]]:
    """(batches, their numbers): the sequential batches of ``range(n)`` numbered j*world + rank.

    Rank r processes exactly the batches a single process would process as batch r, r+W, r+2W...;
    so per-batch results (and per-batch random seeds) do not depend on the number of processes."""
    ctx = context()
    rank = ctx.rank if rank is None else rank
    world_size = ctx.world_size if world_size is None else world_size
    numbers = list(range(rank, -(-n // batch_size), world_size))
    return [list(range(b * batch_size, min((b + 1) * batch_size, n))) for b in numbers], numbers


def interleaved_rounds(n: int, batch_size: int) -> int:
    """How many batches the busiest rank has in an interleaved pass (the number of gather rounds)."""
    batches = -(-n // batch_size)
    return -(-batches // context().world_size)
