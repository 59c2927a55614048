"""File datasets (image folders, list files): bad input is a clean UserError, and augmentation is
reproducible whatever the number of DataLoader workers, so a resumed run is bit-exact."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data._utils import ExceptionWrapper

from datasets import BatchLoader, EpochBatches, build_datasets
from datasets.loader import _worker_message
from engine import phase_i, phase_iii_maps
from fsa.batch_composition import TailHeadComposer
from fsa.generators import GeneratorContext, ResampleGenerator
from models import build_model
from tests.helpers import run_main_in_process, run_script
from utils.errors import UserError

SCRIPT = "phase_i_train_or_test.py"
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))


def _image_folder(root: Path, train=(12, 6, 3), test=(2, 2, 2)) -> Path:
    """root/train/c<k>/*.png and root/test/c<k>/*.png: 16x16 noisy images of one colour per class."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", train), ("test", test)):
        for cls, n in enumerate(counts):
            folder = root / split / f"c{cls}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                pixels = np.clip(np.array(COLOURS[cls]) + rng.integers(-60, 60, (16, 16, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{k}.png")
    return root


def _phase_i(cwd: Path, note: str, *opts: str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """Phase I of the smoke config (a tiny resnet8) on the dataset given by `opts`, in this process."""
    return run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", "--note", note, *extra, "--opts",
                               "model.arch=resnet8", "train.batch_size=8", *opts, cwd=cwd)


def _folder_opts(root: Path) -> list[str]:
    return ["dataset.name=image-folder", f"dataset.root={root}", "dataset.image_size=16"]


def _assert_clean_error(code: int, stderr: str, *fragments: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------------------------------------
# errors raised in DataLoader workers
# ---------------------------------------------------------------------------------------------


def _raised_in_a_worker(message: str) -> UserError:
    """The UserError torch raises in the main process for `message` raised in a DataLoader worker
    (chained to an OSError, as a corrupt image's is), made by torch's own ExceptionWrapper."""
    try:
        try:
            raise OSError("decoder says no")
        except OSError as exc:
            raise UserError(message) from exc
    except UserError:
        wrapper = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except UserError as reraised:
        return reraised


@pytest.mark.parametrize("message", ["one line", "first line\nsecond line: the fix"])
def test_the_message_of_a_worker_user_error_is_recovered(message):
    reraised = _raised_in_a_worker(message)
    assert str(reraised).startswith("Caught UserError in DataLoader worker process 0")
    assert _worker_message(reraised) == message
    assert _worker_message(UserError(message)) is None  # raised in this process: kept as it is


def test_corrupt_image_gives_the_same_message_with_or_without_workers(tmp_path):
    root = _image_folder(tmp_path / "data")
    broken = root / "train" / "c1" / "broken.png"
    broken.write_bytes(b"not a png at all")
    train = build_datasets({"name": "image-folder", "root": str(root), "image_size": 16}, None).train
    with pytest.raises(UserError) as err:
        list(BatchLoader(train, EpochBatches(len(train), 8, seed=0), "cpu", num_workers=0))
    assert str(broken) in str(err.value) and "Replace it" in str(err.value)

    # a worker raises it: through the script, in a process of its own (an in-process test would wait
    # 5 s per worker when the garbage collector shuts down torch's failed DataLoader iterator)
    proc = run_script(SCRIPT, "--config", "smoke", "--device", "cpu", "--opts", *_folder_opts(root),
                      "model.arch=resnet8", "train.epochs=1", "train.num_workers=1", cwd=tmp_path, check=False)
    message = _assert_clean_error(proc.returncode, proc.stderr)
    assert message == f"error: {err.value}" and "DataLoader worker" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# labels and classes of list files and image folders
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def list_root(tmp_path) -> Path:
    """Images of an image folder, listed in train.txt (labels 0..2) and test.txt."""
    root = _image_folder(tmp_path / "data", train=(2, 2, 2), test=(1, 1, 1))
    (root / "train.txt").write_text("".join(f"train/c{c}/{k}.png {c}\n" for c in range(3) for k in range(2)))
    (root / "test.txt").write_text("".join(f"test/c{c}/0.png {c}\n" for c in range(3)))
    return root


def _list_opts(root: Path) -> list[str]:
    return ["dataset.name=list", f"dataset.root={root}", "dataset.train_list=train.txt",
            "dataset.test_list=test.txt", "dataset.image_size=16", "train.epochs=1"]


def test_list_test_label_outside_the_training_labels(list_root, tmp_path):
    assert build_datasets({"name": "list", "root": str(list_root), "train_list": str(list_root / "train.txt"),
                           "test_list": str(list_root / "test.txt")}, None).num_classes == 3
    (list_root / "test.txt").write_text("test/c0/0.png 0\ntest/c1/0.png 99\n")
    code, err = _phase_i(tmp_path, "default", *_list_opts(list_root))
    _assert_clean_error(code, err, "test.txt, line 2", "label 99", "labels 0..2", str(list_root / "train.txt"))
    assert not (tmp_path / "checkpoints/phase_i/smoke/default/last.pt").exists()


def test_list_test_split_without_a_training_class(list_root, tmp_path):
    (list_root / "test.txt").write_text("test/c0/0.png 0\ntest/c2/0.png 2\n")
    code, err = _phase_i(tmp_path, "default", *_list_opts(list_root))
    _assert_clean_error(code, err, "test.txt", "no image of training class(es) 1")


def test_list_training_labels_with_a_gap(list_root, tmp_path):
    (list_root / "train.txt").write_text("train/c0/0.png 0\ntrain/c1/0.png 3\ntrain/c2/0.png 5\n")
    (list_root / "test.txt").write_text("test/c0/0.png 0\n")
    code, err = _phase_i(tmp_path, "default", *_list_opts(list_root))
    _assert_clean_error(code, err, "train.txt", "label(s) 1, 2, 4", "Renumber the labels of both lists to 0..2")


@pytest.mark.parametrize("empty_folder", [False, True])
def test_image_folder_test_split_without_a_training_class(tmp_path, empty_folder):
    root = _image_folder(tmp_path / "data", train=(2, 2, 2), test=(1, 1, 0))
    if not empty_folder:
        (root / "test" / "c2").rmdir()
    code, err = _phase_i(tmp_path, "default", *_folder_opts(root), "train.epochs=1")
    _assert_clean_error(code, err, "class(es) c2", str(root / "test" / "c2"), "remove the class folder(s)")


# ---------------------------------------------------------------------------------------------
# reproducible augmentation of file datasets
# ---------------------------------------------------------------------------------------------


def _epoch(loader: BatchLoader, sampler: EpochBatches, generator: torch.Generator, epoch: int) -> torch.Tensor:
    """Every training image of epoch `epoch` by dataset index, the generator reseeded for it as phase I does."""
    generator.manual_seed(1000 + epoch)
    sampler.set_epoch(epoch)
    images, indices = zip(*((x, idx) for x, _, idx in loader))
    return torch.cat(images)[torch.argsort(torch.cat(indices))]


def test_file_augmentation_depends_on_the_seeds_not_on_the_workers(tmp_path):
    train = build_datasets({"name": "image-folder", "root": str(_image_folder(tmp_path)), "image_size": 16}, None).train
    sampler, persistent_rng = EpochBatches(len(train), 8, seed=0), torch.Generator()
    persistent = BatchLoader(train, sampler, "cpu", num_workers=2, generator=persistent_rng)
    first, second = _epoch(persistent, sampler, persistent_rng, 0), _epoch(persistent, sampler, persistent_rng, 1)
    assert not torch.equal(first, second)  # the augmentation is real: each epoch crops differently

    # a fresh loader without workers (as a resumed run) draws epoch 1 exactly as the persistent workers did,
    # and leaves the main process's generator alone
    global_state = torch.get_rng_state()
    fresh_rng = torch.Generator()
    fresh = _epoch(BatchLoader(train, sampler, "cpu", num_workers=0, generator=fresh_rng), sampler, fresh_rng, 1)
    assert torch.equal(fresh, second)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_phase_i_on_image_files_resumes_to_identical_weights(tmp_path, monkeypatch):
    opts = (*_folder_opts(_image_folder(tmp_path / "data")), "train.epochs=2", "train.num_workers=1")
    code, err = _phase_i(tmp_path, "straight", *opts)
    assert code == 0, err

    epochs = []
    begin = phase_i.BackboneTraining.begin

    def interrupted_in_epoch_2(self, unit):
        epochs.append(unit)
        if len(epochs) == 2:
            raise KeyboardInterrupt  # as Ctrl-C would, once last.pt holds epoch 1
        return begin(self, unit)

    monkeypatch.setattr(phase_i.BackboneTraining, "begin", interrupted_in_epoch_2)
    code, err = _phase_i(tmp_path, "killed", *opts)
    assert code == 130, err
    assert epochs == [0, 1]
    monkeypatch.undo()
    last = tmp_path / "checkpoints/phase_i/smoke/killed/last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    code, err = _phase_i(tmp_path, "killed", *opts, extra=("--resume",))
    assert code == 0, err

    straight = torch.load(tmp_path / "checkpoints/phase_i/smoke/straight/last.pt", weights_only=True)["model"]
    resumed = torch.load(last, weights_only=True)["model"]
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_phase_iii_prefetch_loads_an_iterations_images_alike_from_any_start(tmp_path):
    """Phase III online on files: the augmented images of iteration i depend on (seed, i, rank) only, so
    a run resumed at i (a fresh prefetcher without workers) fetches what the straight run's workers did."""
    bundle = build_datasets({"name": "image-folder", "root": str(_image_folder(tmp_path)), "image_size": 16}, None)
    labels = bundle.train.targets
    composer = TailHeadComposer(labels, [2], [0, 1], nt=2, na=1, seed=0)
    context = GeneratorContext(labels=labels, confusing=torch.full((3, 1), -1), composer=composer, na=1, ts=0.8, tg=0.2)
    draws = phase_iii_maps.IterationDraws(composer, ResampleGenerator(context), seed=0)

    def fetched(start: int, workers: int) -> list[torch.Tensor]:
        maps = phase_iii_maps._OnlineMaps(build_model("resnet8", 3), bundle, torch.device("cpu"), with_grad=False)
        maps.prefetch(draws, start, 3, workers)
        return [maps._images(torch.tensor(draws.images(i)), None)[0] for i in range(start, 3)]

    assert torch.equal(fetched(0, 2)[2], fetched(2, 0)[0])
