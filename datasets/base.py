"""Dataset base classes shared by every long-tailed dataset.

Every item is ``(image FloatTensor[C,H,W] normalised, label int, index int)`` where ``index`` is the
position of the item in this dataset (after the long-tailed subset was taken).
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.transforms import augment_batch
from utils.errors import UserError
from utils.schema import AUGMENT_POLICIES

__all__ = ["AUGMENT_POLICIES", "LTDataset", "InMemoryDataset", "augment_policy"]


def augment_policy(value: bool | str) -> str:
    """A ``dataset.augment`` value as a policy name; the old booleans still work (true = auto, false = none)."""
    if isinstance(value, bool):
        return "auto" if value else "none"
    if value not in AUGMENT_POLICIES:
        raise UserError(
            f"dataset.augment must be one of {', '.join(AUGMENT_POLICIES)} (true = auto, false = none); got {value!r}"
        )
    return value


class LTDataset(Dataset):
    """Common interface: ``targets``, ``num_classes``, ``augment``, ``with_augment``, ``class_counts``.

    ``policy`` (``crop_flip`` or ``resized_crop``, fixed when the dataset is built) is how this dataset
    augments; ``augment`` is whether it does now. Items are ``[in_channels, image_size, image_size]``.
    """

    targets: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    augment: bool
    policy: str
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.targets.numel())

    def with_augment(self, flag: bool | str) -> "LTDataset":
        """Shallow copy (data shared) with augmentation switched on/off. ``flag`` is a bool or a
        ``dataset.augment`` value (phase I passes the config's), on unless none / false; the policy
        itself stays the dataset's."""
        other = copy.copy(self)
        other.augment = augment_policy(flag) != "none"
        return other

    def class_counts(self) -> list[int]:
        return torch.bincount(self.targets, minlength=self.num_classes).tolist()


class InMemoryDataset(LTDataset):
    """Small image sets held as one ``uint8`` tensor ``images[N,C,H,W]``.

    Augmentation (zero-padded random crop + optional horizontal flip: the policy ``crop_flip``) is done
    vectorised on a whole batch by :meth:`get_batch`; ``__getitem__`` is a one-item call of the same code.
    """

    policy = "crop_flip"
    # per-item tensors sliced together by :meth:`subset` (subclasses may extend)
    _per_item_fields: tuple[str, ...] = ("images", "targets")

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | Sequence[int] | np.ndarray,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        augment: bool = True,
        pad: int = 4,
        flip: bool = True,
        class_names: Sequence[str] | None = None,
    ) -> None:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
        targets = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
        if targets.numel() != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {targets.numel()} targets")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError("mean/std must have one value per channel")
        self.images = images.contiguous()
        self.targets = targets
        self.num_classes = int(num_classes)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = bool(augment)
        self.pad = int(pad)
        self.flip = bool(flip)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        # indices of these items in the dataset they were taken from (identity unless subset)
        self.source_indices = torch.arange(images.shape[0])
        self._device_images: dict[str, torch.Tensor] = {}

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def _images_on(self, device: torch.device) -> torch.Tensor:
        """The uint8 image tensor on ``device`` (copied once and cached for accelerators)."""
        if device.type == "cpu":
            return self.images
        key = str(device)
        cached = self._device_images.get(key)
        if cached is None:
            cached = self.images.to(device)
            self._device_images[key] = cached
        return cached

    def get_batch(
        self,
        indices: torch.Tensor | Sequence[int],
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Normalised float images ``[B,C,H,W]`` on ``device`` for ``indices`` (augmented if ``self.augment``)."""
        device = torch.device(device)
        images = self._images_on(device)
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).to(images.device)
        batch = images.index_select(0, idx)
        return augment_batch(
            batch,
            self.mean,
            self.std,
            augment=self.augment,
            pad=self.pad,
            flip=self.flip,
            generator=generator,
        )

    def __getitem__(self, i):
        i = int(i)
        if i < 0:
            i += len(self)
        x = self.get_batch(torch.tensor([i]), "cpu")[0]
        return x, int(self.targets[i]), i

    def subset(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> "InMemoryDataset":
        """A new dataset holding only ``indices`` (in that order); ``source_indices`` tracks the originals."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
        other = copy.copy(self)
        for name in self._per_item_fields:
            setattr(other, name, getattr(self, name).index_select(0, idx).contiguous())
        other.source_indices = self.source_indices.index_select(0, idx)
        other._device_images = {}
        return other
