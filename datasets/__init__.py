"""Long-tailed datasets, imbalance profiles, batched in-memory augmentation and the batch loader.

``build_datasets(cfg, run_dir)`` turns the ``dataset:`` config section into a :class:`DatasetBundle`:
it looks ``dataset.name`` up in the registry (``DATASETS``, datasets/registry.py), builds that dataset's
training and test sets, then does what every dataset shares: the long-tailed subset and the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the dataset modules register themselves when imported: this order is the order of the names in
# DATASETS (error messages, dataset.name's choices in docs/CONFIG.md)
from datasets import synthetic, fashion_mnist, cifar, file_list  # noqa: F401
from datasets.base import AUGMENT_POLICIES, InMemoryDataset, LTDataset, augment_policy
from datasets.file_list import FileImageDataset
from datasets.imbalance import long_tail_counts, make_long_tail_subset, select_long_tail_indices
from datasets.loader import BatchLoader, EpochBatches, sequential_batches, shuffled_batches
from datasets.registry import DATASETS, Augmentation, register_dataset, unregister_dataset
from datasets.validation import split_validation
from utils.config import deep_merge
from utils.errors import UserError
from utils.fields import defaults
from utils.schema import DATASET

__all__ = [
    "AUGMENT_POLICIES",
    "DATASETS",
    "Augmentation",
    "DatasetBundle",
    "LTDataset",
    "InMemoryDataset",
    "FileImageDataset",
    "BatchLoader",
    "EpochBatches",
    "build_datasets",
    "long_tail_counts",
    "register_dataset",
    "select_long_tail_indices",
    "sequential_batches",
    "shuffled_batches",
    "unregister_dataset",
]


@dataclass
class DatasetBundle:
    """`train` is what the model trains on, `test` the reported images, `val` the validation split
    that selects (None: nothing is selected); see datasets/validation.py."""

    train: LTDataset
    test: LTDataset
    num_classes: int
    in_channels: int
    class_names: list[str]
    train_counts: list[int]
    name: str
    val: LTDataset | None = None

    def split_sizes(self) -> dict[str, int]:
        return {"num_val_images": 0 if self.val is None else len(self.val), "num_test_images": len(self.test)}


def _merged(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` over the schema's defaults (missing keys are tolerated, e.g. in tests)."""
    return deep_merge(defaults(DATASET), cfg or {})


def _long_tail(train: LTDataset, cfg: dict[str, Any], run_dir: Path | None) -> LTDataset:
    indices, _ = make_long_tail_subset(
        train.targets.numpy(),
        train.num_classes,
        dataset_name=cfg["name"],
        rho=cfg["imbalance"],
        profile=cfg["profile"],
        step_fraction=cfg["step_fraction"],
        seed=cfg["subset_seed"],
        run_dir=run_dir,
    )
    return train.subset(indices)


def _augmentation(cfg: dict[str, Any]) -> Augmentation:
    """How the training set augments. none (the old false) switches phase I's augmentation off; phase II's
    views and phase III online, which augment by design, then use what auto picks, as they always did."""
    policy = augment_policy(cfg["augment"])
    file_datasets = [name for name, entry in DATASETS.items() if entry.resized_crop]
    if policy == "resized_crop" and cfg["name"] not in file_datasets:
        raise UserError(
            f"dataset.augment=resized_crop is for file datasets ({', '.join(file_datasets)}); "
            f"{cfg['name']} takes auto (= crop_flip), crop_flip or none"
        )
    return Augmentation(augment=policy != "none", flip=bool(cfg["flip"]), policy="auto" if policy == "none" else policy)


def build_datasets(cfg: dict[str, Any], run_dir: Path | None = None) -> DatasetBundle:
    """Build the (long-tailed) training set and the balanced test set named by ``cfg['name']``."""
    cfg = _merged(cfg)
    name = cfg["name"]
    augmentation = _augmentation(cfg)
    run_dir = Path(run_dir) if run_dir is not None else None
    entry = DATASETS.get(name)
    if entry is None:
        raise UserError(f"unknown dataset name {name!r}; available: {', '.join(DATASETS)}")
    train, test = entry.build(cfg, augmentation)
    if entry.long_tail:
        train = _long_tail(train, cfg, run_dir)

    train, val, test = split_validation(train, test, cfg["val"], run_dir)
    in_channels = int(train.in_channels)
    return DatasetBundle(
        train=train,
        test=test,
        val=val,
        num_classes=int(train.num_classes),
        in_channels=in_channels,
        class_names=list(train.class_names),
        train_counts=train.class_counts(),
        name=name,
    )
