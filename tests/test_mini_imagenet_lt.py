"""mini-ImageNet-LT from the TailCalibX release's split lists, used unchanged through the `list` dataset.

The release's Notebooks/Create_mini-ImageNet-LT.ipynb writes 0.01_train.txt / 0.01_val.txt / 0.01_test.txt:
one "<wnid>_<n>.JPEG <label>" line per image (one space, no header, newline-terminated), the label the wnid's
position among the sorted wnids, the training list class by class with exponentially fewer images; the
image root is a flat folder of ImageNet training images. Here: a few tiny JPEGs and lists in that format.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import build_datasets
from models import check_arch
from tests.helpers import run_main_in_process
from utils.config import load_config
from utils.errors import UserError

CONFIG = "mini-imagenet-LT_resnet10"
# four of the release's classes (Notebooks/mini-imagenet-assets/all_classes.txt), listed unsorted as there
WNIDS = ("n02110341", "n01930112", "n04509417", "n01532829")
TRAIN, VAL, TEST = (8, 4, 2, 1), 2, 3  # images per class (label order); the release: 500..5, 100, 100


def _release_files(tmp_path: Path, layout: str) -> tuple[Path, Path]:
    """(image root, list folder) of a tiny mini-ImageNet-LT in the release's format; images flat in the root
    (the release's layout) or in root/<wnid>/ (ImageNet's train/ layout)."""
    root, lists = tmp_path / "images", tmp_path / "mini-imagenet-LT"
    lists.mkdir()
    label = {w: i for i, w in enumerate(sorted(WNIDS))}  # np.unique(labels) in the notebook
    rng = np.random.default_rng(0)
    number = iter(range(1000, 10**6, 7))
    splits = {"train": [], "val": [], "test": []}
    for wnid in sorted(WNIDS):
        for split, n in (("train", TRAIN[label[wnid]]), ("val", VAL), ("test", TEST)):
            for _ in range(n):
                name = f"{wnid}_{next(number)}.JPEG"
                folder = root if layout == "flat" else root / wnid
                folder.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / name, format="JPEG")
                splits[split].append((name, label[wnid]))
    for split, rows in splits.items():
        with open(lists / f"0.01_{split}.txt", "w") as f:  # as the notebook writes them
            for line, lab in rows:
                f.write(line + " " + str(np.int64(lab)))
                f.write("\n")
    return root, lists


def _dataset_cfg(**overrides: str) -> dict:
    """The shipped config's dataset section with `overrides` (root, list paths)."""
    opts = [f"dataset.{key}={value}" for key, value in overrides.items()]
    return load_config(CONFIG, "phase_i", opts)["dataset"]


def test_shipped_config_loads():
    cfg = load_config(CONFIG, "phase_i")
    d = cfg["dataset"]
    assert d["name"] == "list" and d["image_size"] == 224 and d["augment"] == "resized_crop"
    assert d["train_list"].endswith("0.01_train.txt") and d["test_list"].endswith("0.01_test.txt")
    assert cfg["model"]["arch"] == "resnet10"
    check_arch(cfg["model"]["arch"])


@pytest.mark.parametrize("layout", ["flat", "imagenet"])
def test_release_lists_build_unchanged(tmp_path, layout):
    root, lists = _release_files(tmp_path, layout)
    cfg = _dataset_cfg(root=root, train_list=lists / "0.01_train.txt", test_list=lists / "0.01_test.txt")
    b = build_datasets(cfg, tmp_path / "run")
    assert b.num_classes == len(WNIDS) and b.in_channels == 3 and b.val is None
    assert b.train_counts == list(TRAIN)
    assert len(b.test) == TEST * len(WNIDS)
    expected = [int(line.split()[1]) for line in (lists / "0.01_test.txt").read_text().splitlines()]
    assert b.test.targets.tolist() == expected == sorted(expected)
    # the file of each line: the flat root's own, or ImageNet's root/<wnid>/<name>
    first = (lists / "0.01_train.txt").read_text().split()[0]
    wnid = first.split("_")[0]
    assert b.train.paths[0] == str(root / first if layout == "flat" else root / wnid / first)
    assert wnid == sorted(WNIDS)[0] and b.train.targets[0] == 0
    x, y, i = b.test[TEST]  # the first image of label 1, read at the config's 224
    assert x.shape == (3, 224, 224) and y == 1 and i == TEST


def test_list_paths_relative_to_root(tmp_path, monkeypatch):
    """The config's list paths may be given relative to dataset.root (as well as to the working directory)."""
    root, lists = _release_files(tmp_path, "flat")
    (root / "splits").mkdir()
    for split in ("train", "test"):
        (lists / f"0.01_{split}.txt").rename(root / "splits" / f"0.01_{split}.txt")
    monkeypatch.chdir(tmp_path)
    b = build_datasets(_dataset_cfg(root=root, train_list="splits/0.01_train.txt",
                                    test_list="splits/0.01_test.txt"), None)
    assert b.train_counts == list(TRAIN)


def test_missing_lists_say_how_to_build_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here: the shipped config as it is
    with pytest.raises(UserError) as err:
        build_datasets(load_config(CONFIG, "phase_i")["dataset"], None)
    message = str(err.value)
    assert "\n" not in message  # one paragraph
    for fix in ("data/mini-imagenet-LT/0.01_train.txt", "Create_mini-ImageNet-LT.ipynb", "image-net.org",
                "dataset.train_list", "dataset.test_list", "dataset.root", "train/<wnid>/<wnid>_<n>.JPEG"):
        assert fix in message, fix


def test_missing_images_name_the_root(tmp_path):
    root, lists = _release_files(tmp_path, "imagenet")
    cfg = _dataset_cfg(root=tmp_path / "elsewhere", train_list=lists / "0.01_train.txt",
                       test_list=lists / "0.01_test.txt")
    with pytest.raises(UserError) as err:
        build_datasets(cfg, None)
    message = str(err.value)
    first = (lists / "0.01_train.txt").read_text().split()[0]
    assert "line 1" in message and str(tmp_path / "elsewhere" / first) in message
    assert str(tmp_path / "elsewhere" / first.split("_")[0] / first) in message  # the ImageNet layout, tried too
    assert "dataset.root" in message and "ImageNet's train/ folder" in message and "\n" not in message


def test_other_lists_get_no_mini_imagenet_advice(tmp_path):
    cfg = {"name": "list", "root": str(tmp_path), "train_list": "ImageNet_LT_train.txt", "test_list": "t.txt"}
    with pytest.raises(UserError) as err:
        build_datasets(cfg, None)
    assert "ImageNet_LT_train.txt" in str(err.value) and "mini-ImageNet" not in str(err.value)


def test_phase_i_without_data_exits_2_with_the_fix(tmp_path):
    code, stderr = run_main_in_process("phase_i_train_or_test.py", "--config", CONFIG, "--device", "cpu",
                                       cwd=tmp_path)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "Create_mini-ImageNet-LT.ipynb" in message
    assert "dataset.root" in message
