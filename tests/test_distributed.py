"""torchrun / DDP on the CPU (gloo, 2 processes): every phase runs, rank 0 writes, evaluation counts
every test sample once, and phase II's sharded store is byte-identical to a single process's."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datasets.base import InMemoryDataset
from engine.loops import predict
from engine.methods import METHODS
from models import build_model
from tests.helpers import copy_phase_i, run_main_in_process, run_script, run_torchrun
from utils import distributed
from utils.distributed import interleaved_batches

SMOKE = ("--config", "smoke", "--device", "cpu")


# ---------------------------------------------------------------- sharding arithmetic (no processes)

@pytest.mark.parametrize("n,batch,world", [(0, 5, 2), (23, 5, 2), (23, 5, 3), (10, 5, 4), (64, 8, 2)])
def test_interleaved_batches_are_the_single_process_batches(n, batch, world):
    single, numbers = interleaved_batches(n, batch, 0, 1)
    assert numbers == list(range(len(single)))
    mine = {}
    for rank in range(world):
        batches, nums = interleaved_batches(n, batch, rank, world)
        assert all(b % world == rank for b in nums)
        mine.update(zip(nums, batches))
    assert [mine[b] for b in sorted(mine)] == single


# ---------------------------------------------------------------- collectives (spawned gloo group)

def _tiny_model_and_data() -> tuple[torch.nn.Module, InMemoryDataset]:
    """The same model and 23 images in every process (23 in batches of 5: 13 on rank 0, 10 on rank 1)."""
    torch.manual_seed(0)
    model = build_model("resnet8", 4, 1).eval()
    generator = torch.Generator().manual_seed(1)
    data = InMemoryDataset(torch.randint(0, 256, (23, 1, 12, 12), dtype=torch.uint8, generator=generator),
                           torch.arange(23) % 4, 4, (0.5,), (0.25,), augment=False)
    return model, data


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, data = _tiny_model_and_data()
        logits, targets, indices = predict(model, data, 5, torch.device("cpu"))
        rows = torch.full((rank + 1, 2), float(rank))  # uneven row counts per rank
        parts = distributed.gather_parts(rows)
        torch.save({"logits": logits, "targets": targets, "indices": indices,
                    "all_rows": distributed.all_gather_rows(rows),
                    "parts": parts, "sum": distributed.all_reduce_sum(torch.tensor([1.0, rank]))},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gloo_evaluation_counts_every_sample_once_and_matches_one_process(tmp_path):
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model, data = _tiny_model_and_data()
    logits, targets, _ = predict(model, data, 5, torch.device("cpu"))
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(out["indices"], torch.arange(23))  # both ranks' batches, none twice, none missing
        assert torch.equal(out["targets"], targets)
        torch.testing.assert_close(out["logits"], logits)
        assert out["all_rows"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert out["sum"].tolist() == [2.0, 1.0]
    parts = torch.load(tmp_path / "rank0.pt", weights_only=True)["parts"]
    assert [p.shape[0] for p in parts] == [1, 2] and parts[1].eq(1).all()
    assert torch.load(tmp_path / "rank1.pt", weights_only=True)["parts"] is None


# ---------------------------------------------------------------- the phase scripts under torchrun

@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """A 2-process phase I + phase II (interleaved batches of 32, one augmented view) run."""
    cwd = tmp_path_factory.mktemp("ddp")
    run_torchrun("phase_i_train_or_test.py", *SMOKE, "--opts", "train.epochs=3", cwd=cwd)
    run_torchrun("phase_ii_extract_feature.py", *SMOKE, "--opts", "gradcam.batch_size=32", "store.views=1", cwd=cwd)
    return cwd


def test_phase_i_under_torchrun_trains_and_its_checkpoint_loads(ddp_run):
    run_dir = ddp_run / "checkpoints/phase_i/smoke/default"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["finished"] and results["processes"] == 2 and len(results["history"]) == 3
    assert results["num_test_samples"] == 240  # the whole test set, each image once
    payload = torch.load(run_dir / "best_model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in payload["model"])  # the plain model, not the DDP wrapper
    model = build_model("resnet8", 8, 3)
    model.load_state_dict(payload["model"])  # strict
    # rank 0 alone writes: one log, one TensorBoard event file
    assert (run_dir / "log.txt").read_text().count("fresh run") == 1
    assert len(list((ddp_run / "run_summary/phase_i/smoke/default").glob("events.out.tfevents.*"))) == 1


def test_phase_i_test_mode_under_torchrun_equals_one_process(ddp_run):
    run_torchrun("phase_i_train_or_test.py", *SMOKE, "--opts", "phase=test", cwd=ddp_run)
    path = ddp_run / "checkpoints/phase_i/smoke/default/test_results.json"
    two = json.loads(path.read_text())
    path.unlink()
    code, err = run_main_in_process("phase_i_train_or_test.py", *SMOKE, "--opts", "phase=test", cwd=ddp_run)
    assert code == 0, err
    one = json.loads(path.read_text())
    assert two["num_test_samples"] == one["num_test_samples"] == 240
    assert two["confusion"] == one["confusion"] and two["top1"] == one["top1"]
    # the sharded evaluation during training is that of the saved model (rank 0's BatchNorm statistics)
    run_dir = ddp_run / "checkpoints/phase_i/smoke/default"
    code, err = run_main_in_process("phase_i_train_or_test.py", *SMOKE, "--checkpoint", str(run_dir / "last.pt"),
                                    "--opts", "phase=test", cwd=ddp_run)
    assert code == 0, err
    final = json.loads((run_dir / "results.json").read_text())
    assert json.loads(path.read_text())["confusion"] == final["confusion"]


def test_phase_ii_sharded_store_is_identical_to_single_process(ddp_run, tmp_path):
    single = copy_phase_i(ddp_run, tmp_path)
    run_script("phase_ii_extract_feature.py", *SMOKE, "--opts", "gradcam.batch_size=32", "store.views=1", cwd=single)
    two, one = ddp_run / "features/smoke/default", single / "features/smoke/default"
    assert json.loads((two / "results.json").read_text())["processes"] == 2
    # 275 images in batches of 32: 9 batches, rank 0 takes 5 and rank 1 takes 4 (one round with an empty rank)
    store_files = sorted(p.name for p in (one / "store").iterdir())
    assert {"fmaps.npy", "cams.npy", "pooled.npy", "labels.npy", "test_pooled.npy"} <= set(store_files)
    for name in store_files:
        assert (two / "store" / name).read_bytes() == (one / "store" / name).read_bytes(), name
    for name in ("score_matrix.pt", "confusion.json", "split.json", "split_statistics.json"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


def test_the_pipeline_under_torchrun_runs_every_phase_on_two_processes(tmp_path):
    # short phases: what is checked is that every step runs on two processes, not what they learn
    proc = run_torchrun("pipeline.py", *SMOKE, "--opts", "train.epochs=2", "finetune.iterations=20",
                        "tailcalib.epochs=2", cwd=tmp_path)
    assert proc.stdout.count("[pipeline] done in") == 1  # rank 0 talks, the other rank is silent
    runs = sorted((tmp_path / "checkpoints").glob("*/smoke/default/results.json"))
    # phase I and every phase III method of the default suite (FSA, its controls, post-hoc, TailCalib(X))
    assert [p.parent.parent.parent.name for p in runs] == sorted(m.folder for m in METHODS if "fsa" in m.suites)
    for path in runs:
        results = json.loads(path.read_text())
        assert results["finished"] and results["processes"] == 2 and results["num_test_samples"] == 240, path
    start = torch.load(tmp_path / "checkpoints/phase_i/smoke/default/best_model.pt", weights_only=True)["model"]
    for mode in ("online", "offline"):
        tuned = torch.load(tmp_path / f"checkpoints/phase_iii_{mode}/smoke/default/last.pt", weights_only=True)["model"]
        assert {k for k in tuned if not torch.equal(tuned[k], start[k])} == {"fc.weight", "fc.bias"}  # DDP-trained head
    assert json.loads((tmp_path / "features/smoke/default/results.json").read_text())["processes"] == 2
    assert list((tmp_path / "visualizations").rglob("*.png"))
    assert (tmp_path / "reports/smoke/default/ablation.md").is_file()


def test_tailcalibx_under_torchrun_equals_one_process(ddp_run, tmp_path):
    """The ranks share the forward passes of the augmented images; the result may not depend on how."""
    opts = ("--opts", "finetune.generator=tailcalibx", "tailcalib.epochs=2")
    run_torchrun("phase_iii_online_train_or_test.py", *SMOKE, *opts, cwd=ddp_run)
    single = copy_phase_i(ddp_run, tmp_path)
    shutil.copytree(ddp_run / "features", single / "features")
    code, err = run_main_in_process("phase_iii_online_train_or_test.py", *SMOKE, *opts, cwd=single)
    assert code == 0, err
    folder = "checkpoints/phase_iii_online-tailcalibx/smoke/default"
    two = json.loads((ddp_run / folder / "results.json").read_text())
    one = json.loads((single / folder / "results.json").read_text())
    assert [(h["loss"], h["top1"]) for h in two["history"]] == [(h["loss"], h["top1"]) for h in one["history"]]
    a = torch.load(ddp_run / folder / "last.pt", weights_only=True)["fc"]
    b = torch.load(single / folder / "last.pt", weights_only=True)["fc"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_user_error_under_torchrun_is_reported_once_with_exit_code_2(tmp_path):
    proc = run_torchrun("phase_ii_extract_feature.py", *SMOKE, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("Run phase I first") == 1, proc.stderr[-2000:]
