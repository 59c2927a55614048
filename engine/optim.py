"""Optimisers and the learning rate as a pure function of (fractional) epoch: resume-safe."""
from __future__ import annotations

import math
from typing import Iterable

import torch


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: dict) -> torch.optim.Optimizer:
    """`cfg` holds optimizer, lr, momentum, nesterov, weight_decay."""
    params = [p for p in params if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"] and cfg["momentum"] > 0,
                               weight_decay=cfg["weight_decay"])
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def lr_at(epoch: float, cfg: dict) -> float:
    """Learning rate at fractional epoch `epoch` (0-based) for the `train` section `cfg`.

    Linear warm-up over `warmup_epochs`, then constant / step / multistep / cosine decay.
    """
    base = cfg["lr"]
    warmup = cfg["warmup_epochs"]
    if warmup > 0 and epoch < warmup:
        return base * (epoch + 1e-8) / warmup if epoch > 0 else base / max(1.0, warmup * 10)
    schedule = cfg["schedule"]
    if schedule == "constant":
        return base
    if schedule == "step":
        return base * cfg["gamma"] ** int(epoch // cfg["step_size"])
    if schedule == "multistep":
        passed = sum(1 for milestone in cfg["milestones"] if epoch >= milestone)
        return base * cfg["gamma"] ** passed
    # cosine from the end of warm-up to the last epoch
    span = max(cfg["epochs"] - warmup, 1e-8)
    progress = min(max((epoch - warmup) / span, 0.0), 1.0)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
