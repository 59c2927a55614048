"""fashion-mnist-LT: Fashion-MNIST read straight from its IDX files (gzipped or not) with numpy."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.base import InMemoryDataset
from datasets.registry import Augmentation, register_dataset
from utils.errors import UserError

__all__ = ["CLASS_NAMES", "DEFAULT_DIRS", "read_idx", "find_fashion_mnist", "load_fashion_mnist", "build_fashion_mnist"]

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MEAN = (0.2860,)
STD = (0.3530,)

# searched after dataset.root (Debian package dataset-fashion-mnist, then the project's data folder)
DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist", "data/fashion-mnist")
DOWNLOAD_ROOT = "data"
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise UserError(f"{path} is truncated or corrupt: expected {expected} data bytes, found {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).copy()


def _file_in(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = folder / name
        if p.is_file():
            return p
    return None


def _candidate_dirs(root: str | Path | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        dirs += [Path(root), Path(root) / "FashionMNIST" / "raw"]
    dirs += [Path(d) for d in DEFAULT_DIRS]
    dirs.append(Path(DOWNLOAD_ROOT) / "FashionMNIST" / "raw")
    return dirs


def find_fashion_mnist(root: str | Path | None) -> dict[tuple[str, str], Path] | None:
    """The four IDX files from the first folder that holds all of them, else ``None``."""
    for folder in _candidate_dirs(root):
        found = {key: _file_in(folder, stem) for key, stem in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _try_download(root: str | Path | None) -> str | None:
    """Fetch with torchvision; returns an error description or ``None`` on success."""
    target = Path(root) if root is not None else Path(DOWNLOAD_ROOT)
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(target), train=train, download=True)
    except Exception as exc:  # offline, proxy, disk: report, never crash
        return f"{type(exc).__name__}: {exc}"
    return None


def load_fashion_mnist(root: str | Path | None, download: bool, augment: bool, flip: bool = True):
    """Balanced ``(train, test)`` :class:`InMemoryDataset` pair (1 x 28 x 28)."""
    files = find_fashion_mnist(root)
    download_error = None
    if files is None and download:
        download_error = _try_download(root)
        files = find_fashion_mnist(root)
    if files is None:
        where = ", ".join(str(d) for d in _candidate_dirs(root))
        names = ", ".join(f"{s}.gz" for s in FILES.values())
        msg = (
            f"Fashion-MNIST not found (looked in: {where}). Either install the Debian package "
            f"(apt-get install dataset-fashion-mnist, files go to /usr/share/datasets/fashion-mnist), "
            f"or run once with internet access and dataset.download: true, or put the four IDX files "
            f"({names}) in {root if root is not None else 'data/fashion-mnist'}."
        )
        if download_error:
            msg += f" The download failed: {download_error}."
        elif not download:
            msg += " (dataset.download is false, so no download was tried.)"
        raise UserError(msg)

    splits = []
    for split in ("train", "test"):
        images = read_idx(files[(split, "images")])
        labels = read_idx(files[(split, "labels")]).astype(np.int64)
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise UserError(f"Fashion-MNIST {split} files have unexpected shapes {images.shape} / {labels.shape}")
        if labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
            raise UserError(f"Fashion-MNIST {split} labels outside 0..9 in {files[(split, 'labels')]}")
        splits.append(
            InMemoryDataset(
                torch.from_numpy(images.astype(np.uint8)).unsqueeze(1),
                torch.from_numpy(labels),
                len(CLASS_NAMES),
                MEAN,
                STD,
                augment=augment if split == "train" else False,
                flip=flip,
                class_names=CLASS_NAMES,
            )
        )
    return splits[0], splits[1]


def build_fashion_mnist(cfg: dict[str, Any], augmentation: Augmentation) -> tuple[InMemoryDataset, InMemoryDataset]:
    """Balanced ``(train, test)`` from ``dataset.root`` or the default folders (see :func:`load_fashion_mnist`)."""
    return load_fashion_mnist(cfg["root"], bool(cfg["download"]), augmentation.augment, augmentation.flip)


register_dataset("fashion-mnist-LT", build_fashion_mnist)
