"""File-based datasets, ``list`` (list files) and ``image-folder``: ``datasets.file_samples`` reads and
validates their samples, this module makes each set a :class:`FileImageDataset` and registers both.

An image too large to decode safely is a ``UserError`` (its size is read from the header first,
:data:`MAX_IMAGE_PIXELS`), and so is a damaged one. Images are decoded with PIL and transformed with
torchvision (ImageNet statistics), read at ``image_size`` (by default their own size when small,
:func:`choose_image_size`) and augmented by a policy (:func:`build_transform`): by default ``crop_flip``
for small images and ``resized_crop`` for large ones.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Sequence

import torch
from PIL import Image

from datasets.base import LTDataset
from datasets.file_samples import read_list_dataset, resolve_list_path, scan_image_folder
from datasets.registry import Augmentation, register_dataset
from datasets.transforms import random_crop_flip
from utils.errors import UserError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIZE",
    "SMALL_IMAGE_MAX",
    "FileImageDataset",
    "auto_policy",
    "build_image_folder",
    "build_list",
    "build_transform",
    "choose_image_size",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_MAX = 64  # images up to this size are read at their own size and augmented CIFAR-style
LARGE_IMAGE_SIZE = 224  # the size large images are read at unless dataset.image_size says otherwise
CROP_PAD = 4  # crop_flip: zero-pad by 4 pixels, then crop back (as the in-memory datasets do)
MAX_UPSCALE = 2.0  # a larger factor is warned about: slow, and no detail is gained
# 8192x8192: one decoded RGB image is 192 MiB (and every DataLoader worker decodes its own); larger ones are
# refused from their header, before PIL decodes them (PIL's own limit, 89 Mpx, only warns up to 179 Mpx)
MAX_IMAGE_PIXELS = 8192 * 8192
MIN_IMAGE_SIZE = 8  # the smallest size inferred from the first image (dataset.image_size's lower bound too)

logger = logging.getLogger("fsa_lt.datasets")  # the run's logger (console + log.txt) shows it


def _decode_error(path: str, exc: OSError) -> UserError:
    return UserError(
        f"cannot decode image {path} ({exc}): the file is damaged or not an image. "
        f"Replace it with a readable image, or remove it from the dataset."
    )


def _open_image(path: str) -> Image.Image:
    """The image at ``path`` opened lazily (only its header is read; the caller decodes and closes it),
    after refusing one over :data:`MAX_IMAGE_PIXELS`; a damaged file is a UserError too."""
    try:
        with warnings.catch_warnings():
            # PIL checks its own, higher limit in open(): above it a warning, above twice it an error
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        size = f"over {Image.MAX_IMAGE_PIXELS:,} pixels"
    except OSError as exc:
        raise _decode_error(path, exc) from exc
    else:
        if width * height <= MAX_IMAGE_PIXELS:
            return img
        img.close()
        size = f"{width}x{height} pixels"
    raise UserError(f"image {path} is {size}, too large to decode safely (the limit is {MAX_IMAGE_PIXELS:,} pixels, "
                    f"e.g. 8192x8192): downscale it (the model reads images at dataset.image_size anyway) or remove "
                    f"it from the dataset.")


def auto_policy(image_size: int) -> str:
    """What ``dataset.augment: auto`` means for file images read at ``image_size``."""
    return "crop_flip" if image_size <= SMALL_IMAGE_MAX else "resized_crop"


def choose_image_size(requested: int | None, first_image: str) -> int:
    """The size file images are read at: ``requested`` (``dataset.image_size``) when given, else the
    shorter side of ``first_image`` (the side of its centred square) when that is at most
    ``SMALL_IMAGE_MAX``, else 224. Warns when the size upscales ``first_image`` more than 2x; an inferred
    size below :data:`MIN_IMAGE_SIZE` is a UserError (every image would be read at it)."""
    with _open_image(first_image) as img:  # reads the header only
        width, height = img.size
    own = min(width, height)
    if requested is None and own < MIN_IMAGE_SIZE:
        raise UserError(
            f"the first training image {first_image} is {width}x{height} pixels, and with dataset.image_size: null "
            f"every image is read at the shorter side of the first one ({own} pixels, below the minimum of "
            f"{MIN_IMAGE_SIZE}). Set dataset.image_size (e.g. --opts dataset.image_size=32) to the size the images "
            f"should be read at, or replace that image."
        )
    size = int(requested) if requested is not None else own if own <= SMALL_IMAGE_MAX else LARGE_IMAGE_SIZE
    if size > MAX_UPSCALE * own:
        logger.warning(
            f"warning: dataset.image_size={size} upscales the training images {size / own:.1f}x (the first, "
            f"{first_image}, is {width}x{height}): slow, and no detail is gained; consider dataset.image_size={own}"
        )
    return size


class _PadCropFlip:
    """Random zero-padded crop (+ flip) of one uint8 image ``[C,H,W]``: the in-memory datasets' batched
    code on a batch of one, drawing from the global CPU generator (seeded per sample by the dataset)."""

    def __init__(self, pad: int, flip: bool) -> None:
        self.pad, self.flip = pad, flip

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return random_crop_flip(image.unsqueeze(0), self.pad, self.flip)[0]


def build_transform(policy: str, image_size: int, flip: bool, train: bool):
    """PIL image -> normalised float ``[3, image_size, image_size]``: the training view of ``policy``
    (crop_flip or resized_crop), or with ``train=False`` its deterministic (evaluation) view, which a
    run without augmentation also trains on.

    crop_flip (small images) reads the image at its size: shorter side resized to ``image_size``, then the
    centred square (nothing is cut from a square image); training pads by 4 pixels, crops back at random
    and flips. resized_crop is ImageNet's: random-resized crop + flip for training, resize to 256/224 of the
    size + centre crop for evaluation.
    """
    from torchvision import transforms as T  # here: importing torchvision costs every process about 1.5 s
    if policy == "resized_crop":
        if train:
            steps = [T.RandomResizedCrop(image_size), *([T.RandomHorizontalFlip()] if flip else [])]
        else:
            steps = [T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)]
        steps.append(T.PILToTensor())
    elif policy == "crop_flip":
        steps = [T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()]
        if train:
            steps.append(_PadCropFlip(CROP_PAD, flip))
    else:
        raise ValueError(f"file datasets augment with crop_flip or resized_crop, not {policy!r}")
    return T.Compose([*steps, T.ConvertImageDtype(torch.float32), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class FileImageDataset(LTDataset):
    """Images on disk given as ``(path, label)`` pairs, read at ``image_size`` and augmented by ``policy``
    (``auto`` = :func:`auto_policy` of the size; see :func:`build_transform`)."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        num_classes: int,
        image_size: int = LARGE_IMAGE_SIZE,
        *,
        augment: bool = True,
        policy: str = "auto",  # auto, crop_flip or resized_crop
        flip: bool = True,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.paths = [str(p) for p, _ in samples]
        self.targets = torch.tensor([int(y) for _, y in samples], dtype=torch.long)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.policy = auto_policy(self.image_size) if policy == "auto" else policy
        self.augment = bool(augment)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        self.in_channels = 3
        self._train_tf = build_transform(self.policy, self.image_size, flip, train=True)
        self._test_tf = build_transform(self.policy, self.image_size, flip, train=False)

    @property
    def transform(self):
        return self._train_tf if self.augment else self._test_tf

    def subset(self, positions: Sequence[int] | torch.Tensor) -> "FileImageDataset":
        """A dataset of the images at ``positions`` (in that order), sharing the transforms."""
        idx = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        other = copy.copy(self)
        other.paths = [self.paths[i] for i in idx.tolist()]
        other.targets = self.targets.index_select(0, idx)
        return other

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        """``dataset[i]``, or ``dataset[(i, seed)]`` (from ``datasets.loader``): with a seed, the random
        transform draws from the CPU generator seeded with it, and the caller's generator state is
        restored afterwards; so the sample is the same in any DataLoader worker, or in none."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        i = int(i)
        if i < 0:
            i += len(self)
        path = self.paths[i]
        try:
            with _open_image(path) as img:
                img = img.convert("RGB")
        except OSError as exc:  # truncated data shows only when decoding
            raise _decode_error(path, exc) from exc
        if seed is None:
            return self.transform(img), int(self.targets[i]), i
        with torch.random.fork_rng(devices=[]):  # torchvision's random transforms use the global CPU generator
            torch.default_generator.manual_seed(int(seed))
            return self.transform(img), int(self.targets[i]), i


def _train_and_test(
    image_size: int | None,
    augmentation: Augmentation,
    num_classes: int,
    train_samples: list[tuple[str, int]],
    test_samples: list[tuple[str, int]],
    class_names: list[str] | None = None,
) -> tuple[FileImageDataset, FileImageDataset]:
    """Training and test :class:`FileImageDataset`, read at the size chosen from the first training image."""
    size = choose_image_size(image_size, train_samples[0][0])
    common = {"policy": augmentation.policy, "flip": augmentation.flip, "class_names": class_names}
    return (FileImageDataset(train_samples, num_classes, size, augment=augmentation.augment, **common),
            FileImageDataset(test_samples, num_classes, size, augment=False, **common))


def build_list(cfg: dict[str, Any], augmentation: Augmentation) -> tuple[FileImageDataset, FileImageDataset]:
    """``(train, test)`` of the list files ``dataset.train_list`` / ``dataset.test_list``, as listed."""
    root = cfg["root"]
    for key in ("train_list", "test_list"):
        if not cfg[key]:
            raise UserError(f"dataset.{key} is required for dataset name 'list'")
    num_classes, train_samples, test_samples = read_list_dataset(
        resolve_list_path(cfg["train_list"], root, "dataset.train_list"),
        resolve_list_path(cfg["test_list"], root, "dataset.test_list"),
        root,
    )
    return _train_and_test(cfg["image_size"], augmentation, num_classes, train_samples, test_samples)


def build_image_folder(cfg: dict[str, Any], augmentation: Augmentation) -> tuple[FileImageDataset, FileImageDataset]:
    """``(train, test)`` of the class folders under ``dataset.root``, as found."""
    if cfg["root"] is None:
        raise UserError("dataset.root is required for dataset name 'image-folder' (folder with train/ and test/)")
    classes, train_samples, test_samples = scan_image_folder(cfg["root"])
    return _train_and_test(cfg["image_size"], augmentation, len(classes), train_samples, test_samples, classes)


# file datasets are long-tailed as listed (no subset is drawn), and FileImageDataset implements resized_crop too
register_dataset("list", build_list, long_tail=False, resized_crop=True)
register_dataset("image-folder", build_image_folder, long_tail=False, resized_crop=True)
