"""Tests for datasets/: imbalance profiles, subsets, synthetic/Fashion/CIFAR/list/folder datasets,
batched augmentation and the batch loader."""
from __future__ import annotations

import gzip
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets.fashion_mnist as fm
from datasets import (
    DATASETS as AVAILABLE_DATASETS,
    BatchLoader,
    InMemoryDataset,
    EpochBatches,
    build_datasets,
    long_tail_counts,
    select_long_tail_indices,
    sequential_batches,
    shuffled_batches,
)
from datasets.imbalance import SUBSET_FILENAME, make_long_tail_subset
from datasets.synthetic import SHAPES, _draw_shape, generate_shapes
from datasets.transforms import crop_flip, normalize, random_crop_flip
from utils.errors import UserError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------
# imbalance profiles
# ---------------------------------------------------------------------------------------------


def test_exponential_counts_hand_computed():
    assert long_tail_counts(5000, 10, 100, "exp") == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    c100 = long_tail_counts(500, 100, 100, "exp")
    assert len(c100) == 100 and c100[0] == 500 and c100[-1] == 5
    assert c100[1] == 477  # floor(500 * 100 ** (-1/99)) = floor(477.27)
    assert all(a >= b for a, b in zip(c100, c100[1:]))
    assert long_tail_counts(200, 6, 1, "exp") == [200] * 6
    # every class keeps at least one image
    assert long_tail_counts(10, 3, 100, "exp") == [10, 1, 1]
    assert long_tail_counts(7, 1, 100, "exp") == [7]


def test_step_counts():
    assert long_tail_counts(100, 10, 10, "step", 0.5) == [100] * 5 + [10] * 5
    assert long_tail_counts(100, 10, 10, "step", 0.3) == [100] * 3 + [10] * 7
    assert long_tail_counts(5000, 4, 100, "step", 0.5) == [5000, 5000, 50, 50]
    assert long_tail_counts(10, 4, 1000, "step", 0.25) == [10, 1, 1, 1]


@pytest.mark.parametrize(
    "kwargs",
    [dict(rho=0.5, profile="exp"), dict(rho=10, profile="linear"), dict(rho=10, profile="step", step_fraction=1.5)],
)
def test_bad_profile_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        long_tail_counts(100, 10, **kwargs)


def test_select_indices_deterministic_and_seeded():
    targets = np.repeat(np.arange(5), 50)
    rng = np.random.default_rng(1)
    rng.shuffle(targets)
    counts = long_tail_counts(50, 5, 10, "exp")
    a = select_long_tail_indices(targets, counts, seed=3)
    b = select_long_tail_indices(targets, counts, seed=3)
    c = select_long_tail_indices(targets, counts, seed=4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.diff(a) > 0)  # sorted and unique
    assert np.bincount(targets[a], minlength=5).tolist() == counts
    with pytest.raises(UserError):
        select_long_tail_indices(targets, [51, 1, 1, 1, 1], seed=0)


def test_subset_json_written_and_reused(tmp_path, monkeypatch):
    targets = np.repeat(np.arange(4), 30)
    kw = dict(dataset_name="toy", rho=10.0, profile="exp", step_fraction=0.5, seed=7)
    idx, counts = make_long_tail_subset(targets, 4, run_dir=tmp_path, **kw)
    saved = json.loads((tmp_path / SUBSET_FILENAME).read_text())
    assert saved["indices"] == idx.tolist() and saved["counts"] == counts
    assert saved["dataset"] == "toy" and saved["profile"] == "exp" and saved["subset_seed"] == 7
    assert saved["imbalance"] == 10.0

    # a resumed run must re-read the file, not draw again
    import datasets.imbalance as imb

    def boom(*a, **k):
        raise AssertionError("indices were drawn again instead of re-read")

    monkeypatch.setattr(imb, "select_long_tail_indices", boom)
    idx2, counts2 = make_long_tail_subset(targets, 4, run_dir=tmp_path, **kw)
    assert np.array_equal(idx, idx2) and counts2 == counts

    # a different setting on resume is refused
    with pytest.raises(UserError, match="subset_seed"):
        make_long_tail_subset(targets, 4, run_dir=tmp_path, **{**kw, "seed": 8})
    # a tampered file is refused
    saved["indices"] = saved["indices"][:-1] + [saved["indices"][0]]
    (tmp_path / SUBSET_FILENAME).write_text(json.dumps(saved))
    with pytest.raises(UserError, match="does not match"):
        make_long_tail_subset(targets, 4, run_dir=tmp_path, **kw)


def test_build_datasets_subset_is_reproducible(tmp_path):
    cfg = {"name": "synthetic-LT", "imbalance": 10.0, "subset_seed": 3}
    a = build_datasets(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / SUBSET_FILENAME).read_text())
    assert saved["indices"] == a.train.source_indices.tolist()
    b = build_datasets(cfg, tmp_path / "run")  # resume
    assert torch.equal(a.train.images, b.train.images)
    c = build_datasets({**cfg, "subset_seed": 4}, None)
    assert not torch.equal(a.train.source_indices, c.train.source_indices)
    assert a.train_counts == long_tail_counts(200, 6, 10.0, "exp") == a.train.class_counts()
    assert a.test.class_counts() == [40] * 6  # the test set stays balanced


def test_unknown_dataset_name_lists_available():
    with pytest.raises(UserError) as err:
        build_datasets({"name": "imagenet-LT"}, None)
    for name in AVAILABLE_DATASETS:
        assert name in str(err.value)


# ---------------------------------------------------------------------------------------------
# synthetic-LT
# ---------------------------------------------------------------------------------------------


def test_synthetic_canonical_shapes_are_distinct():
    masks = []
    for shape in SHAPES:
        m = np.zeros((32, 32), np.uint8)
        _draw_shape(m, shape, 16.0, 16.0, 7.0)
        assert 20 < m.sum() < 32 * 32 / 2, shape
        masks.append(m.astype(bool))
    for i in range(len(SHAPES)):
        for j in range(i + 1, len(SHAPES)):
            differ = int((masks[i] ^ masks[j]).sum())
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert differ >= 20 and iou < 0.9, (SHAPES[i], SHAPES[j], differ, iou)


def test_synthetic_dataset_properties():
    syn = {"num_classes": 6, "image_size": 32, "train_per_class": 60, "test_per_class": 10, "seed": 5}
    b = build_datasets({"name": "synthetic-LT", "imbalance": 4.0, "synthetic": syn}, None)
    tr = b.train
    assert b.num_classes == 6 and b.in_channels == 3 and b.class_names == list(SHAPES[:6])
    assert tr.images.dtype == torch.uint8 and tuple(tr.images.shape[1:]) == (3, 32, 32)
    assert tr.masks.dtype == torch.bool and tr.masks.shape == (len(tr), 32, 32)
    areas = tr.masks.flatten(1).sum(1)
    assert bool((areas > 0).all())
    border = tr.masks[:, 0].any(1) | tr.masks[:, -1].any(1) | tr.masks[:, :, 0].any(1) | tr.masks[:, :, -1].any(1)
    assert not bool(border.any())  # shapes lie fully inside the image
    # masks stay aligned with images after subsetting: shape pixels are one flat, contrasting colour
    img = tr.images.float()
    for k in range(0, len(tr), 7):
        m = tr.masks[k]
        inside, outside = img[k][:, m], img[k][:, ~m]
        assert inside.std(dim=1).max() < 12
        assert (inside.mean(1) - outside.mean(1)).abs().mean() > 40
    # shape scale ~ 35-50 % of the side
    extent = torch.maximum(tr.masks.any(2).sum(1), tr.masks.any(1).sum(1)).float()
    assert extent.min() >= 0.3 * 32 and extent.max() <= 0.55 * 32
    # the background is class-independent: per-class mean background brightness is close
    bg_means = []
    full = build_datasets({"name": "synthetic-LT", "imbalance": 1.0, "synthetic": syn}, None).train
    for c in range(6):
        sel = full.targets == c
        bgm = (full.images[sel].float().mean(1) * (~full.masks[sel])).sum() / (~full.masks[sel]).sum()
        bg_means.append(float(bgm))
    assert max(bg_means) - min(bg_means) < 12


def test_synthetic_seeded_and_fast():
    labels = np.repeat(np.arange(6), 240)
    t0 = time.perf_counter()
    a_img, a_mask = generate_shapes(labels, 32, seed=[0, 0])
    assert time.perf_counter() - t0 < 1.5
    b_img, b_mask = generate_shapes(labels, 32, seed=[0, 0])
    c_img, _ = generate_shapes(labels, 32, seed=[1, 0])
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)
    # train and test are different draws
    b = build_datasets({"name": "synthetic-LT", "imbalance": 1.0}, None)
    assert not torch.equal(b.train.images[:40], b.test.images[:40])


def test_synthetic_too_many_classes():
    with pytest.raises(UserError, match="num_classes"):
        build_datasets({"name": "synthetic-LT", "synthetic": {"num_classes": len(SHAPES) + 1}}, None)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_real_data(tmp_path):
    b = build_datasets({"name": "fashion-mnist-LT", "imbalance": 100.0, "download": False}, tmp_path)
    assert b.in_channels == 1 and b.num_classes == 10 and b.class_names[0] == "T-shirt/top"
    assert tuple(b.train.images.shape[1:]) == (1, 28, 28)
    assert b.train_counts == long_tail_counts(6000, 10, 100.0, "exp")
    assert b.test.class_counts() == [1000] * 10
    x, y, i = b.train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int) and i == 3
    assert abs(float(b.test.get_batch(torch.arange(2000)).mean())) < 0.2  # roughly normalised
    assert (tmp_path / SUBSET_FILENAME).exists()


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    code = {np.uint8: 0x08}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    data = header + arr.tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_fashion_idx_reader_plain_and_gz(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    root = tmp_path / "fm"
    root.mkdir()
    for split, n, gz in (("train", 30, False), ("t10k", 20, True)):
        ext = ".gz" if gz else ""
        _write_idx(root / f"{split}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        _write_idx(root / f"{split}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8), gz)
    raw = fm.read_idx(root / "train-images-idx3-ubyte")
    assert raw.shape == (30, 28, 28)
    monkeypatch.setattr(fm, "DEFAULT_DIRS", ())
    b = build_datasets({"name": "fashion-mnist-LT", "root": str(root), "imbalance": 1.0, "download": False}, None)
    assert np.array_equal(b.train.images[:, 0].numpy(), raw)
    assert b.train_counts == [3] * 10 and len(b.test) == 20
    (root / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(UserError, match="magic"):
        fm.read_idx(root / "bad")


def test_fashion_missing_names_remedies(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEFAULT_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        build_datasets({"name": "fashion-mnist-LT", "root": str(tmp_path / "empty"), "download": False}, None)
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "internet" in msg and str(tmp_path / "empty") in msg


# ---------------------------------------------------------------------------------------------
# CIFAR (tiny fake files in the real torchvision pickle format)
# ---------------------------------------------------------------------------------------------


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fake_cifar10(root: Path, per_batch: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_data = []
    for k in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(i % 10) for i in range(per_batch)]
        _dump(folder / f"data_batch_{k}", {b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": []})
        all_data.append(data)
    test = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    _dump(folder / "test_batch", {b"labels": list(range(10)), b"data": test})
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]
    _dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return {"train": np.concatenate(all_data), "test": test}


def test_cifar10_reader(tmp_path):
    raw = _fake_cifar10(tmp_path)
    b = build_datasets({"name": "cifar10-LT", "root": str(tmp_path), "imbalance": 10.0, "download": False}, tmp_path / "run")
    assert b.num_classes == 10 and b.in_channels == 3 and b.class_names[3] == "cat"
    assert b.train_counts == long_tail_counts(10, 10, 10.0, "exp")
    assert b.test.class_counts() == [1] * 10
    # pixel layout: each row is R(1024) G(1024) B(1024), row-major 32x32
    src = b.train.source_indices.numpy()
    assert np.array_equal(b.train.images.numpy(), raw["train"][src].reshape(-1, 3, 32, 32))
    assert b.train.targets.tolist() == (src % 20 % 10).tolist()
    assert np.array_equal(b.test.images[4, 1, 2].numpy(), raw["test"][4, 1024 + 64 : 1024 + 96])
    assert b.test.augment is False and b.train.augment is True


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine = [int(i % 100) for i in range(300)]
    _dump(folder / "train", {b"data": rng.integers(0, 256, (300, 3072), dtype=np.uint8), b"fine_labels": fine,
                             b"coarse_labels": [f // 5 for f in fine]})
    _dump(folder / "test", {b"data": rng.integers(0, 256, (100, 3072), dtype=np.uint8),
                            b"fine_labels": list(range(100)), b"coarse_labels": [0] * 100})
    _dump(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": []})
    b = build_datasets({"name": "cifar100-LT", "root": str(tmp_path), "imbalance": 3.0, "download": False}, None)
    assert b.num_classes == 100 and b.class_names[42] == "c42"
    assert b.train_counts == long_tail_counts(3, 100, 3.0, "exp")
    assert b.train_counts[0] == 3 and b.train_counts[-1] == 1
    assert b.test.class_counts() == [1] * 100


def test_cifar_missing_names_remedy(tmp_path):
    with pytest.raises(UserError) as err:
        build_datasets({"name": "cifar10-LT", "root": str(tmp_path), "download": False}, None)
    msg = str(err.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "cifar-10-batches-py") in msg
    with pytest.raises(UserError, match="cifar-100-python.tar.gz"):
        build_datasets({"name": "cifar100-LT", "root": str(tmp_path), "download": False}, None)


def test_cifar_pickle_with_foreign_objects_is_refused(tmp_path):
    _fake_cifar10(tmp_path)
    _dump(tmp_path / "cifar-10-batches-py" / "data_batch_2", {b"data": Path("x"), b"labels": []})
    with pytest.raises(UserError, match="data_batch_2"):
        build_datasets({"name": "cifar10-LT", "root": str(tmp_path), "download": False}, None)


# ---------------------------------------------------------------------------------------------
# list files and image folders
# ---------------------------------------------------------------------------------------------


def _png(path: Path, value: int, size=(20, 14)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


@pytest.fixture
def ds_list_root(tmp_path):
    root = tmp_path / "data"
    for i in range(7):
        _png(root / "imgs" / f"{i}.png", 40 * i)
    (root / "train.txt").write_text("imgs/0.png 0\nimgs/1.png 0\n\nimgs/2.png 2\nimgs/3.png 1\n")
    (root / "test.txt").write_text("imgs/4.png 0\nimgs/5.png 2\nimgs/6.png 1\n")
    return root


def test_list_dataset_reads(ds_list_root, monkeypatch):
    monkeypatch.chdir(ds_list_root.parent)
    cfg = {"name": "list", "root": str(ds_list_root), "train_list": "train.txt",  # relative to root
           "test_list": str(ds_list_root / "test.txt"), "image_size": 16}
    b = build_datasets(cfg, None)
    assert b.num_classes == 3 and b.in_channels == 3
    assert b.train_counts == [2, 1, 1] and len(b.test) == 3
    x, y, i = b.test[1]
    assert x.shape == (3, 16, 16) and y == 2 and i == 1
    expected = (200 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x.mean((1, 2)), expected, atol=1e-4)
    xt, yt, _ = b.train[3]
    assert xt.shape == (3, 16, 16) and yt == 1


def test_list_bad_label_and_missing_image(ds_list_root):
    cfg = {"name": "list", "root": str(ds_list_root), "train_list": str(ds_list_root / "train.txt"),
           "test_list": str(ds_list_root / "test.txt"), "image_size": 16}
    (ds_list_root / "train.txt").write_text("imgs/0.png 0\nimgs/1.png cat\n")
    with pytest.raises(UserError) as err:
        build_datasets(cfg, None)
    assert "line 2" in str(err.value) and "train.txt" in str(err.value)
    (ds_list_root / "train.txt").write_text("imgs/0.png 0\n\nimgs/missing.png 1\n")
    with pytest.raises(UserError) as err:
        build_datasets(cfg, None)
    assert "line 3" in str(err.value) and "missing.png" in str(err.value)
    (ds_list_root / "train.txt").write_text("imgs/0.png\n")
    with pytest.raises(UserError, match="line 1"):
        build_datasets(cfg, None)
    with pytest.raises(UserError, match="nothere.txt"):
        build_datasets({**cfg, "train_list": "nothere.txt"}, None)


def test_image_folder(tmp_path):
    for cls, n in (("dog", 3), ("cat", 5), ("emu", 1)):
        for k in range(n):
            _png(tmp_path / "train" / cls / f"{k}.png", 10 * k)
        _png(tmp_path / "val" / cls / "a.jpg", 100)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    b = build_datasets({"name": "image-folder", "root": str(tmp_path), "image_size": 8}, None)
    assert b.class_names == ["cat", "dog", "emu"]
    assert b.train_counts == [5, 3, 1]
    assert b.test.class_counts() == [1, 1, 1]
    x, y, _ = b.train[0]
    assert x.shape == (3, 8, 8) and y == 0
    _png(tmp_path / "val" / "yak" / "a.png", 1)
    with pytest.raises(UserError, match="yak"):
        build_datasets({"name": "image-folder", "root": str(tmp_path)}, None)


# ---------------------------------------------------------------------------------------------
# batched augmentation
# ---------------------------------------------------------------------------------------------


def _toy(n=16, c=3, size=8, **kw) -> InMemoryDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (n, c, size, size), generator=g, dtype=torch.uint8)  # no zeros: pad is visible
    return InMemoryDataset(images, torch.arange(n) % 4, 4, [0.5] * c, [0.25] * c, **kw)


def test_crop_flip_matches_hand_made_shift():
    img = _toy().images
    b = img.shape[0]
    z = torch.zeros(b, dtype=torch.long)
    p = torch.full((b,), 4, dtype=torch.long)
    no = torch.zeros(b, dtype=torch.bool)
    assert torch.equal(crop_flip(img, p, p, no, 4), img)  # centre window = identity
    out = crop_flip(img, z, z, no, 4)  # window at the padded top-left: content moves down-right by 4
    assert torch.equal(out[..., 4:, 4:], img[..., :-4, :-4])
    assert not out[..., :4, :].any() and not out[..., :, :4].any()  # zero padding
    out = crop_flip(img, p + 4, p - 2, no, 4)  # up by 4, right by 2
    assert torch.equal(out[..., :-4, 2:], img[..., 4:, :-2])
    assert not out[..., -4:, :].any() and not out[..., :, :2].any()
    assert torch.equal(crop_flip(img, p, p, ~no, 4), img.flip(-1))


def _candidates(img: torch.Tensor, pad: int, flips=(False, True)) -> list[torch.Tensor]:
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
            crop = padded[:, dy : dy + img.shape[1], dx : dx + img.shape[2]]
            for f in flips:
                out.append(crop.flip(-1) if f else crop)
    return out


def test_random_crop_flip_happens_and_is_valid():
    img = _toy(n=64).images
    g = torch.Generator().manual_seed(1)
    out = random_crop_flip(img, 4, True, g)
    assert out.shape == img.shape and out.dtype == torch.uint8
    flipped = shifted = 0
    for k in range(img.shape[0]):
        assert any(torch.equal(out[k], c) for c in _candidates(img[k], 4))
        flipped += any(torch.equal(out[k], c) for c in _candidates(img[k], 4, flips=(True,)))
        shifted += not (torch.equal(out[k], img[k]) or torch.equal(out[k], img[k].flip(-1)))
    assert 10 < flipped < 54 and shifted > 40
    # flip option off: never mirrored
    out = random_crop_flip(img, 4, False, torch.Generator().manual_seed(2))
    for k in range(img.shape[0]):
        assert any(torch.equal(out[k], c) for c in _candidates(img[k], 4, flips=(False,)))
    # same generator seed, same batch
    assert torch.equal(random_crop_flip(img, 4, True, torch.Generator().manual_seed(1)),
                       random_crop_flip(img, 4, True, torch.Generator().manual_seed(1)))


def test_get_batch_no_augment_equals_plain_normalisation():
    ds = _toy(augment=False)
    idx = torch.tensor([3, 0, 7])
    x = ds.get_batch(idx, "cpu")
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 8, 8)
    assert torch.equal(x, (ds.images[idx].float() / 255 - mean) / std)
    assert torch.equal(normalize(ds.images[idx], ds.mean, ds.std), x)
    item, label, i = ds[7]
    assert torch.equal(item, x[2]) and label == 3 and i == 7
    # augmented path: shape kept, content changed for some images
    aug = ds.with_augment(True)
    xa = aug.get_batch(torch.arange(16), "cpu", torch.Generator().manual_seed(0))
    assert xa.shape == (16, 3, 8, 8) and not torch.equal(xa, ds.get_batch(torch.arange(16), "cpu"))


def test_with_augment_is_a_shallow_copy():
    ds = _toy(augment=True)
    off = ds.with_augment(False)
    assert off.augment is False and ds.augment is True
    assert off.images.data_ptr() == ds.images.data_ptr()
    assert ds.class_counts() == [4, 4, 4, 4]


# ---------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------


def test_batch_helpers():
    assert sequential_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    s = shuffled_batches(10, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in s] == [4, 4, 2] and sorted(sum(s, [])) == list(range(10))
    assert [len(b) for b in shuffled_batches(10, 4, None, drop_last=True)] == [4, 4]


def test_epoch_batches_single_process_covers_everything_and_set_epoch_reshuffles():
    sampler = EpochBatches(10, 3, seed=5)
    e0 = list(sampler)
    assert len(sampler) == 4 and [len(b) for b in e0] == [3, 3, 3, 1] and sorted(sum(e0, [])) == list(range(10))
    assert list(sampler) == e0  # same epoch -> same order (a resumed run replays it)
    sampler.set_epoch(1)
    assert list(sampler) != e0
    sampler.set_epoch(0)
    assert list(sampler) == e0


@pytest.mark.parametrize("n,batch,world", [(23, 6, 2), (23, 6, 3), (20, 4, 4), (9, 4, 2)])
def test_epoch_batches_ranks_split_each_global_batch_without_overlap(n, batch, world):
    single = EpochBatches(n, batch, seed=1)
    single.set_epoch(3)
    per_rank = []
    for rank in range(world):
        s = EpochBatches(n, batch, seed=1, rank=rank, world_size=world)
        s.set_epoch(3)
        per_rank.append(list(s))
    assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
    for step, global_batch in enumerate(single):
        parts = [batches[step] for batches in per_rank] if step < len(per_rank[0]) else []
        if not parts:  # a last global batch smaller than the world is left out
            assert len(global_batch) < world
            continue
        assert len({len(p) for p in parts}) == 1  # equal parts: DDP's gradient mean is the global mean
        joined = sum(parts, [])
        assert joined == global_batch[:len(joined)] and len(global_batch) - len(joined) < world
    seen = sum((sum(b, []) for b in per_rank), [])
    assert len(seen) == len(set(seen)) and len(seen) > n - world
    assert EpochBatches(n, batch, seed=1, rank=0, world_size=world).samples_per_epoch() == len(seen)


def test_epoch_batches_batch_must_divide_by_world():
    with pytest.raises(UserError, match="multiple of the number of processes"):
        EpochBatches(10, 5, seed=0, rank=0, world_size=2)


def test_batch_loader_in_memory_yields_every_index_once():
    ds = _toy(n=23, augment=False)
    loader = BatchLoader(ds, shuffled_batches(23, 5, torch.Generator().manual_seed(0)), "cpu")
    assert len(loader) == 5
    seen = []
    for x, y, idx in loader:
        assert torch.equal(y, ds.targets[idx])
        assert torch.equal(x, ds.get_batch(idx, "cpu"))
        seen += idx.tolist()
    assert sorted(seen) == list(range(23))
    # a torch BatchSampler works too, and the loader is re-iterable
    from torch.utils.data import BatchSampler, SequentialSampler

    loader = BatchLoader(ds, BatchSampler(SequentialSampler(range(23)), 8, False), "cpu")
    assert [i for _, _, idx in loader for i in idx.tolist()] == list(range(23))
    assert sum(len(idx) for _, _, idx in loader) == 23


def test_batch_loader_file_dataset(ds_list_root):
    cfg = {"name": "list", "root": str(ds_list_root), "train_list": str(ds_list_root / "train.txt"),
           "test_list": str(ds_list_root / "test.txt"), "image_size": 16}
    train = build_datasets(cfg, None).train
    loader = BatchLoader(train, sequential_batches(len(train), 3), "cpu")
    assert len(loader) == 2
    seen = []
    for x, y, idx in loader:
        assert x.shape == (len(idx), 3, 16, 16) and torch.equal(y, train.targets[idx])
        seen += idx.tolist()
    assert seen == [0, 1, 2, 3]
