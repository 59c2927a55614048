"""The train / evaluate loops every phase shares."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from engine.metrics import classification_report


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_for_step: Callable[[int], float],
    *,
    desc: str = "train",
) -> dict:
    """One pass over `loader`; `lr_for_step(i)` gives the learning rate of batch i."""
    from engine.optim import set_lr

    model.train()
    total_loss = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)
    seen = 0
    for step, (x, y, _) in enumerate(tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)):
        set_lr(optimizer, lr_for_step(step))
        logits = model(x)
        loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # accumulate on the device; one sync at the end instead of one per batch
        total_loss = total_loss.to(loss.device) + loss.detach() * len(y)
        correct = correct.to(y.device) + (logits.argmax(1) == y).sum()
        seen += len(y)
    return {"loss": float(total_loss) / max(seen, 1), "train_acc": float(correct) / max(seen, 1) * 100}


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, *, desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, indices) over the loader, in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    logits, targets, indices = [], [], []
    try:
        for x, y, idx in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
            logits.append(model(x).float().cpu())
            targets.append(y.cpu())
            indices.append(idx.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(targets), torch.cat(indices)


def evaluate(model: nn.Module, loader: Iterable, train_counts: list[int], hr: float) -> dict:
    logits, targets, _ = predict(model, loader)
    return classification_report(logits.argmax(1), targets, train_counts, hr)
