"""engine/cost.py: each step's work in images against hand counts, the probe, and the pipeline's lines."""
import re

import pytest

from benchmarks.bench_main_job import step_seconds
from app import pipeline
from engine import cost
from engine.methods import METHODS
from utils.config import load_config


def phase_iii_cfg(*opts):
    return load_config("smoke", "phase_iii", list(opts))


def test_phase_i_counts_epochs_evaluations_and_teachers():
    sizes = cost.Sizes(train=100, val=10, test=50)
    cfg = load_config("smoke", "phase_i", ["train.epochs=20", "train.eval_every=3"])
    work = cost.phase_i_work(cfg, sizes)
    # evaluations after epochs 3, 6, ..., 18 and at the end (20): 7, each of val + test
    assert (work.trained, work.forwarded) == (20 * 100, 7 * 60)
    cfg = load_config("smoke", "phase_i", ["train.epochs=4", "distill.enabled=true", "distill.teachers=2",
                                           "model.classifier=cosine"])
    work = cost.phase_i_work(cfg, sizes)
    assert (work.trained, work.forwarded) == (400, 4 * 60 + 2 * 4 * 100)  # every teacher sees every batch


def test_phase_ii_counts_every_stored_view_and_the_test_set():
    sizes = cost.Sizes(train=100, val=10, test=50)
    cfg = load_config("smoke", "phase_ii", ["store.views=2"])
    assert cost.phase_ii_work(cfg, sizes) == cost.Work(0, 3 * 100 + 50, cost.phase_ii_work(cfg, sizes).what)
    cfg = load_config("smoke", "phase_ii", ["store.enabled=false", "gradcam.method=autograd"])
    work = cost.phase_ii_work(cfg, sizes)
    assert (work.trained, work.forwarded) == (100, 100)


def test_phase_iii_online_maps_pass_every_batch_through_the_backbone():
    sizes = cost.Sizes(train=1000, val=10, test=50)
    online, offline = METHODS.get("fsa_online"), METHODS.get("fsa_offline")
    cfg = phase_iii_cfg("finetune.iterations=60", "finetune.nt=4", "finetune.na=3")
    assert (online.work(cfg, sizes).forwarded, online.work(cfg, sizes).trained) \
        == (60 * 2 * 4 * 4 + 60, 0)
    assert offline.work(cfg, sizes).forwarded == 60  # cached features: val + test once
    # the unfrozen last stage trains, and each evaluation (every 25 iterations and at the end) runs the backbone
    work = online.work(phase_iii_cfg("finetune.iterations=60", "finetune.nt=4", "finetune.na=3",
                                                     "finetune.unfreeze=true", "finetune.eval_every=25"), sizes)
    assert (work.trained, work.forwarded) == (60 * 32, 3 * 60)
    # iterations: null is the paper's rows per training image
    auto = online.work(phase_iii_cfg("finetune.iterations=null", "finetune.nt=4", "finetune.na=3"), sizes)
    assert auto.forwarded == round(6400 * 128 / 12406 * 1000 / 32) * 32 + 60


def test_phase_iii_feature_and_decoupled_methods():
    sizes = cost.Sizes(train=1000, val=10, test=50)
    cfg = phase_iii_cfg("tailcalib.epochs=5")
    assert METHODS.get("tailcalibx").work(cfg, sizes).forwarded == 5 * 1000 + 60
    assert METHODS.get("tailcalib").work(cfg, sizes).forwarded == 10
    assert METHODS.get("la_posthoc").work(cfg, sizes).forwarded == 10
    # cRT at the release's settings: 10 epochs of 1000 // 512 = 1 batch of 512 fresh augmented rows, then val
    assert METHODS.get("crt").work(cfg, sizes).forwarded == 10 * 512 + 10
    assert METHODS.get("lws").work(cfg, sizes).forwarded == 5 * 512 + 10
    stored = phase_iii_cfg("decoupled.features=stored")
    assert METHODS.get("crt").work(stored, sizes).forwarded == 10


def test_seconds_and_their_text():
    rates = cost.Rates(trained=2e-3, forwarded=5e-4)
    assert cost.Work(trained=1000, forwarded=4000).seconds(rates) == pytest.approx(4.0)
    assert [cost.approx_seconds(s) for s in (0.4, 42.4, 210, 7200)] == ["<1 s", "~42 s", "~3.5 min", "~2.0 h"]


def test_probe_times_real_batches_of_the_phase_i_model():
    from datasets import build_datasets
    import torch

    cfg = load_config("smoke", "phase_i", [])
    bundle = build_datasets(cfg["dataset"])
    rates = cost.probe_rates(cfg, bundle, torch.device("cpu"))
    assert 0 < rates.forwarded < 1 and 0 < rates.trained < 1 and rates.probe_s > 0
    assert cost.probe_rates(cfg, bundle, torch.device("cpu"), world_size=4).trained < rates.trained * 4


def test_a_later_note_expects_what_the_first_took():
    step = pipeline.Step("phase_i", "phase I", METHODS.arm("ce"))
    works = {("seed0", "phase I"): cost.Work(trained=1000), ("seed1", "phase I"): cost.Work(trained=1000)}
    costs = pipeline.StepCosts(works, cost.Rates(trained=0.01, forwarded=0.0))
    assert costs.expected("seed0", step) == pytest.approx(10.0)
    costs.record(step, 31.5)
    assert costs.expected("seed1", step) == 31.5
    assert costs.expected("seed1", pipeline.Step("visualize", "visualize")) is None  # not pending


def test_pipeline_prints_each_steps_expected_cost(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import time
    from analysis import report

    def fake_call(step, spec):
        if step.kind == "phase_i" and spec.note == "seed0":
            time.sleep(3.0)

    monkeypatch.setattr(pipeline, "_call", fake_call)
    # the probe's own numbers depend on the machine's load (test_probe_times_real_batches_of_the_phase_i_model)
    monkeypatch.setattr(pipeline, "probe_rates", lambda *a, **k: cost.Rates(trained=1e-4, forwarded=1e-5, probe_s=0.1))

    monkeypatch.setattr(report, "build_report", lambda name, notes: {})
    pipeline.run(pipeline.PipelineSpec(config="smoke", seeds=(0, 1), device="cpu", opts=("train.epochs=3",)))
    out = capsys.readouterr().out
    assert "[pipeline] expected cost, from a " in out
    assert "[pipeline]   phase I: 3 epochs x 275 images, " in out
    assert "[pipeline]   phase III FSA online: 60 iterations of 32 rows of online maps, " in out
    assert "total" in out and "for 22 step(s) of 2 note(s)" in out
    # seed1's steps expect what seed0's took (the fake phase I took 3 s, the probe expects less than 1 s)
    assert "smoke/seed0 1/11 phase I: started with --opts seed=0 train.epochs=3 (expected <1 s)" in out
    assert "smoke/seed1 1/11 phase I: started with --opts seed=1 train.epochs=3 (expected ~3 s)" in out
    assert "smoke/seed1 2/11 phase II: started with --opts seed=1 (expected <1 s)" in out


def test_teacher_steps_have_their_expected_cost(tmp_path, monkeypatch, capsys):
    from analysis import report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "_call", lambda step, spec: None)
    monkeypatch.setattr(report, "build_report", lambda name, notes: {})
    monkeypatch.setattr(pipeline, "probe_rates", lambda *a, **k: cost.Rates(trained=1e-2, forwarded=1e-3, probe_s=0.1))
    pipeline.run(pipeline.PipelineSpec(config="smoke", device="cpu", suite="tailcalibx",
                                       opts=("train.epochs=2", "distill.teachers=2")))
    out = capsys.readouterr().out
    for k in (1, 2):
        # 2 epochs x 275 images at 10 ms, and 2 evaluations of 240 test images at 1 ms
        assert re.search(rf"phase I CosineCE teacher {k}: started with --opts .* \(expected ~6 s\)$", out, re.M), out


def test_the_benchmark_reads_finished_lines_with_their_expectation():
    log = ("[pipeline] smoke/default 1/11 phase I: finished in 8.0 s (expected ~7 s)\n"
           "[pipeline] smoke/default 2/11 phase II: finished in 0.4 s\n[pipeline] done in 9.5 s; report in x/\n")
    assert step_seconds(log) == {"phase I": 8.0, "phase II": 0.4, "total": 9.5}
