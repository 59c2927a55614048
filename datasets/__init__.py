"""Long-tailed datasets, imbalance profiles, batched in-memory augmentation and the batch loader.

``build_datasets(cfg, run_dir)`` turns the ``dataset:`` config section into a :class:`DatasetBundle`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets.base import InMemoryDataset, LTDataset
from datasets.file_list import FileImageDataset, read_list_dataset, resolve_list_path, scan_image_folder
from datasets.imbalance import long_tail_counts, make_long_tail_subset, select_long_tail_indices
from datasets.loader import BatchLoader, EpochBatches, sequential_batches, shuffled_batches
from utils.errors import UserError

__all__ = [
    "AVAILABLE_DATASETS",
    "DEFAULT_DATASET_CFG",
    "DatasetBundle",
    "LTDataset",
    "InMemoryDataset",
    "FileImageDataset",
    "BatchLoader",
    "EpochBatches",
    "build_datasets",
    "long_tail_counts",
    "select_long_tail_indices",
    "sequential_batches",
    "shuffled_batches",
]

AVAILABLE_DATASETS = ("synthetic-LT", "fashion-mnist-LT", "cifar10-LT", "cifar100-LT", "list", "image-folder")

DEFAULT_DATASET_CFG: dict[str, Any] = {
    "name": "synthetic-LT",
    "root": None,
    "download": True,
    "imbalance": 100.0,
    "profile": "exp",
    "step_fraction": 0.5,
    "subset_seed": 0,
    "augment": True,
    "train_list": None,
    "test_list": None,
    "image_size": 224,
    "synthetic": {"num_classes": 6, "image_size": 32, "train_per_class": 200, "test_per_class": 40, "seed": 0},
}


@dataclass
class DatasetBundle:
    train: LTDataset
    test: LTDataset
    num_classes: int
    in_channels: int
    class_names: list[str]
    train_counts: list[int]
    name: str


def _merged(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` over the defaults (missing keys are tolerated, e.g. in tests)."""
    out = copy.deepcopy(DEFAULT_DATASET_CFG)
    for k, v in (cfg or {}).items():
        if k == "synthetic" and isinstance(v, dict):
            out["synthetic"].update(v)
        else:
            out[k] = v
    return out


def _long_tail(train: InMemoryDataset, cfg: dict[str, Any], run_dir: Path | None) -> InMemoryDataset:
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


def build_datasets(cfg: dict[str, Any], run_dir: Path | None = None) -> DatasetBundle:
    """Build the (long-tailed) training set and the balanced test set named by ``cfg['name']``."""
    cfg = _merged(cfg)
    name = cfg["name"]
    augment = bool(cfg["augment"])
    run_dir = Path(run_dir) if run_dir is not None else None

    if name == "synthetic-LT":
        from datasets.synthetic import SyntheticShapes

        syn = cfg["synthetic"]
        train = SyntheticShapes.generate(
            int(syn["num_classes"]), int(syn["train_per_class"]), int(syn["image_size"]), int(syn["seed"]),
            "train", augment=augment,
        )
        test = SyntheticShapes.generate(
            int(syn["num_classes"]), int(syn["test_per_class"]), int(syn["image_size"]), int(syn["seed"]),
            "test", mean=train.mean, std=train.std, augment=False,
        )
        train = _long_tail(train, cfg, run_dir)
    elif name == "fashion-mnist-LT":
        from datasets.fashion_mnist import load_fashion_mnist

        train, test = load_fashion_mnist(cfg["root"], bool(cfg["download"]), augment)
        train = _long_tail(train, cfg, run_dir)
    elif name in ("cifar10-LT", "cifar100-LT"):
        from datasets.cifar import load_cifar

        train, test = load_cifar(name[:-3], cfg["root"], bool(cfg["download"]), augment)
        train = _long_tail(train, cfg, run_dir)
    elif name == "list":
        root = cfg["root"]
        for key in ("train_list", "test_list"):
            if not cfg[key]:
                raise UserError(f"dataset.{key} is required for dataset name 'list'")
        num_classes, train_samples, test_samples = read_list_dataset(
            resolve_list_path(cfg["train_list"], root, "dataset.train_list"),
            resolve_list_path(cfg["test_list"], root, "dataset.test_list"),
            root,
        )
        train = FileImageDataset(train_samples, num_classes, int(cfg["image_size"]), augment=augment)
        test = FileImageDataset(test_samples, num_classes, int(cfg["image_size"]), augment=False)
    elif name == "image-folder":
        if cfg["root"] is None:
            raise UserError("dataset.root is required for dataset name 'image-folder' (folder with train/ and test/)")
        classes, train_samples, test_samples = scan_image_folder(cfg["root"])
        size = int(cfg["image_size"])
        train = FileImageDataset(train_samples, len(classes), size, augment=augment, class_names=classes)
        test = FileImageDataset(test_samples, len(classes), size, augment=False, class_names=classes)
    else:
        raise UserError(f"unknown dataset name {name!r}; available: {', '.join(AVAILABLE_DATASETS)}")

    in_channels = int(train.in_channels)
    return DatasetBundle(
        train=train,
        test=test,
        num_classes=int(train.num_classes),
        in_channels=in_channels,
        class_names=list(train.class_names),
        train_counts=train.class_counts(),
        name=name,
    )
