"""The validation split and model selection: stratified, seeded, disjoint from the reported images,
and the reported test images never choose anything (an oracle that poisons them)."""
import json
from pathlib import Path

import pytest
import torch

from datasets import build_datasets
from datasets.validation import stratified_split
from tests.helpers import run_main_in_process
from utils.errors import UserError

PHASE_I = "phase_i_train_or_test.py"
SMOKE = ["--config", "smoke", "--device", "cpu"]
QUICK = ["train.epochs=5", "train.eval_every=1"]
SMOKE_DATA = {"name": "synthetic-LT", "imbalance": 20,
              "synthetic": {"num_classes": 8, "image_size": 32, "train_per_class": 100, "test_per_class": 30, "seed": 0}}


def test_stratified_split_by_hand():
    targets = torch.tensor([0] * 50 + [1] * 5 + [2] * 1 + [3] * 20)
    targets = targets[torch.randperm(len(targets), generator=torch.Generator().manual_seed(1))]
    kept, val = stratified_split(targets, 4, 0.1, seed=0, keep_one=True)
    # round(0.1 * n): 5, 0.5 -> 1, 0.1 -> 0, 2; each class keeps at least one training image
    assert torch.bincount(targets[val], minlength=4).tolist() == [5, 1, 0, 2]
    assert torch.bincount(targets[kept], minlength=4).tolist() == [45, 4, 1, 18]
    assert sorted(kept.tolist() + val.tolist()) == list(range(len(targets)))
    again, other = stratified_split(targets, 4, 0.1, seed=0, keep_one=True), stratified_split(targets, 4, 0.1, 1, True)
    assert torch.equal(again[1], val) and not torch.equal(other[1], val)  # seeded
    _, all_but_one = stratified_split(torch.tensor([0, 0]), 1, 0.9, seed=0, keep_one=True)
    assert len(all_but_one) == 1


@pytest.mark.parametrize("source", ["train", "test"])
def test_bundle_split_is_disjoint_stratified_and_written(tmp_path, source):
    plain = build_datasets(SMOKE_DATA, None)
    bundle = build_datasets({**SMOKE_DATA, "val": {"source": source, "fraction": 0.2, "seed": 3}}, tmp_path)
    saved = json.loads((tmp_path / "val_split.json").read_text())
    assert saved["source"] == source and saved["num_val"] == len(bundle.val)
    pool = plain.train if source == "train" else plain.test
    positions = torch.tensor(saved["val_positions"])
    assert torch.equal(bundle.val.targets, pool.targets[positions])
    held_out = set(positions.tolist())
    remaining = torch.tensor([i for i in range(len(pool)) if i not in held_out])
    reduced = bundle.train if source == "train" else bundle.test
    assert torch.equal(reduced.targets, pool.targets[remaining])  # the rest, nothing reported twice
    per_class = torch.bincount(bundle.val.targets, minlength=8)
    expected = torch.floor(torch.bincount(pool.targets, minlength=8) * 0.2 + 0.5)
    if source == "train":
        expected = torch.minimum(expected, torch.bincount(pool.targets, minlength=8) - 1)
    assert per_class.tolist() == expected.long().tolist()
    assert bundle.split_sizes() == {"num_val_images": len(bundle.val), "num_test_images": len(bundle.test)}
    if source == "train":  # the image counts the groups and the model see are the training part's
        assert bundle.train_counts == torch.bincount(bundle.train.targets, minlength=8).tolist()
    # a later phase rebuilding the data from the run folder gets the same split, or an error
    assert torch.equal(build_datasets({**SMOKE_DATA, "val": {"source": source, "fraction": 0.2, "seed": 3}},
                                      tmp_path).val.targets, bundle.val.targets)
    with pytest.raises(UserError, match="another validation split"):
        build_datasets({**SMOKE_DATA, "val": {"source": source, "fraction": 0.2, "seed": 4}}, tmp_path)


def _results(cwd: Path, note: str) -> dict:
    return json.loads((cwd / f"checkpoints/phase_i/smoke/{note}/results.json").read_text())


def _best_weights(cwd: Path, note: str) -> dict:
    return torch.load(cwd / f"checkpoints/phase_i/smoke/{note}/best_model.pt", weights_only=True)["model"]


def test_selection_never_reads_the_reported_test_images(tmp_path, monkeypatch):
    """Oracle: scramble the reported test labels; the selected epoch and best_model.pt must not move."""
    opts = ["--opts", *QUICK, "dataset.val.source=train", "dataset.val.fraction=0.2"]
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--note", "clean", *opts, cwd=tmp_path)
    assert code == 0, err

    import engine.phase_i as phase_i

    real = phase_i.build_datasets

    def poisoned(cfg, run_dir=None):
        bundle = real(cfg, run_dir)
        generator = torch.Generator().manual_seed(0)
        bundle.test.targets = bundle.test.targets[torch.randperm(len(bundle.test), generator=generator)]
        return bundle

    monkeypatch.setattr(phase_i, "build_datasets", poisoned)
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--note", "poisoned", *opts, cwd=tmp_path)
    assert code == 0, err
    clean, poison = _results(tmp_path, "clean"), _results(tmp_path, "poisoned")
    assert clean["checkpoint_selection"]["by"] == "val"
    assert clean["checkpoint_selection"] == poison["checkpoint_selection"]
    assert [h["val_mean_class_acc"] for h in clean["history"]] == [h["val_mean_class_acc"] for h in poison["history"]]
    assert [h["top1"] for h in clean["history"]] != [h["top1"] for h in poison["history"]]  # the poison bit
    a, b = _best_weights(tmp_path, "clean"), _best_weights(tmp_path, "poisoned")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the reported numbers are the test numbers of the selected epoch
    epoch = clean["checkpoint_selection"]["epoch"]
    assert clean["top1"] == next(h["top1"] for h in clean["history"] if h["epoch"] == epoch)
    assert clean["num_val_images"] > 0 and clean["num_test_images"] == 8 * 30


def test_without_a_validation_split_the_final_model_is_used(tmp_path):
    code, err = run_main_in_process(PHASE_I, *SMOKE, "--opts", *QUICK, cwd=tmp_path)
    assert code == 0, err
    results = _results(tmp_path, "default")
    assert results["checkpoint_selection"] == {"by": "final", "epoch": 5}
    assert results["num_val_images"] == 0 and "best_top1" not in results
    assert results["top1"] == results["history"][-1]["top1"]
    best, last = _best_weights(tmp_path, "default"), torch.load(
        tmp_path / "checkpoints/phase_i/smoke/default/last.pt", weights_only=True)["model"]
    assert all(torch.equal(best[k], last[k]) for k in best)


def test_later_phases_select_on_the_same_split_and_record_their_start(tmp_path):
    """Phase I with a validation split taken from the test set; phases II and III inherit it."""
    data = ["dataset.val.source=test", "dataset.val.fraction=0.25"]
    assert run_main_in_process(PHASE_I, *SMOKE, "--opts", *QUICK, *data, cwd=tmp_path)[0] == 0
    assert run_main_in_process("phase_ii_extract_feature.py", *SMOKE, cwd=tmp_path)[0] == 0
    runs = {"phase_iii_offline": ["finetune.iterations=4", "finetune.eval_every=2"],
            "phase_iii_offline-tailcalib": ["finetune.generator=tailcalib", "tailcalib.epochs=2"]}
    for folder, opts in runs.items():
        code, err = run_main_in_process("phase_iii_offline_train_or_test.py", *SMOKE, "--opts", *opts, cwd=tmp_path)
        assert code == 0, err
    phase_i = json.loads((tmp_path / "checkpoints/phase_i/smoke/default/results.json").read_text())
    phase_ii = json.loads((tmp_path / "features/smoke/default/results.json").read_text())
    assert phase_i["num_val_images"] == 8 * 8  # round(0.25 * 30) = 8 of each class's 30 test images
    assert phase_i["num_test_images"] == 8 * 22
    assert phase_ii["phase_i_checkpoint_selection"] == phase_i["checkpoint_selection"]
    for folder in runs:
        results = json.loads((tmp_path / f"checkpoints/{folder}/smoke/default/results.json").read_text())
        assert results["checkpoint_selection"]["by"] == "val", folder
        assert results["phase_i_checkpoint_selection"] == phase_i["checkpoint_selection"]
        assert (results["num_val_images"], results["num_test_images"]) == \
               (phase_i["num_val_images"], phase_i["num_test_images"])
        assert results["num_test_samples"] == phase_i["num_test_images"]  # only the reported part is scored
