"""File-based datasets: list files (ImageNet-LT / Places-LT / iNaturalist format) and image folders.

List file: one ``relative/path label`` per line (blank lines ignored; the label is the last
whitespace-separated field), the path relative to the data root. A bare ImageNet file name
``<wnid>_<n>.JPEG``, as in the TailCalibX release's mini-ImageNet-LT lists (written for one flat image
folder), is also looked up as ``root/<wnid>/<name>``, ImageNet's own ``train/`` layout. A missing list
or image of mini-ImageNet-LT (a list path naming it) says how the release builds the lists
(:data:`MINI_IMAGENET_LT_HELP`). Image folder: ``root/train/<class>/*`` and ``root/test/<class>/*``
(or ``val``), classes sorted by folder name. Both are validated when built: malformed lines, bad labels (a gap in the training
labels, a test label that is no training class), missing images, a class without test images and fewer
than two classes are ``UserError``s; so is an image too large to decode safely (its size is read from the
header first, :data:`MAX_IMAGE_PIXELS`). Images are decoded with PIL and transformed with torchvision (ImageNet statistics),
read at ``image_size`` (by default their own size when small, :func:`choose_image_size`) and
augmented by a policy (:func:`build_transform`): by default ``crop_flip`` for small images and
``resized_crop`` for large ones.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from datasets.base import LTDataset
from datasets.registry import Augmentation, register_dataset
from datasets.transforms import random_crop_flip
from utils.errors import UserError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIZE",
    "MINI_IMAGENET_LT_HELP",
    "SMALL_IMAGE_MAX",
    "FileImageDataset",
    "auto_policy",
    "build_image_folder",
    "build_list",
    "build_transform",
    "choose_image_size",
    "read_list_dataset",
    "resolve_list_path",
    "scan_image_folder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SMALL_IMAGE_MAX = 64  # images up to this size are read at their own size and augmented CIFAR-style
LARGE_IMAGE_SIZE = 224  # the size large images are read at unless dataset.image_size says otherwise
CROP_PAD = 4  # crop_flip: zero-pad by 4 pixels, then crop back (as the in-memory datasets do)
MAX_UPSCALE = 2.0  # a larger factor is warned about: slow, and no detail is gained
# 8192x8192: one decoded RGB image is 192 MiB (and every DataLoader worker decodes its own); larger ones are
# refused from their header, before PIL decodes them (PIL's own limit, 89 Mpx, only warns up to 179 Mpx)
MAX_IMAGE_PIXELS = 8192 * 8192
MIN_IMAGE_SIZE = 8  # the smallest size inferred from the first image (dataset.image_size's lower bound too)

logger = logging.getLogger("fsa_lt.datasets")  # the run's logger (console + log.txt) shows it

# an ImageNet training image's own file name, <wnid>_<number>.<ext>, with no folder in front
_IMAGENET_FILE_NAME = re.compile(r"(n\d{8})_[^/\\]+")

# where mini-ImageNet-LT's images are (appended to a missing image's error when its list names mini-ImageNet)
_MINI_IMAGENET_LT_IMAGES = (
    "mini-ImageNet-LT's images are ImageNet-2012 training images (image-net.org, after accepting its terms): set "
    "dataset.root to ImageNet's train/ folder (train/<wnid>/<wnid>_<n>.JPEG, the default data/ImageNet/train) or to "
    "the one flat folder of <wnid>_<n>.JPEG files that TailCalibX's notebook read."
)
# what a missing mini-ImageNet-LT list means: the lists are not distributed, the TailCalibX release builds them
MINI_IMAGENET_LT_HELP = (
    "mini-ImageNet-LT is not distributed as files: the TailCalibX release (github.com/rahulvigneswaran/TailCalibX) "
    "builds its lists with Notebooks/Create_mini-ImageNet-LT.ipynb from the ImageNet training images of the 100 "
    "classes in Notebooks/mini-imagenet-assets/all_classes.txt, writing 0.01_train.txt (500 down to 5 images a "
    "class), 0.01_val.txt and 0.01_test.txt (100 a class), one '<wnid>_<n>.JPEG <label 0-99>' line per image. Put "
    "0.01_train.txt and 0.01_test.txt in data/mini-imagenet-LT/ (where the config mini-imagenet-LT_resnet10 reads "
    "them) or set dataset.train_list and dataset.test_list to them. " + _MINI_IMAGENET_LT_IMAGES
)


def _release_help(list_path: str | Path, missing: str) -> str:
    """The remedy appended to the error of a missing ``list`` or ``image`` of a known release's list (for now
    mini-ImageNet-LT, recognised by the list's path); empty for other lists."""
    name = str(list_path).lower().replace("_", "-")
    if "mini-imagenet" not in name and "miniimagenet" not in name:
        return ""
    return " " + (MINI_IMAGENET_LT_HELP if missing == "list" else _MINI_IMAGENET_LT_IMAGES)


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


def resolve_list_path(path: str | Path, root: str | Path | None, what: str) -> Path:
    """A list file given relative to the working directory or to ``root``."""
    p = Path(path)
    if p.is_file():
        return p
    if root is not None and not p.is_absolute() and (Path(root) / p).is_file():
        return Path(root) / p
    where = f" or in {root}" if root is not None else ""
    raise UserError(f"{what} file {path} not found (looked relative to the working directory{where})."
                    f"{_release_help(path, 'list')}")


def _image_path(base: Path, rel: str) -> tuple[Path | None, list[Path]]:
    """``(the image file, None if absent; the places looked at)``: ``base/rel``, and for a bare ImageNet
    file name ``<wnid>_<n>.<ext>`` also ``base/<wnid>/<name>`` (ImageNet's train/ layout)."""
    tried = [base / rel]
    match = _IMAGENET_FILE_NAME.fullmatch(rel)
    if match:
        tried.append(base / match.group(1) / rel)
    return next((p for p in tried if os.path.isfile(p)), None), tried


def _list_entries(list_path: Path, root: str | Path | None) -> list[tuple[int, str, int]]:
    """Parse and validate a ``relative/path label`` list; returns ``(line number, full path, label)``."""
    base = Path(root) if root is not None else Path(".")
    try:
        text = list_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read list file {list_path}: {exc}") from exc
    entries: list[tuple[int, str, int]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise UserError(
                f"{list_path}, line {lineno}: expected 'relative/path label', got {line!r}"
            )
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise UserError(
                f"{list_path}, line {lineno}: label {label_text!r} is not an integer (line: {line!r})"
            ) from None
        if label < 0:
            raise UserError(f"{list_path}, line {lineno}: label {label} is negative")
        full, tried = _image_path(base, rel)
        if full is None:
            nor = "".join(f" (nor {p})" for p in tried[1:])
            raise UserError(f"{list_path}, line {lineno}: image {tried[0]} does not exist{nor} (check dataset.root)."
                            f"{_release_help(list_path, 'image')}")
        entries.append((lineno, str(full), label))
    if not entries:
        raise UserError(f"list file {list_path} has no entries")
    return entries


def _require_two_classes(count: int, source: str, fix: str) -> None:
    """A dataset of fewer than two classes trains to a meaningless 100%: refused, naming ``source``."""
    if count < 2:
        raise UserError(f"{source} has {count} class{'' if count == 1 else 'es'}; classification needs at least 2. {fix}")


def _listing(items: Sequence[object], limit: int = 10) -> str:
    """``a, b, c`` (the first `limit` items, then how many in all)."""
    shown = ", ".join(str(x) for x in items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def read_list_dataset(
    train_list: str | Path, test_list: str | Path, root: str | Path | None
) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """``(num_classes, train samples, test samples)`` of a list-file dataset, samples as ``(path, label)``.

    The classes are the training labels, which must be exactly 0..K-1 (a label with no training
    image would be a class the model cannot learn); the test labels must be exactly the same set.
    """
    train_list, test_list = Path(train_list), Path(test_list)
    train = _list_entries(train_list, root)
    labels = {label for _, _, label in train}
    num_classes = 1 + max(labels)
    absent = sorted(set(range(num_classes)) - labels)
    if absent:
        raise UserError(
            f"The training list {train_list} has labels up to {num_classes - 1} but no image of label(s) "
            f"{_listing(absent)}; the labels are the class numbers 0..K-1, and a class without training images "
            f"cannot be learnt. Renumber the labels of both lists to 0..{len(labels) - 1}, or add training images "
            f"of those classes."
        )
    _require_two_classes(num_classes, f"The training list {train_list}",
                         "Add training images of a second class (label 1), or check that the labels are the last field "
                         "of each line.")
    test = _list_entries(test_list, root)
    for lineno, _, label in test:
        if label >= num_classes:
            raise UserError(
                f"{test_list}, line {lineno}: label {label} is not a training class (the training list {train_list} "
                f"has labels 0..{num_classes - 1}). Every test label must be one of the training labels: fix the "
                f"label, remove the line, or add training images of class {label} to {train_list}."
            )
    untested = sorted(labels - {label for _, _, label in test})
    if untested:
        raise UserError(
            f"The test list {test_list} has no image of training class(es) {_listing(untested)}, so their accuracy "
            f"(and the many / medium / few-shot groups) would be undefined. Add test images of those classes, or "
            f"remove the classes from both lists and renumber the labels."
        )
    return num_classes, [(path, label) for _, path, label in train], [(path, label) for _, path, label in test]


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """``(class_names, train_samples, test_samples)`` from ``root/train/<class>`` and ``root/test|val/<class>``."""
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UserError(f"image-folder dataset: {train_dir} does not exist (expected {root}/train/<class>/<images>)")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if test_dir is None:
        raise UserError(f"image-folder dataset: neither {root / 'test'} nor {root / 'val'} exists")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    _require_two_classes(len(classes), f"image-folder dataset: {train_dir} (class folders: {_listing(classes) or 'none'})",
                         f"Put the images of each class in a folder of its own: {train_dir}/<class>/<images>.")
    index = {c: i for i, c in enumerate(classes)}
    train: list[tuple[str, int]] = []
    for c in classes:
        files = _images_in(train_dir / c)
        if not files:
            raise UserError(f"image-folder dataset: class folder {train_dir / c} holds no images")
        train += [(str(f), index[c]) for f in files]
    test: list[tuple[str, int]] = []
    for d in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        if d.name not in index:
            raise UserError(
                f"image-folder dataset: {d} is not a class of {train_dir} (classes: {', '.join(classes)})"
            )
        test += [(str(f), index[d.name]) for f in _images_in(d)]
    if not test:
        raise UserError(f"image-folder dataset: no images under {test_dir}")
    tested = {label for _, label in test}
    untested = [c for c in classes if index[c] not in tested]
    if untested:
        raise UserError(
            f"image-folder dataset: {test_dir} has no images of the training class(es) {_listing(untested)} "
            f"(no folder, or a folder without images: {_listing([str(test_dir / c) for c in untested], 3)}); "
            f"every class needs test images to be measured. Add the missing folder(s) with images under "
            f"{test_dir}, or remove the class folder(s) from {train_dir}."
        )
    return classes, train, test


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
