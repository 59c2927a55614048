"""visualize.py after the smoke phase I + II: PNG grids of 4 panels and TensorBoard images."""
from __future__ import annotations

import json
import shutil

import cv2
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import copy_phase_i, run_main_in_process, run_script
from tests.test_phase_ii import smoke_phase_ii
from fsa.visualization import colour_bar_width

OUT = "visualizations/smoke/default"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, smoke_phase_i):
    return smoke_phase_ii(tmp_path_factory, smoke_phase_i)


def _images(run_dir, phase="phase_i"):
    return sorted((run_dir / OUT / phase).glob("*.png"))


def test_default_classes_write_four_panel_pngs_and_tensorboard_images(run_dir):
    run_script("visualize.py", "--config", "smoke", "--device", "cpu", "--samples", "3", cwd=run_dir)
    conf = json.loads((run_dir / "features/smoke/default/confusion.json").read_text())
    expected = {int(t) for t in conf["confusing"]} | {c for v in conf["confusing"].values() for c in v}
    pngs = _images(run_dir)
    assert len(pngs) == len(expected) > 0
    assert {int(p.name.split("_class")[1][:3]) for p in pngs} == expected
    for png in pngs:
        img = cv2.imread(str(png))
        assert img is not None and img.dtype == "uint8" and img.shape[2] == 3
        panel = 128
        assert img.shape[1] == 4 * panel + colour_bar_width(panel) and img.shape[0] % panel == 0 and 1 <= img.shape[0] // panel <= 3
        assert img[:, :panel].std() > 5 and img[:, panel:2 * panel].std() > 5  # real content, not blank
    events = EventAccumulator(str(run_dir / "run_summary/visualize/smoke/default"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert len(tags) == len(pngs) and all(t.startswith("phase_i/") for t in tags)
    event = events.Images(tags[0])[0]
    assert event.width == 4 * 128 + colour_bar_width(128)
    record = json.loads((run_dir / OUT / "phase_i/results.json").read_text())  # written after the last PNG
    assert record["finished"] is True and sorted(record["pngs"]) == [p.name for p in pngs]
    assert set(record["classes"]) == expected


def test_chosen_classes_other_layer_and_panel_size(run_dir):
    code, err = run_main_in_process("visualize.py", "--config", "smoke", "--device", "cpu", "--classes", "0", "3",
                                    "--samples", "2", "--layer", "layer2", "--panel", "64", cwd=run_dir)
    assert code == 0, err
    pngs = [p for p in _images(run_dir) if p.name.endswith("_layer2.png")]
    assert sorted(int(p.name.split("_class")[1][:3]) for p in pngs) == [0, 3]
    for png in pngs:
        assert cv2.imread(str(png)).shape == (2 * 64, 4 * 64 + colour_bar_width(64), 3)


def test_bad_visualize_input_fails_cleanly(run_dir, tmp_path):
    code, err = run_main_in_process("visualize.py", "--config", "smoke", "--device", "cpu", "--classes", "99", cwd=run_dir)
    assert code == 2 and "--classes" in err and "Traceback" not in err
    code, err = run_main_in_process("visualize.py", "--config", "smoke", "--device", "cpu", "--layer", "nope", cwd=run_dir)
    assert code == 2 and "nope" in err and "layer1" in err
    code, err = run_main_in_process("visualize.py", "--config", "smoke", "--device", "cpu", "--phase", "phase_iii_online",
                                    cwd=run_dir)
    assert code == 2 and "phase_iii_online" in err and "Traceback" not in err
    assert "Run folders of config 'smoke', note 'default': phase_i." in err
    code, err = run_main_in_process("visualize.py", "--config", "smoke", "--device", "cpu", cwd=tmp_path)
    assert code == 2 and "python phase_i_train_or_test.py --config smoke" in err


def test_phase_names_an_existing_run_folder(run_dir, tmp_path):
    """--phase takes any phase III run folder (tests/test_pipeline.py explains a real one); the rest is refused."""
    copy_phase_i(run_dir, tmp_path)
    for phase in ("phase_iii_offline-none", "phase_iii_online-tailcalibx"):
        (tmp_path / "checkpoints" / phase / "smoke/default").mkdir(parents=True)  # runs without a best_model.pt yet

    def visualize(phase: str) -> str:
        code, err = run_main_in_process("visualize.py", "--config", "smoke", "--device", "cpu", "--phase", phase,
                                        "--classes", "0", cwd=tmp_path)
        assert code == 2 and "Traceback" not in err
        return err

    err = visualize("phase_iii_online")
    assert "no run folder checkpoints/phase_iii_online/smoke/default/" in err
    assert "phase_i, phase_iii_offline-none, phase_iii_online-tailcalibx." in err
    err = visualize("phase_iii_online-tailcalibx")
    assert "not backbone weights" in err and "--phase phase_i" in err
    err = visualize("phase_iii_offline-none")
    assert "does not exist" in err
    assert "python phase_iii_offline_train_or_test.py --config smoke --opts finetune.generator=none" in err
    assert not (tmp_path / "visualizations").exists()


def test_phase_ii_outputs_of_another_phase_i_checkpoint_are_refused(run_dir, tmp_path):
    for sub in ("checkpoints/phase_i", "features"):
        shutil.copytree(run_dir / sub, tmp_path / sub)
    best = tmp_path / "checkpoints/phase_i/smoke/default/best_model.pt"
    payload = torch.load(best, weights_only=True)
    payload["model"]["fc.bias"] += 1  # phase I "retrained" after phase II
    torch.save(payload, best)
    code, err = run_main_in_process("visualize.py", "--config", "smoke", "--device", "cpu", "--samples", "1", cwd=tmp_path)
    assert code == 2 and "Traceback" not in err
    assert "different phase I checkpoint" in err and "--overwrite" in err and "--classes" in err
    assert not (tmp_path / OUT).exists()
    # explicit classes need no phase II output
    code, err = run_main_in_process("visualize.py", "--config", "smoke", "--device", "cpu", "--samples", "1",
                                    "--classes", "0", cwd=tmp_path)
    assert code == 0, err
