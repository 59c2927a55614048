"""`dataset.augment` (auto / none / crop_flip / resized_crop), `dataset.flip` and the automatic
`dataset.image_size` of file datasets; the in-memory datasets' default stays bit-identical.

`none` (the old `false`) switches phase I's augmentation off; a dataset switched on again (phase II's
views, phase III online) augments with what `auto` picks, as the old `false` did."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from datasets import AUGMENT_POLICIES, build_datasets
from datasets.file_list import IMAGENET_MEAN, IMAGENET_STD, build_transform
from datasets.transforms import augment_batch, normalize, random_crop_flip
from tests.helpers import run_main_in_process
from utils import schema
from utils.config import load_config
from utils.errors import UserError

PAD = 4


def _folder(root: Path, size: tuple[int, int] = (32, 32), per_class: int = 2) -> Path:
    """root/{train,test}/c<k>/*.png of random pixels in 1..255 (a zero is padding) of `size` (width, height)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in range(2):
            folder = root / split / f"c{cls}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                pixels = rng.integers(1, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")
    return root


def _build(root: Path, **cfg):
    return build_datasets({"name": "image-folder", "root": str(root), **cfg}, None)


def _pixels(path: str) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).contiguous()


def _normalised(image: torch.Tensor) -> torch.Tensor:
    return normalize(image.unsqueeze(0), IMAGENET_MEAN, IMAGENET_STD)[0]


def _views(image: torch.Tensor, flips: tuple[bool, ...]) -> list[torch.Tensor]:
    """Every zero-padded crop of `image` (flipped or not, as `flips` says), normalised."""
    padded = torch.nn.functional.pad(image, (PAD, PAD, PAD, PAD))
    h, w = image.shape[1:]
    crops = [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)]
    return [_normalised(c.flip(-1) if f else c) for c in crops for f in flips]


def _is_one_of(x: torch.Tensor, views: list[torch.Tensor]) -> bool:
    return any(torch.equal(x, v) for v in views)


# ---------------------------------------------------------------------------------------------
# file datasets: policies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, size, expected, on", [
    ("auto", None, "crop_flip", True), ("none", None, "crop_flip", False), ("crop_flip", 24, "crop_flip", True),
    ("resized_crop", 40, "resized_crop", True), ("auto", 96, "resized_crop", True), (True, None, "crop_flip", True),
    (False, 96, "resized_crop", False),
])
def test_every_policy_gives_images_of_the_chosen_size(tmp_path, value, size, expected, on):
    bundle = _build(_folder(tmp_path), augment=value, image_size=size)
    side = size or 32
    assert bundle.train.policy == bundle.test.policy == expected
    assert bundle.train.augment is on and bundle.test.augment is False
    for ds in (bundle.train, bundle.test):
        assert ds[(1, 7)][0].shape == ds[0][0].shape == (3, side, side)


def test_none_is_deterministic_and_is_the_evaluation_view(tmp_path):
    bundle = _build(_folder(tmp_path), augment="none")
    train = bundle.train.with_augment("none")  # as phase I switches it
    assert bundle.train.augment is False and train.augment is False
    x = train[(0, 1)][0]
    assert torch.equal(x, train[(0, 2)][0]) and torch.equal(x, train[0][0])
    # images read at their own size: the evaluation view is the normalised pixels, nothing cut
    assert torch.equal(x, _normalised(_pixels(train.paths[0])))
    assert torch.equal(bundle.test[0][0], _normalised(_pixels(bundle.test.paths[0])))
    # switched on (phase II's views, phase III online): auto's crop_flip
    views = [bundle.train.with_augment(True)[(0, seed)][0] for seed in range(4)]
    assert any(not torch.equal(v, x) for v in views)


@pytest.mark.parametrize("flip", [True, False])
def test_crop_flip_only_shifts_and_flips_the_image(tmp_path, flip):
    train = _build(_folder(tmp_path), augment="crop_flip", flip=flip).train
    image = _pixels(train.paths[0])
    plain, mirrored = _views(image, (False,)), _views(image, (True,))
    outputs = [train[(0, seed)][0] for seed in range(24)]
    assert all(x.shape == (3, 32, 32) and _is_one_of(x, plain + mirrored) for x in outputs)
    n_mirrored = sum(_is_one_of(x, mirrored) for x in outputs)
    assert (0 < n_mirrored < 24) if flip else n_mirrored == 0
    assert sum(not torch.equal(x, _normalised(image)) for x in outputs) > 12  # shifted, mostly


def test_crop_flip_draws_like_the_in_memory_code_under_the_sample_seed(tmp_path):
    """The file crop is the in-memory batched crop on a batch of one, drawn from the sample's seed."""
    train = _build(_folder(tmp_path), augment="crop_flip").train
    image = _pixels(train.paths[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        expected = _normalised(random_crop_flip(image.unsqueeze(0), PAD, True)[0])
    state = torch.get_rng_state()
    assert torch.equal(train[(1, 5)][0], expected)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is left alone


@pytest.mark.parametrize("policy", ["crop_flip", "resized_crop"])
def test_random_policies_depend_on_the_sample_seed_only(tmp_path, policy):
    train = _build(_folder(tmp_path), augment=policy, image_size=24).train
    first = [train[(0, seed)][0] for seed in range(6)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # the global generator's state does not matter
        assert all(torch.equal(x, train[(0, seed)][0]) for seed, x in enumerate(first))
    assert len({x.sum().item() for x in first}) > 1


@pytest.mark.parametrize("flip", [True, False])
def test_flip_false_leaves_the_flip_out_of_resized_crop(flip):
    steps = build_transform("resized_crop", 64, flip, train=True).transforms
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in steps) is flip


def test_resized_crop_evaluates_on_a_centre_crop_of_the_enlarged_image(tmp_path):
    test = _build(_folder(tmp_path, (300, 300), per_class=1)).test
    assert test.policy == "resized_crop" and test.image_size == 224
    steps = test._test_tf.transforms
    assert isinstance(steps[0], T.Resize) and steps[0].size == 256 and isinstance(steps[1], T.CenterCrop)


# ---------------------------------------------------------------------------------------------
# file datasets: image size
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, expected, policy", [
    ((28, 28), 28, "crop_flip"), ((32, 32), 32, "crop_flip"), ((40, 30), 30, "crop_flip"),
    ((300, 300), 224, "resized_crop"),
])
def test_image_size_defaults_to_small_images_own_size(tmp_path, size, expected, policy):
    bundle = _build(_folder(tmp_path, size, per_class=1))
    assert bundle.train.image_size == bundle.test.image_size == expected and bundle.train.policy == policy
    assert bundle.train[(0, 0)][0].shape == bundle.test[0][0].shape == (3, expected, expected)
    assert _build(tmp_path, image_size=20).train.image_size == 20  # an explicit size is used as given


@pytest.fixture
def dataset_warnings():
    """Messages of the datasets' logger (the run logger shows them on the console and in log.txt)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("fsa_lt.datasets")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_upscaling_more_than_twice_is_warned_about(tmp_path, dataset_warnings):
    root = _folder(tmp_path, per_class=1)
    _build(root, image_size=224)
    assert len(dataset_warnings) == 1 and "\n" not in dataset_warnings[0]
    assert "dataset.image_size=224" in dataset_warnings[0] and "7.0x" in dataset_warnings[0]
    _build(root)  # auto: the images' own size
    _build(root, image_size=64)  # exactly 2x
    assert len(dataset_warnings) == 1


# ---------------------------------------------------------------------------------------------
# in-memory datasets and the config
# ---------------------------------------------------------------------------------------------


def test_in_memory_auto_is_the_unchanged_crop_flip():
    """`auto` (and `true`) on in-memory data: get_batch draws exactly what `augment_batch` with the
    pre-policy settings (pad 4, flip) draws, the code path of every run before the policies. (Also
    checked once against the previous commit's datasets package: identical batches.)"""
    idx = torch.arange(0, 60, 3)
    for value in ("auto", True):
        train = build_datasets({"name": "synthetic-LT", "imbalance": 10, "augment": value}, None).train
        expected = augment_batch(train.images[idx], train.mean, train.std, augment=True, pad=4, flip=True,
                                 generator=torch.Generator().manual_seed(3))
        assert torch.equal(train.get_batch(idx, "cpu", torch.Generator().manual_seed(3)), expected)


def test_in_memory_none_and_flip_false():
    cfg = {"name": "synthetic-LT", "imbalance": 10}
    idx = torch.arange(40)
    train = build_datasets({**cfg, "augment": "none"}, None).train
    assert train.augment is False and train.with_augment("none").augment is False
    assert torch.equal(train.get_batch(idx, "cpu", torch.Generator().manual_seed(0)),
                       normalize(train.images[idx], train.mean, train.std))
    on = train.with_augment(True)  # the old false's behaviour in phase II / III: the default crop + flip
    expected = augment_batch(train.images[idx], train.mean, train.std, augment=True, pad=4, flip=True,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(on.get_batch(idx, "cpu", torch.Generator().manual_seed(0)), expected)
    train = build_datasets({**cfg, "augment": "crop_flip", "flip": False}, None).train
    expected = augment_batch(train.images[idx], train.mean, train.std, augment=True, pad=4, flip=False,
                             generator=torch.Generator().manual_seed(1))
    assert torch.equal(train.get_batch(idx, "cpu", torch.Generator().manual_seed(1)), expected)


def test_resized_crop_on_in_memory_data_is_a_user_error():
    with pytest.raises(UserError, match="resized_crop is for file datasets"):
        build_datasets({"name": "synthetic-LT", "augment": "resized_crop"}, None)


def test_config_takes_the_policies_and_the_old_booleans():
    assert schema.AUGMENT_POLICIES == AUGMENT_POLICIES
    d = load_config("smoke", "phase_i")["dataset"]
    assert (d["augment"], d["flip"], d["image_size"]) == ("auto", True, None)
    assert load_config("smoke", "phase_i", ["dataset.augment=false"])["dataset"]["augment"] is False
    assert load_config("smoke", "phase_i", ["dataset.augment=resized_crop"])["dataset"]["augment"] == "resized_crop"
    with pytest.raises(UserError, match="dataset.augment must be one of auto, none, crop_flip, resized_crop"):
        load_config("smoke", "phase_i", ["dataset.augment=random"])
    train = build_datasets({"name": "synthetic-LT", "augment": False}, None).train  # the old switch: off
    assert train.augment is False and train.policy == "crop_flip"
    assert train.with_augment("crop_flip").augment is True and train.with_augment(False).augment is False


def test_phase_i_trains_on_an_image_folder_at_its_own_size(tmp_path):
    root = _folder(tmp_path / "data", (20, 20), per_class=3)
    code, err = run_main_in_process(
        "phase_i_train_or_test.py", "--config", "smoke", "--device", "cpu", "--opts", "dataset.name=image-folder",
        f"dataset.root={root}", "model.arch=resnet8", "train.epochs=1", "train.batch_size=4", cwd=tmp_path)
    assert code == 0, err
    assert "upscales" not in err
    run = tmp_path / "checkpoints/phase_i/smoke/default"
    assert json.loads((run / "results.json").read_text())["finished"] is True
