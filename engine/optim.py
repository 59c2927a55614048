"""Optimisers and the learning rate as a pure function of (fractional) epoch: resume-safe.

`OPTIMIZERS` and `SCHEDULES` are the one lists of the `optimizer` and `train.schedule` values: the
config schema takes its choices from them, so a new one is one entry here.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch


# name -> factory(trainable parameters, cfg with lr, momentum, nesterov, weight_decay)
OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter], dict], torch.optim.Optimizer]] = {
    "sgd": lambda params, cfg: torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"],
                                               nesterov=cfg["nesterov"] and cfg["momentum"] > 0,
                                               weight_decay=cfg["weight_decay"]),
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"]),
}


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: dict) -> torch.optim.Optimizer:
    """The `OPTIMIZERS` entry `cfg["optimizer"]` over the parameters that train; `cfg` holds optimizer,
    lr, momentum, nesterov, weight_decay."""
    if cfg["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg['optimizer']}; available: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[cfg["optimizer"]]([p for p in params if p.requires_grad], cfg)


def _cosine(epoch: float, cfg: dict) -> float:
    """Cosine from the end of warm-up to the last epoch."""
    warmup = cfg["warmup_epochs"]
    span = max(cfg["epochs"] - warmup, 1e-8)
    progress = min(max((epoch - warmup) / span, 0.0), 1.0)
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * progress))


# name -> lr(epoch, train cfg) after warm-up; epoch is fractional and 0-based
SCHEDULES: dict[str, Callable[[float, dict], float]] = {
    "constant": lambda epoch, cfg: cfg["lr"],
    "step": lambda epoch, cfg: cfg["lr"] * cfg["gamma"] ** int(epoch // cfg["step_size"]),
    "multistep": lambda epoch, cfg: cfg["lr"] * cfg["gamma"] ** sum(1 for m in cfg["milestones"] if epoch >= m),
    "cosine": _cosine,
}


def lr_at(epoch: float, cfg: dict) -> float:
    """Learning rate at fractional epoch `epoch` (0-based) for the `train` section `cfg`.

    Linear warm-up over `warmup_epochs`, then the `SCHEDULES` entry `cfg["schedule"]`.
    """
    base = cfg["lr"]
    warmup = cfg["warmup_epochs"]
    if warmup > 0 and epoch < warmup:
        return base * (epoch + 1e-8) / warmup if epoch > 0 else base / max(1.0, warmup * 10)
    if cfg["schedule"] not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg['schedule']}; available: {', '.join(SCHEDULES)}")
    return SCHEDULES[cfg["schedule"]](epoch, cfg)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
