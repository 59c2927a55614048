"""cifar10-LT / cifar100-LT: read torchvision's extracted python-pickle format directly.

Layout (as produced by extracting the official archives):
``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``<root>/cifar-100-python/{train, test, meta}``. Pickles are read with a restricted unpickler that
only accepts the numpy array types those files contain.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.base import InMemoryDataset
from datasets.registry import Augmentation, register_dataset
from utils.errors import UserError

__all__ = ["CIFAR_SPECS", "DEFAULT_ROOT", "read_cifar_pickle", "load_cifar", "build_cifar"]

DEFAULT_ROOT = "data/cifar"


@dataclass(frozen=True)
class CifarSpec:
    num_classes: int
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    url: str
    archive: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR_SPECS = {
    "cifar10": CifarSpec(
        10, "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        "batches.meta", "labels", "label_names",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarSpec(
        100, "cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
    ),
}

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR file")
        return super().find_class(module, name)


def _key(d: dict, name: str):
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise KeyError(name)


def read_cifar_pickle(path: Path | str) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise UserError(f"cannot read CIFAR file {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a CIFAR batch (expected a dict)")
    return obj


def _read_split(folder: Path, files: tuple[str, ...], spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        path = folder / name
        d = read_cifar_pickle(path)
        try:
            data = np.asarray(_key(d, "data"), dtype=np.uint8)
            lab = np.asarray(_key(d, spec.label_key), dtype=np.int64).reshape(-1)
        except KeyError as exc:
            raise UserError(f"{path} has no {exc.args[0]!r} entry; is it a {spec.folder} file?") from exc
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != lab.shape[0]:
            raise UserError(f"{path}: expected data [N,3072] and N labels, got {data.shape} and {lab.shape}")
        if lab.size and (lab.min() < 0 or lab.max() >= spec.num_classes):
            raise UserError(f"{path}: labels outside 0..{spec.num_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def _class_names(folder: Path, spec: CifarSpec) -> list[str]:
    meta = folder / spec.meta_file
    if meta.is_file():
        try:
            names = _key(read_cifar_pickle(meta), spec.names_key)
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            if len(names) == spec.num_classes:
                return names
        except (KeyError, UserError, UnicodeDecodeError):
            pass
    return [str(i) for i in range(spec.num_classes)]


def _missing(folder: Path, spec: CifarSpec) -> list[str]:
    return [n for n in spec.train_files + spec.test_files if not (folder / n).is_file()]


def load_cifar(
    kind: str, root: str | Path | None, download: bool, augment: bool, flip: bool = True
) -> tuple[InMemoryDataset, InMemoryDataset]:
    """Balanced ``(train, test)`` pair for ``kind`` in ``cifar10`` / ``cifar100``."""
    spec = CIFAR_SPECS[kind]
    root = Path(root) if root is not None else Path(DEFAULT_ROOT)
    folder = root / spec.folder
    download_error = None
    if _missing(folder, spec) and download:
        try:
            from torchvision import datasets as tvd

            cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
            cls(str(root), train=True, download=True)
        except Exception as exc:  # offline etc.: explain below
            download_error = f"{type(exc).__name__}: {exc}"
    missing = _missing(folder, spec)
    if missing:
        msg = (
            f"{kind} files missing in {folder} ({', '.join(missing)}). Download {spec.url} and extract it "
            f"in {root} (tar xzf {spec.archive} -C {root}) so that {folder / spec.train_files[0]} exists, "
            f"or set dataset.root to the folder that contains {spec.folder}/"
        )
        if download_error:
            msg += f". The automatic download failed: {download_error}"
        elif not download:
            msg += " (dataset.download is false, so no download was tried)"
        raise UserError(msg + ".")

    names = _class_names(folder, spec)
    out = []
    for split, files in (("train", spec.train_files), ("test", spec.test_files)):
        images, labels = _read_split(folder, files, spec)
        out.append(
            InMemoryDataset(
                torch.from_numpy(np.ascontiguousarray(images)),
                torch.from_numpy(labels),
                spec.num_classes,
                spec.mean,
                spec.std,
                augment=augment if split == "train" else False,
                flip=flip,
                class_names=names,
            )
        )
    return out[0], out[1]


def build_cifar(kind: str, cfg: dict[str, Any], augmentation: Augmentation) -> tuple[InMemoryDataset, InMemoryDataset]:
    """Balanced ``(train, test)`` of ``kind`` (cifar10 / cifar100) from ``dataset.root``."""
    return load_cifar(kind, cfg["root"], bool(cfg["download"]), augmentation.augment, augmentation.flip)


register_dataset("cifar10-LT", partial(build_cifar, "cifar10"))
register_dataset("cifar100-LT", partial(build_cifar, "cifar100"))
