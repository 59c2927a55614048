"""The train / evaluate loops every phase shares (single process or one rank of a torchrun job)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from datasets.loader import BatchLoader
from engine.accel import NO_ACCEL, Accel
from engine.metrics import classification_report
from engine.optim import set_lr
from utils import distributed


def progress(loader: Iterable, desc: str) -> Iterable:
    """A tqdm bar on rank 0 (TQDM_DISABLE=1 still silences it); other ranks iterate silently."""
    quiet = {} if distributed.context().is_main else {"disable": True}
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, **quiet)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_for_step: Callable[[int], float],
    *,
    accel: Accel = NO_ACCEL,
    scaler: torch.amp.GradScaler | None = None,
    desc: str = "train",
) -> dict:
    """One pass over `loader`; `lr_for_step(i)` gives the learning rate of batch i.

    `model` may be wrapped in DistributedDataParallel; the returned loss / accuracy are over the
    samples of every rank."""
    model.train()
    total_loss = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.long)
    seen = torch.zeros((), dtype=torch.long)
    for step, (x, y, _) in enumerate(progress(loader, desc)):
        set_lr(optimizer, lr_for_step(step))
        with accel.autocast():
            logits = model(accel.inputs(x))
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        # accumulate on the device; one sync at the end instead of one per batch
        total_loss = total_loss.to(loss.device) + loss.detach().double() * len(y)
        correct = correct.to(y.device) + (logits.argmax(1) == y).sum()
        seen = seen.to(y.device) + len(y)
    totals = distributed.all_reduce_sum(torch.stack([total_loss.cpu(), correct.cpu().double(), seen.cpu().double()]))
    n = max(float(totals[2]), 1.0)
    return {"loss": float(totals[0]) / n, "train_acc": float(totals[1]) / n * 100}


def eval_loader(dataset, batch_size: int, device: torch.device, num_workers: int = 0) -> BatchLoader:
    """Sequential, un-augmented batches of this rank's contiguous share of `dataset` (all of it in a
    single process); :func:`predict` gathers the shares back."""
    share = distributed.shard_range(len(dataset))
    batches = [list(share[i:i + batch_size]) for i in range(0, len(share), batch_size)]
    return BatchLoader(dataset.with_augment(False), batches, device, num_workers=num_workers)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, *, accel: Accel = NO_ACCEL,
            desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, indices) over the loader, in eval mode; the model's mode is restored.

    Under torchrun every rank passes its own share (see :func:`eval_loader`) and receives everybody's
    rows, ordered by index; a sample given to two ranks would be an error, not counted twice."""
    was_training = model.training
    model.eval()
    logits, targets, indices = [], [], []
    try:
        for x, y, idx in progress(loader, desc):
            with accel.autocast():
                out = model(accel.inputs(x))
            logits.append(out.float().cpu())
            targets.append(y.cpu())
            indices.append(idx.cpu())
    finally:
        model.train(was_training)
    num_classes = getattr(model, "num_classes", 0)
    logits_t = torch.cat(logits) if logits else torch.zeros(0, num_classes)
    targets_t = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    indices_t = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    if distributed.context().enabled:
        logits_t = distributed.all_gather_rows(logits_t)
        targets_t = distributed.all_gather_rows(targets_t)
        indices_t = distributed.all_gather_rows(indices_t)
        order = torch.argsort(indices_t)
        logits_t, targets_t, indices_t = logits_t[order], targets_t[order], indices_t[order]
        if len(indices_t) > 1 and bool((indices_t[1:] == indices_t[:-1]).any()):
            raise RuntimeError("evaluation shards overlap: a test sample was predicted by two processes")
    return logits_t, targets_t, indices_t


def evaluate(model: nn.Module, loader: Iterable, train_counts: list[int], hr: float, *, accel: Accel = NO_ACCEL) -> dict:
    logits, targets, _ = predict(model, loader, accel=accel)
    return classification_report(logits.argmax(1), targets, train_counts, hr)


@dataclass
class EvalSets:
    """The reported test set and, where the run has one, the validation split that selects the model."""

    test: BatchLoader
    val: BatchLoader | None

    @classmethod
    def of(cls, bundle, batch_size: int, device: torch.device) -> "EvalSets":
        """Loaders over `bundle.test` and `bundle.val` (a DatasetBundle)."""
        val = None if bundle.val is None else eval_loader(bundle.val, batch_size, device)
        return cls(eval_loader(bundle.test, batch_size, device), val)

    def evaluate(self, model: nn.Module, train_counts: list[int], hr: float, *,
                 accel: Accel = NO_ACCEL) -> tuple[dict, dict | None]:
        """(test report, validation report or None)."""
        val = None if self.val is None else evaluate(model, self.val, train_counts, hr, accel=accel)
        return evaluate(model, self.test, train_counts, hr, accel=accel), val
