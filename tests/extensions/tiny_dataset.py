"""tiny-LT: a dataset in one file, for tests/test_adding_dataset.py (docs/ARCHITECTURE.md, "Adding a dataset").

Six classes of 16 x 16 grey images: seeded noise under horizontal or vertical stripes of period 2, 4 or 8
(the class), at a random phase, so that crops and flips keep the class. The builder returns balanced sets;
``build_datasets`` draws the long-tailed training subset (``dataset.imbalance``). Registered by the test's
fixture, ``register_dataset(NAME, build_tiny)``; a dataset of the project registers itself at its module's end.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from datasets import Augmentation, InMemoryDataset

NAME = "tiny-LT"
STRIPES = [(axis, period) for axis in (0, 1) for period in (2, 4, 8)]  # axis 0: horizontal stripes
CLASS_NAMES = [f"{'hv'[axis]}{period}" for axis, period in STRIPES]
IMAGE_SIZE = 16
TRAIN_PER_CLASS = 60
TEST_PER_CLASS = 10
MEAN, STD = (0.49,), (0.31,)  # of the training images


def _images(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images of every class: uint8 ``[N,1,16,16]`` and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(STRIPES)), per_class)
    images = rng.uniform(0, 100, size=(len(labels), 1, IMAGE_SIZE, IMAGE_SIZE))
    for image, label in zip(images, labels):
        axis, period = STRIPES[label]
        on = (np.arange(IMAGE_SIZE) + rng.integers(period)) // (period // 2) % 2 == 1
        image[0] += 150 * (on[:, None] if axis == 0 else on[None, :])  # broadcast along the stripes
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels)


def build_tiny(cfg: dict[str, Any], augmentation: Augmentation) -> tuple[InMemoryDataset, InMemoryDataset]:
    """Balanced ``(train, test)``; the training set augments as ``dataset.augment`` / ``dataset.flip`` say."""
    common = {"num_classes": len(CLASS_NAMES), "mean": MEAN, "std": STD, "flip": augmentation.flip,
              "class_names": CLASS_NAMES}
    return (InMemoryDataset(*_images(TRAIN_PER_CLASS, seed=0), augment=augmentation.augment, **common),
            InMemoryDataset(*_images(TEST_PER_CLASS, seed=1), augment=False, **common))
