"""Where a file dataset's samples are: list files (ImageNet-LT / Places-LT / iNaturalist format) and
image folders, read and validated into ``(path, label)`` pairs (the datasets themselves, which decode the
images: ``datasets.file_list``).

List file: one ``relative/path label`` per line (blank lines ignored; the label is the last
whitespace-separated field), the path relative to the data root. A bare ImageNet file name
``<wnid>_<n>.JPEG``, as in the TailCalibX release's mini-ImageNet-LT lists (written for one flat image
folder), is also looked up as ``root/<wnid>/<name>``, ImageNet's own ``train/`` layout. A missing list
or image of mini-ImageNet-LT (a list path naming it) says how the release builds the lists
(:data:`MINI_IMAGENET_LT_HELP`). Image folder: ``root/train/<class>/*`` and ``root/test/<class>/*``
(or ``val``), classes sorted by folder name. Both are validated when read: malformed lines, bad labels (a
gap in the training labels, a test label that is no training class), missing images, a class without test
images and fewer than two classes are ``UserError``s.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from utils.errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MINI_IMAGENET_LT_HELP",
    "read_list_dataset",
    "resolve_list_path",
    "scan_image_folder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

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
