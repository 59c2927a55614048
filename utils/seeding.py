"""Seeding: every epoch (or iteration block) reseeds from (seed, step), which makes resume exact."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed: int, step: int) -> int:
    """A seed for step `step` of a run seeded with `seed` (distinct, stable across resumes)."""
    return (seed * 1_000_003 + step * 7_919 + 17) % 2**31
