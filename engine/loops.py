"""The train / evaluate loops every method shares (single process or one rank of a torchrun job):
:func:`fit` with a method's :class:`TrainingTask`, and the evaluation helpers."""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from datasets.loader import BatchLoader
from engine.accel import NO_ACCEL, Accel
from engine.metrics import classification_report
from engine.optim import set_lr
from models.base import eval_mode
from utils import distributed, threads
from utils.errors import UserError
from utils.seeding import stream_seed


def progress(items: Iterable, desc: str) -> Iterable:
    """`items` of a long loop, shown (:func:`progress_display`); each item lets the thread policy follow
    the machine's load (:func:`utils.threads.tick`)."""
    for item in progress_display(items, desc):
        threads.tick()
        yield item


def progress_display(items: Iterable, desc: str) -> Iterable:
    """`items`, showing the loop's progress on rank 0: a tqdm bar when stderr is a terminal, else (a log
    file, a pipe) a plain line now and then (:class:`PlainProgress`), never a redraw per batch. TQDM_DISABLE
    (any non-empty value, as tqdm reads it) silences both; the other ranks of a torchrun job iterate silently."""
    if not distributed.context().is_main or os.environ.get("TQDM_DISABLE"):
        return items
    if sys.stderr.isatty():
        return tqdm(items, desc=desc, leave=False, dynamic_ncols=True)
    return PlainProgress(items, desc)


class PlainProgress:
    """Iterates `items`, writing ``HH:MM:SS desc: done/total (p%), elapsed, left`` to stderr once both
    `every_s` seconds and `share` of the loop have passed since the last line: fewer than 1/`share` lines
    per loop, none at its end and none for a loop shorter than `every_s` (the log line that follows says enough)."""

    def __init__(self, items: Iterable, desc: str, *, every_s: float = 30.0, share: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        self.items, self.desc, self.every_s, self.share, self.clock = items, desc, every_s, share, clock

    def __iter__(self):
        total = len(self.items) if hasattr(self.items, "__len__") else None
        start = last = self.clock()
        shown = 0
        for done, item in enumerate(self.items, 1):
            yield item
            now = self.clock()
            if done == total or now - last < self.every_s or (total and done - shown < self.share * total):
                continue
            where = f"{done}/{total} ({100 * done / total:.0f}%)" if total else f"{done}"
            left = f", about {(now - start) * (total - done) / done:.0f} s left" if total else ""
            print(f"{time.strftime('%H:%M:%S')} {self.desc}: {where}, {now - start:.0f} s{left}", file=sys.stderr,
                  flush=True)
            last, shown = now, done


@dataclass
class StepResult:
    """One optimisation step of a method, as the loop needs it."""

    loss: torch.Tensor                  # what is back-propagated: this process's share of the batch objective
    weight: float                       # weight of `loss` in the window's mean training loss (rows, or 1)
    logits: torch.Tensor | None = None  # this process's rows, for the training accuracy
    targets: torch.Tensor | None = None


class TrainingTask:
    """A method's side of :func:`fit`: its batches, its step function, its evaluation.

    A unit is an epoch or an iteration (``step_name``); ``fit`` runs units ``start..total-1``, books
    (log line, TensorBoard, ``last.pt``) every ``record_every`` units and at the end, and evaluates
    at the booked units that are multiples of ``eval_every`` and at the end."""

    step_name = "epoch"
    total = 1
    eval_every = 1
    record_every = 1
    save_every = 0              # periodic model_<step>_NNNN.pt every this many units (0: none)
    evaluate_first = False      # evaluate (and book step 0) before the first step of a fresh run
    progress_over_units = False  # one progress display over the units (iterations) instead of one per unit
    # the settings that make training diverge, named when the loss or the weights stop being finite
    divergence_settings = "the learning rate and momentum"

    def begin(self, unit: int) -> None:
        """Before unit `unit`: reseed, regenerate (every draw a pure function of seed and unit)."""

    def batches(self, unit: int) -> Iterable:
        raise NotImplementedError

    def lr(self, unit: int, batch: int, batches: int) -> float | None:
        """The learning rate of batch `batch` of unit `unit` (None: leave the optimizer's)."""
        return None

    def step(self, batch) -> StepResult:
        raise NotImplementedError

    def unit_stats(self, unit: int, seconds: float) -> dict:
        """Extra training numbers of unit `unit` (`seconds`: its training time, evaluation excluded)."""
        return {}

    def evaluate(self) -> tuple[dict, dict | None]:
        """(test report, validation report or None) of the current model."""
        raise NotImplementedError


_BATCHES_PER_UNIT = 2**24  # a step is numbered unit * this + batch (exact in float64 up to 2^29 units)


class _Window:
    """Training loss / accuracy since the last booking, accumulated on the device (one sync per booking),
    and the first batch whose loss was not finite (a device value too: no sync per step)."""

    def __init__(self):
        self.totals: torch.Tensor | None = None  # loss * weight, weight, correct, rows, first non-finite batch

    def add(self, out: StepResult, unit: int, batch: int) -> None:
        loss = out.loss.detach().double() * out.weight
        zero = torch.zeros((), dtype=torch.float64, device=loss.device)
        correct = rows = zero
        if out.logits is not None:
            correct = (out.logits.detach().argmax(1) == out.targets).sum().double()
            rows = zero + len(out.targets)
        bad = torch.where(torch.isfinite(loss), zero + math.inf, zero + unit * _BATCHES_PER_UNIT + batch)
        step = torch.stack([loss, zero + out.weight, correct, rows, bad])
        if self.totals is None:
            self.totals = step
        else:
            totals = self.totals.to(step.device)
            self.totals = torch.cat([totals[:4] + step[:4], torch.minimum(totals[4:], step[4:])])

    def first_nonfinite(self) -> tuple[int, int] | None:
        """(unit, batch) of the window's first step whose loss was NaN or infinite, on any process."""
        local = math.inf if self.totals is None else float(self.totals[4])
        first = -distributed.all_reduce_max(torch.tensor([-local], dtype=torch.float64))[0].item()
        return None if math.isinf(first) else divmod(int(first), _BATCHES_PER_UNIT)

    def result(self) -> dict:
        totals = torch.zeros(4, dtype=torch.float64) if self.totals is None else self.totals[:4].cpu()
        loss, weight, correct, rows = distributed.all_reduce_sum(totals).tolist()
        out = {"loss": loss / max(weight, 1e-12)}
        if rows:
            out["train_acc"] = correct / rows * 100
        return out


class TrainingDiverged(UserError):
    """Training produced a non-finite loss or weight: the run stops before booking (so `last.pt` and
    `best_model.pt` keep the last good step) with a message naming the step and the settings to lower."""


def _check_finite(task: TrainingTask, optimizer: torch.optim.Optimizer, window: _Window, batches: int,
                  recorder, *, scaled: bool) -> None:
    """Raise `TrainingDiverged` if a loss of the window (not under an fp16 loss scaler, which skips such
    steps by design) or a trained weight is NaN or infinite."""
    bad_step = None if scaled else window.first_nonfinite()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    broken = float(not all(bool(torch.isfinite(p.detach()).all()) for p in params))
    weights_ok = distributed.all_reduce_max(torch.tensor([broken]))[0].item() == 0
    if bad_step is None and weights_ok:
        return
    if bad_step is not None:
        unit, batch = bad_step
        where = f"the loss became NaN or infinite in {task.step_name} {unit + 1}" + (
            f" (batch {batch + 1} of {batches})" if batches > 1 else "")
    else:
        where = f"the trained weights became NaN or infinite by the end of the last {task.step_name} trained"
    history = getattr(recorder, "history", None)
    kept = (f"The last good checkpoint, last.pt of {task.step_name} {history[-1][task.step_name]}, is kept."
            if history else "No checkpoint of this run had been written.")
    raise TrainingDiverged(
        f"training diverged: {where}; nothing after it was saved. {kept} This usually means a learning rate "
        f"too high for this model and data, or a bad momentum or warm-up: check {task.divergence_settings}, and "
        f"start the run again with a lower value (--overwrite --opts KEY=VALUE)."
    )


def fit(task: TrainingTask, optimizer: torch.optim.Optimizer, recorder, *, start: int = 0,
        scaler: torch.amp.GradScaler | None = None, started: float | None = None) -> None:
    """The training loop of every method (single process or one rank of a torchrun job).

    `recorder` is the run's :class:`engine.recorder.RunRecorder`; `start` the first unit (a resumed
    run's); `scaler` the fp16 GradScaler or None; `started` the time the first booking's seconds count
    from (default now; a method's set-up before the loop may count too)."""
    if start == 0 and task.evaluate_first:
        report, val_report = task.evaluate()
        recorder.record(0, {}, report, 0.0, val_report=val_report)
    window, since = _Window(), time.perf_counter() if started is None else started
    units = range(start, task.total)
    for unit in progress(units, task.step_name) if task.progress_over_units else units:
        unit_started = time.perf_counter()
        task.begin(unit)
        batches = task.batches(unit)
        steps = max(len(batches), 1)
        shown = batches if task.progress_over_units else progress(batches, f"{task.step_name} {unit + 1}/{task.total}")
        for i, batch in enumerate(shown):
            lr = task.lr(unit, i, steps)
            if lr is not None:
                set_lr(optimizer, lr)
            out = task.step(batch)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(out.loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                out.loss.backward()
                optimizer.step()
            window.add(out, unit, i)
        done = unit + 1
        stats = task.unit_stats(unit, time.perf_counter() - unit_started)
        if done % task.record_every and done != task.total:
            continue
        _check_finite(task, optimizer, window, steps, recorder, scaled=scaler is not None)
        report = val_report = None
        if done % task.eval_every == 0 or done == task.total:
            report, val_report = task.evaluate()
        recorder.record(done, {**window.result(), **stats}, report, time.perf_counter() - since,
                        periodic=bool(task.save_every) and done % task.save_every == 0, val_report=val_report)
        window, since = _Window(), time.perf_counter()


Rows = dict[str, torch.Tensor]


def ordered_map(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Rows], dataset, batch_size: int,
                device: torch.device, *, seed: int | None = None, num_workers: int = 0,
                consume: Callable[[Rows], None] | None = None, desc: str = "map") -> Rows | None:
    """`fn(x, y, idx) -> {name: rows}` over every sample of `dataset` in sequential batches: the one
    distributed map behind evaluation, phase II's extraction and pooled features.

    Under torchrun rank r computes the batches r, r+W, ... (``utils.distributed.interleaved_batches``),
    so per-batch results -- and per-batch augmentation seeds, ``stream_seed(seed, batch)`` when `seed`
    is given -- do not depend on the number of processes. With `consume`, rank 0 receives every batch's
    rows in single-process batch order, one gather round at a time (memory: one round; the other ranks
    call nothing) and None is returned. Without it, every rank receives all rows, ordered by the
    dataset index that `fn` returns as ``"index"``, and a sample computed twice is an error."""
    batches, numbers = distributed.interleaved_batches(len(dataset), batch_size)
    seeds = None if seed is None else [stream_seed(seed, b) for b in numbers]
    loader = BatchLoader(dataset, batches, device, num_workers=num_workers, batch_seeds=seeds)
    ctx = distributed.context()
    empty = None
    if ctx.enabled:  # what a rank whose batches ran out contributes to a round: fn's rows, zero of them
        probe_x, probe_y, probe_idx = next(iter(BatchLoader(dataset, [[0]], device)))
        empty = {k: v[:0] for k, v in fn(probe_x, probe_y, probe_idx).items()}
    collected: dict[str, list[torch.Tensor]] = {}
    items = iter(loader)
    for _ in progress(range(distributed.interleaved_rounds(len(dataset), batch_size)), desc):
        item = next(items, None)
        rows = fn(*item) if item is not None else empty
        if consume is None:
            for name, t in rows.items():
                collected.setdefault(name, []).append(t)
            continue
        gathered = {name: distributed.gather_parts(t) for name, t in rows.items()}
        if next(iter(gathered.values())) is None:  # not rank 0: its rows were sent
            continue
        for r in range(len(next(iter(gathered.values())))):
            consume({name: parts[r] for name, parts in gathered.items()})
    if consume is not None:
        return None
    out = {name: distributed.all_gather_rows(torch.cat(parts)) for name, parts in collected.items()}
    if ctx.enabled:
        order = torch.argsort(out["index"])
        out = {name: t[order] for name, t in out.items()}
        index = out["index"]
        if len(index) > 1 and bool((index[1:] == index[:-1]).any()):
            raise RuntimeError("distributed map: a sample was computed by two processes")
    return out


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int, device: torch.device, *, accel: Accel = NO_ACCEL,
            num_workers: int = 0, desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, indices) of every un-augmented sample of `dataset`, in eval mode (each module's
    mode is restored); under torchrun every rank receives all rows (:func:`ordered_map`)."""
    def logits_of(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Rows:
        with accel.autocast():
            out = model(accel.inputs(x))
        return {"logits": out.float().cpu(), "target": y.cpu(), "index": idx.cpu()}

    with eval_mode(model):
        rows = ordered_map(logits_of, dataset.with_augment(False), batch_size, device, num_workers=num_workers,
                           desc=desc)
    return rows["logits"], rows["target"], rows["index"]


def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device, train_counts: list[int], hr: float, *,
             accel: Accel = NO_ACCEL) -> dict:
    logits, targets, _ = predict(model, dataset, batch_size, device, accel=accel)
    return classification_report(logits.argmax(1), targets, train_counts, hr)


@dataclass
class EvalSets:
    """The reported test set and, where the run has one, the validation split that selects the model."""

    test: object          # an LTDataset
    val: object | None
    batch_size: int
    device: torch.device

    @classmethod
    def of(cls, bundle, batch_size: int, device: torch.device) -> "EvalSets":
        """`bundle.test` and `bundle.val` (a DatasetBundle)."""
        return cls(bundle.test, bundle.val, batch_size, device)

    def evaluate(self, model: nn.Module, train_counts: list[int], hr: float, *,
                 accel: Accel = NO_ACCEL) -> tuple[dict, dict | None]:
        """(test report, validation report or None)."""
        val = None if self.val is None else evaluate(model, self.val, self.batch_size, self.device, train_counts, hr,
                                                     accel=accel)
        return evaluate(model, self.test, self.batch_size, self.device, train_counts, hr, accel=accel), val

    def test_report(self, model: nn.Module, train_counts: list[int], hr: float, *, accel: Accel = NO_ACCEL) -> dict:
        return evaluate(model, self.test, self.batch_size, self.device, train_counts, hr, accel=accel)
