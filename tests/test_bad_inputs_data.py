"""Bad data and bad phase outputs end in one `error:` paragraph (exit 2, no traceback) that names the
file or setting and the fix, before anything that existed is changed: damaged phase II outputs,
images too large or too small, single-class datasets, visualize.py's size flags, files given as
--checkpoint that are not checkpoints of the right kind, and phase III batches too large for memory."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from engine import batch_memory
from engine.batch_memory import batch_bytes, forward_footprint
from models import build_model
from tests.helpers import run_main_in_process
from tests.test_file_datasets_safety import _assert_clean_error, _folder_opts, _image_folder, _phase_i
from tests.test_phase_ii import smoke_phase_ii

FEATURES = Path("features/smoke/default")
PHASE_I_BEST = Path("checkpoints/phase_i/smoke/default/best_model.pt")
RERUN = "python phase_ii_extract_feature.py --config smoke --overwrite"


@pytest.fixture(scope="module")
def smoke_ii(tmp_path_factory, smoke_phase_i) -> Path:
    """The shared smoke phase I + II working directory: read only, tests copy it (:func:`_copy`)."""
    return smoke_phase_ii(tmp_path_factory, smoke_phase_i)


def _copy(src: Path, dst: Path) -> Path:
    for sub in ("checkpoints/phase_i", "features"):
        shutil.copytree(src / sub, dst / sub)
    return dst


def _snapshot(cwd: Path) -> dict[str, str]:
    """Every file under `cwd` with the sha256 of its content."""
    return {str(p.relative_to(cwd)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cwd.rglob("*"))
            if p.is_file()}


def _run(script: str, *args: str, cwd: Path) -> tuple[int, str]:
    return run_main_in_process(script, "--config", "smoke", "--device", "cpu", *args, cwd=cwd)


def _assert_refused(cwd: Path, before: dict[str, str], code: int, err: str, *fragments: str) -> str:
    """A clean error naming `fragments`, and every file of `cwd` as it was (none added, none changed)."""
    message = _assert_clean_error(code, err, *fragments)
    assert _snapshot(cwd) == before
    return message


# ---------------------------------------------------------------------------------------------
# 1. damaged phase II outputs
# ---------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _edit(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = json.loads(path.read_text())
        path.write_text(json.dumps(change(data)))
    return damage


def _first_donors_out_of_range(data: dict) -> dict:
    data["confusing"][next(iter(data["confusing"]))][0] = 999
    return data


SCRIPTS = {"online": ("phase_iii_online_train_or_test.py",), "offline": ("phase_iii_offline_train_or_test.py",),
           "visualize": ("visualize.py", "--samples", "1")}


@pytest.mark.parametrize("name, damage, reader, fragment", [
    ("split.json", _truncate, "online", "not valid JSON"),
    ("split.json", _edit(lambda d: {**d, "head": "0,1,2"}), "offline", "'head' must be a list of class indices in [0, 8)"),
    ("split.json", _edit(lambda d: [d]), "online", "holds a JSON list"),
    ("split_statistics.json", _edit(lambda d: {k: v for k, v in d.items() if k != "ts"}), "offline", "'ts' must be"),
    ("confusion.json", _truncate, "visualize", "not valid JSON"),
    ("confusion.json", _edit(_first_donors_out_of_range), "online", "'confusing' must be"),
    ("confusion.json", _edit(lambda d: {**d, "nf": 5}), "visualize", "'confusing' must be"),
    ("provenance.json", _edit(lambda d: {**d, "phase_i_checkpoint": "x"}), "offline", "'phase_i_checkpoint' must be"),
    ("store/meta.json", _truncate, "offline", "not valid JSON"),
    ("store/meta.json", _edit(lambda d: {**d, "arrays": {}}), "offline", "'arrays' do not match"),
    ("store/meta.json", _edit(lambda d: {**d, "fmap_shape": [64, 8]}), "offline", "does not describe a complete"),
])
def test_damaged_phase_ii_output_names_the_file_and_the_rerun(smoke_ii, tmp_path, name, damage, reader, fragment):
    cwd = _copy(smoke_ii, tmp_path)
    damage(cwd / FEATURES / name)
    before = _snapshot(cwd)
    code, err = _run(*SCRIPTS[reader], cwd=cwd)
    _assert_refused(cwd, before, code, err, str(FEATURES / name), fragment, RERUN)


# ---------------------------------------------------------------------------------------------
# 2. images too large to decode, or too small to infer the image size from
# ---------------------------------------------------------------------------------------------


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height (1-bit grey); its pixel data is not there."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("name, size, said", [
    # the first training image (its size is read when the dataset is built), over PIL's own limit
    ("0.png", (14000, 14000), "is over 89,478,485 pixels"),
    # a later one, over our limit but under PIL's: refused when it is loaded, before it is decoded
    ("9_later.png", (9000, 8000), "is 9000x8000 pixels"),
])
def test_an_image_too_large_to_decode_is_refused_from_its_header(tmp_path, name, size, said):
    root = _image_folder(tmp_path / "data")
    big = root / "train" / "c0" / name
    _png_header(big, *size)
    before = _snapshot(tmp_path)
    code, err = _phase_i(tmp_path, "default", *_folder_opts(root), "train.epochs=1")
    _assert_refused(tmp_path, before, code, err, f"image {big} {said}, too large to decode safely", "downscale it")


def test_a_tiny_first_image_does_not_set_the_image_size(tmp_path):
    root = _image_folder(tmp_path / "data")
    tiny = root / "train" / "c0" / "0.png"
    Image.new("RGB", (1, 1)).save(tiny)
    opts = [o for o in _folder_opts(root) if not o.startswith("dataset.image_size")]
    before = _snapshot(tmp_path)
    code, err = _phase_i(tmp_path, "default", *opts, "train.epochs=1")
    _assert_refused(tmp_path, before, code, err, str(tiny), "1x1", "Set dataset.image_size")
    # with the size given, the image is read at it like every other
    code, err = _phase_i(tmp_path, "default", *opts, "dataset.image_size=16", "train.epochs=1")
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# 3. a dataset of one class
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["image-folder", "list"])
def test_a_single_class_dataset_is_refused(tmp_path, kind):
    root = _image_folder(tmp_path / "data", train=(4,), test=(2,))
    if kind == "image-folder":
        opts, named = _folder_opts(root), str(root / "train")
    else:
        (root / "train.txt").write_text("".join(f"train/c0/{k}.png 0\n" for k in range(4)))
        (root / "test.txt").write_text("test/c0/0.png 0\n")
        opts = ["dataset.name=list", f"dataset.root={root}", "dataset.train_list=train.txt",
                "dataset.test_list=test.txt", "dataset.image_size=16"]
        named = str(root / "train.txt")
    before = _snapshot(tmp_path)
    code, err = _phase_i(tmp_path, "default", *opts)
    _assert_refused(tmp_path, before, code, err, named, "has 1 class", "at least 2")


# ---------------------------------------------------------------------------------------------
# 4. visualize.py's size flags
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (("--panel", "50000"), "--panel must lie in 32..1024, got 50000"),
    (("--panel", "8"), "--panel must lie in 32..1024, got 8"),
    (("--samples", "100000"), "--samples must lie in 1..32, got 100000"),
    (("--samples", "0"), "--samples must lie in 1..32, got 0"),
    (("--classes", *map(str, range(65))), "--classes takes at most 64 classes per run, got 65"),
])
def test_visualize_size_flags_are_bounded_before_any_work(tmp_path, args, fragment):
    # an empty folder: a check made after any work would complain about the missing phase I run instead
    code, err = _run("visualize.py", *args, cwd=tmp_path)
    _assert_refused(tmp_path, {}, code, err, fragment)


def test_visualize_help_states_the_ranges(tmp_path, capsys):
    code, _ = _run("visualize.py", "--help", cwd=tmp_path)
    text = " ".join(capsys.readouterr().out.split())
    assert code == 0 and "32..1024" in text and "1..32" in text and "at most 64" in text


# ---------------------------------------------------------------------------------------------
# 5. --checkpoint files that are not checkpoints of the right kind
# ---------------------------------------------------------------------------------------------


def _write_checkpoint(cwd: Path, kind: str) -> Path:
    """A file of `kind` next to the runs (phase I's payload, changed)."""
    path = cwd / f"{kind}.pt"
    payload = torch.load(cwd / PHASE_I_BEST, weights_only=True)
    if kind == "directory":
        path.mkdir()
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "tailcalib":  # what engine.phase_iii_features writes: a classifier on pooled features
        weight = payload["model"]["fc.weight"]
        torch.save({**{k: v for k, v in payload.items() if k != "model"}, "kind": "feature-classifier",
                    "fc": {"weight": weight, "bias": torch.zeros(weight.shape[0])},
                    "feature_transform": {"tukey": 1.0, "eps": 1e-6, "normalize": True}}, path)
    elif kind == "no-model":
        torch.save({k: v for k, v in payload.items() if k != "model"}, path)
    elif kind == "no-arch":
        torch.save({k: v for k, v in payload.items() if k != "arch"}, path)
    elif kind == "model-tensor":
        torch.save({**payload, "model": torch.zeros(3)}, path)
    return path


CHECKPOINT_SCRIPTS = {
    "phase I test": ("phase_i_train_or_test.py", "--opts", "phase=test"),
    "visualize": ("visualize.py", "--classes", "0", "--samples", "1"),
    "tailcalib test": ("phase_iii_offline_train_or_test.py", "--opts", "phase=test", "finetune.generator=tailcalib"),
}


@pytest.mark.parametrize("reader, kind, fragment", [
    ("phase I test", "tailcalib", "is not a backbone + classifier checkpoint"),
    ("phase I test", "tensor", "is not an FSA-LT checkpoint"),
    ("phase I test", "no-arch", "'arch' is missing or malformed"),
    ("phase I test", "directory", ""),
    ("visualize", "model-tensor", "'model' is missing or malformed"),
    ("visualize", "no-model", "is not a backbone + classifier checkpoint"),
    ("tailcalib test", "no-arch", "is not a TailCalib feature-classifier checkpoint"),
    ("tailcalib test", "tensor", "is not an FSA-LT checkpoint"),
])
def test_a_checkpoint_of_the_wrong_kind_is_named(smoke_ii, tmp_path, reader, kind, fragment):
    cwd = _copy(smoke_ii, tmp_path)
    path = _write_checkpoint(cwd, kind)
    if reader == "tailcalib test":  # a phase I checkpoint is not one either
        code, err = _run(*CHECKPOINT_SCRIPTS[reader], "--checkpoint", str(cwd / PHASE_I_BEST), cwd=cwd)
        _assert_clean_error(code, err, str(cwd / PHASE_I_BEST), "is not a TailCalib", "backbone + classifier")
    before = _snapshot(cwd)
    code, err = _run(*CHECKPOINT_SCRIPTS[reader], "--checkpoint", str(path), cwd=cwd)
    _assert_refused(cwd, before, code, err, str(path), fragment)


# ---------------------------------------------------------------------------------------------
# 6. phase III batches too large for the memory available
# ---------------------------------------------------------------------------------------------


def test_batch_bytes_by_hand():
    # per row: 4 float32 maps of 2*3*4 and 2 float32 CAMs of 3*4 = 4 * (96 + 24) = 480 bytes
    assert batch_bytes(10, (2, 3, 4)) == 4800
    # online: + 2 float32 images of 1*2*2 (32) + 100 forward bytes + 3 queued images (48) = 660 bytes
    assert batch_bytes(10, (2, 3, 4), image_shape=(1, 2, 2), forward_bytes=100, queued_batches=3) == 6600


def test_forward_footprint_by_hand():
    model = build_model("resnet8", 8, 3).eval()
    fmap_shape, frozen = forward_footprint(model, (3, 32, 32), torch.device("cpu"), with_grad=False)
    assert fmap_shape == (64, 8, 8)
    assert frozen == 4 * (16 * 32 * 32 * 4)  # 4x the largest output: the stem's 16 x 32 x 32 float32 maps
    _, unfrozen = forward_footprint(model, (3, 32, 32), torch.device("cpu"), with_grad=True)
    assert unfrozen > frozen


@pytest.mark.parametrize("mode, available, needed, what", [
    # offline, smoke: 32 rows of 64x8x8 maps, 66048 bytes a row (batch_bytes) = 2.0 MiB; 15 rows fit in 1 MiB
    ("offline", "1.0 MiB", "2.0 MiB", "feature maps)"),
    # online adds each row's image and resnet8's forward pass: 11 rows fit in 4 MiB
    ("online", "4.0 MiB", "10.8 MiB", "feature maps and their images)"),
])
def test_a_batch_larger_than_the_memory_available_is_refused(smoke_ii, tmp_path, monkeypatch, mode, available, needed,
                                                             what):
    cwd = _copy(smoke_ii, tmp_path)
    monkeypatch.setattr(batch_memory, "available_memory", lambda device: int(float(available.split()[0]) * 2**20))
    before = _snapshot(cwd)
    code, err = _run(f"phase_iii_{mode}_train_or_test.py", cwd=cwd)
    _assert_refused(cwd, before, code, err, "finetune.nt=4, finetune.na=3", f"(32 rows of 64x8x8 {what}",
                    f"need about {needed}", f"{available} available", "at most 1 fits with finetune.na=3")
