"""The dataset registry: every ``dataset.name`` and how its training and test sets are built.

A dataset module defines a builder and registers it with one call at its end, ``register_dataset(name,
build)``; ``datasets/__init__.py`` imports every such module, so ``DATASETS`` is complete once the package
is imported. It is the one list of names: the config schema reads ``dataset.name``'s choices from it and
``build_datasets`` looks names up in it, so a new dataset is one new file (plus its module on that import
line): docs/ARCHITECTURE.md, "Adding a dataset". What every dataset shares (the long-tailed subset, the
validation split) stays in ``build_datasets``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from datasets.base import LTDataset

__all__ = ["Augmentation", "DatasetBuilder", "DatasetEntry", "DATASETS", "register_dataset", "unregister_dataset"]


@dataclass(frozen=True)
class Augmentation:
    """How the training set augments, resolved by ``build_datasets`` from ``dataset.augment`` and
    ``dataset.flip``; a builder builds its test set with ``augment`` off."""

    augment: bool  # False for dataset.augment: none
    flip: bool     # random horizontal flips in crop_flip / resized_crop
    policy: str    # auto, crop_flip or resized_crop; in-memory sets always crop_flip, file sets pick by size under auto


# (the merged `dataset:` config section, the training set's augmentation) -> (training set, test set)
DatasetBuilder = Callable[[dict[str, Any], Augmentation], tuple[LTDataset, LTDataset]]


@dataclass(frozen=True)
class DatasetEntry:
    build: DatasetBuilder
    # True: `build` gives the full training set and build_datasets draws the long-tailed subset of it
    # (dataset.imbalance / profile); False: the training set is used as built (file lists, image folders)
    long_tail: bool
    # whether the training set can take dataset.augment=resized_crop (file datasets: the in-memory ones
    # augment with crop_flip only)
    resized_crop: bool


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, build: DatasetBuilder, *, long_tail: bool = True, resized_crop: bool = False) -> None:
    """Make ``build`` the dataset ``name`` (``dataset.name: <name>``); names are listed in registration order."""
    if name in DATASETS:
        raise ValueError(f"dataset {name} is already registered")
    DATASETS[name] = DatasetEntry(build, long_tail, resized_crop)


def unregister_dataset(name: str) -> None:
    """Remove ``name`` (a test's dataset, after the test)."""
    del DATASETS[name]
