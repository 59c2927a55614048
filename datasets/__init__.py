"""Long-tailed datasets, imbalance profiles, batched in-memory augmentation and the batch loader.

``build_datasets(cfg, run_dir)`` turns the ``dataset:`` config section into a :class:`DatasetBundle`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets.base import AUGMENT_POLICIES, InMemoryDataset, LTDataset, augment_policy
from datasets.file_list import (
    FileImageDataset,
    choose_image_size,
    read_list_dataset,
    resolve_list_path,
    scan_image_folder,
)
from datasets.imbalance import long_tail_counts, make_long_tail_subset, select_long_tail_indices
from datasets.loader import BatchLoader, EpochBatches, sequential_batches, shuffled_batches
from datasets.validation import split_validation
from utils.config import deep_merge
from utils.errors import UserError
from utils.schema import DATASET, DATASET_NAMES, defaults

__all__ = [
    "AUGMENT_POLICIES",
    "AVAILABLE_DATASETS",
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

AVAILABLE_DATASETS = DATASET_NAMES
FILE_DATASETS = ("list", "image-folder")  # the others are in memory


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


def _augmentation(cfg: dict[str, Any]) -> tuple[bool, str]:
    """``(whether the training set augments, the policy it augments with)``. none (the old false) switches
    phase I's augmentation off; phase II's views and phase III online, which augment by design, then use
    what auto picks, as they always did."""
    policy = augment_policy(cfg["augment"])
    if policy == "resized_crop" and cfg["name"] not in FILE_DATASETS:
        raise UserError(
            f"dataset.augment=resized_crop is for file datasets ({', '.join(FILE_DATASETS)}); "
            f"{cfg['name']} takes auto (= crop_flip), crop_flip or none"
        )
    return policy != "none", "auto" if policy == "none" else policy


def _file_datasets(
    image_size: int | None,
    augmentation: dict[str, Any],
    num_classes: int,
    train_samples: list[tuple[str, int]],
    test_samples: list[tuple[str, int]],
    class_names: list[str] | None = None,
) -> tuple[FileImageDataset, FileImageDataset]:
    """Training and test :class:`FileImageDataset`, read at the size chosen from the first training image."""
    size = choose_image_size(image_size, train_samples[0][0])
    return (FileImageDataset(train_samples, num_classes, size, class_names=class_names, **augmentation),
            FileImageDataset(test_samples, num_classes, size, class_names=class_names,
                             **{**augmentation, "augment": False}))


def build_datasets(cfg: dict[str, Any], run_dir: Path | None = None) -> DatasetBundle:
    """Build the (long-tailed) training set and the balanced test set named by ``cfg['name']``."""
    cfg = _merged(cfg)
    name = cfg["name"]
    augment, policy = _augmentation(cfg)
    augmentation = {"augment": augment, "flip": bool(cfg["flip"])}  # in memory, auto is crop_flip: unchanged
    run_dir = Path(run_dir) if run_dir is not None else None

    if name == "synthetic-LT":
        from datasets.synthetic import SyntheticShapes

        syn = cfg["synthetic"]
        train = SyntheticShapes.generate(
            int(syn["num_classes"]), int(syn["train_per_class"]), int(syn["image_size"]), int(syn["seed"]),
            "train", **augmentation,
        )
        test = SyntheticShapes.generate(
            int(syn["num_classes"]), int(syn["test_per_class"]), int(syn["image_size"]), int(syn["seed"]),
            "test", mean=train.mean, std=train.std, augment=False,
        )
        train = _long_tail(train, cfg, run_dir)
    elif name == "fashion-mnist-LT":
        from datasets.fashion_mnist import load_fashion_mnist

        train, test = load_fashion_mnist(cfg["root"], bool(cfg["download"]), **augmentation)
        train = _long_tail(train, cfg, run_dir)
    elif name in ("cifar10-LT", "cifar100-LT"):
        from datasets.cifar import load_cifar

        train, test = load_cifar(name[:-3], cfg["root"], bool(cfg["download"]), **augmentation)
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
        train, test = _file_datasets(cfg["image_size"], {**augmentation, "policy": policy}, num_classes,
                                     train_samples, test_samples)
    elif name == "image-folder":
        if cfg["root"] is None:
            raise UserError("dataset.root is required for dataset name 'image-folder' (folder with train/ and test/)")
        classes, train_samples, test_samples = scan_image_folder(cfg["root"])
        train, test = _file_datasets(cfg["image_size"], {**augmentation, "policy": policy}, len(classes),
                                     train_samples, test_samples, classes)
    else:
        raise UserError(f"unknown dataset name {name!r}; available: {', '.join(AVAILABLE_DATASETS)}")

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
