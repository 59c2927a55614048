"""pipeline.py: the smoke chain end to end, a rerun that skips everything, and the step logic."""
import json
import re
import time
from pathlib import Path

import pytest

from app import pipeline
from engine.methods import METHODS
from tests.helpers import run_main_in_process, run_script
from utils.cli import RunSpec
from utils.errors import UserError

SCRIPT = "pipeline.py"


@pytest.fixture(scope="module")
def smoke_pipeline(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("pipeline_smoke")
    started = time.perf_counter()
    proc = run_script(SCRIPT, "--config", "smoke", "--device", "cpu", cwd=cwd, timeout=900)
    return cwd, proc, time.perf_counter() - started


def progress(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("[pipeline] smoke/default")]


def test_smoke_chain_runs_every_step_and_prints_the_table(smoke_pipeline):
    cwd, proc, _ = smoke_pipeline
    out = proc.stdout
    steps = progress(out)
    finished = [line for line in steps if re.search(r" finished in [\d.]+ s \(expected (<1 s|~[\d.]+ (s|min))\)$", line)]
    labels = ["phase I:", "phase II:", "phase III Post-hoc logit adjustment:", "phase III tau-normalised classifier:",
              "phase III cRT control (offline, no fusion):", "phase III FSA offline:",
              "phase III cRT control (online, no fusion):", "phase III FSA online:", "phase III TailCalib (offline):",
              "phase III TailCalibX (online):", "visualize:"]
    for label in labels:
        assert any(label in line for line in finished), (label, steps)
    # order of the chain
    positions = [next(i for i, line in enumerate(finished) if label in line) for label in labels]
    assert positions == sorted(positions)
    # the table
    for row in ("Phase I baseline (CE)", "cRT control (offline, no fusion)", "FSA offline", "FSA online"):
        assert re.search(rf"^\| {re.escape(row)} \| \d+\.\d\d \| — \|", out, re.M), row  # smoke: many-shot absent
    assert "final evaluation" in out
    # the outputs of every step
    for method in (m for m in METHODS if "fsa" in m.suites):  # every method of the default suite, in its run folder
        results = json.loads((cwd / "checkpoints" / method.folder / "smoke/default/results.json").read_text())
        assert results["finished"] is True, method.folder
        assert results.get("method", "ce") == method.id
    # each mode's control: the same iterations and tail / head split as that mode's FSA run, no fusion
    for mode in ("online", "offline"):
        fsa, control = (json.loads((cwd / f"checkpoints/{phase}/smoke/default/results.json").read_text())
                        for phase in (f"phase_iii_{mode}", f"phase_iii_{mode}-none"))
        assert control["generator"] == "none" and control["mode"] == fsa["mode"] == mode
        for key in ("iterations", "tail_classes", "head_classes"):
            assert control[key] == fsa[key], (mode, key)
    assert re.search(r"phase III cRT control \(online, no fusion\): started with --opts finetune\.generator=none \(expected .*\)$", out, re.M)
    assert json.loads((cwd / "features/smoke/default/results.json").read_text())["finished"] is True
    assert list((cwd / "visualizations/smoke/default/phase_i").glob("*.png"))
    assert json.loads((cwd / "visualizations/smoke/default/phase_i/results.json").read_text())["finished"] is True
    for name in ("ablation.md", "ablation.csv", "ablation.png", "per_class.png", "report.json"):
        assert (cwd / "reports/smoke/default" / name).is_file(), name
    # the pipeline's steps used the smoke configs unchanged (no hidden overrides)
    offline = json.loads((cwd / "checkpoints/phase_iii_offline/smoke/default/results.json").read_text())
    assert offline["iterations"] == 60 and offline["generator"] == "fsa"


def test_rerun_skips_every_step(smoke_pipeline):
    cwd, first, first_s = smoke_pipeline
    results = cwd / "checkpoints/phase_i/smoke/default/results.json"
    before = results.stat().st_mtime_ns
    started = time.perf_counter()
    proc = run_script(SCRIPT, "--config", "smoke", "--device", "cpu", cwd=cwd, timeout=300)
    elapsed = time.perf_counter() - started
    steps = progress(proc.stdout)
    assert steps and all(" skipped (finished: " in line for line in steps), steps
    assert re.search(r"^\[pipeline\] smoke report \(default\): skipped \(up to date", proc.stdout, re.M)
    assert "| FSA online |" in proc.stdout  # the table is still shown
    assert results.stat().st_mtime_ns == before
    assert elapsed < max(first_s / 2, 20), (elapsed, first_s)


def test_visualize_explains_a_phase_iii_run_folder(smoke_pipeline):
    cwd, _, _ = smoke_pipeline
    code, err = run_main_in_process("visualize.py", "--config", "smoke", "--device", "cpu", "--phase",
                                    "phase_iii_offline-none", "--classes", "0", "--samples", "1", cwd=cwd)
    assert code == 0, err
    record = json.loads((cwd / "visualizations/smoke/default/phase_iii_offline-none/results.json").read_text())
    assert record["finished"] is True and len(record["pngs"]) == 1
    assert record["checkpoint"] == "checkpoints/phase_iii_offline-none/smoke/default/best_model.pt"


def test_config_sources_need_phase_i_and_take_the_other_phases_where_they_exist(tmp_path):
    tree = tmp_path / "cfg"
    (tree / "phase_i").mkdir(parents=True)
    (tree / "phase_iii").mkdir()
    (tree / "phase_i/mine.yaml").write_text("seed: 0\n")
    (tree / "phase_iii/mine.yaml").write_text("finetune: {iterations: 2}\n")
    # phase II has no file in the tree: the name, i.e. phase II's defaults
    assert pipeline.config_sources(str(tree / "phase_i/mine.yaml")) == {
        "phase_i": str(tree / "phase_i/mine.yaml"), "phase_ii": "mine", "phase_iii": str(tree / "phase_iii/mine.yaml")}
    assert pipeline.config_sources("fashion-mnist-LT_resnet20") == dict.fromkeys(
        ("phase_i", "phase_ii", "phase_iii"), "fashion-mnist-LT_resnet20")
    code, err = run_main_in_process(SCRIPT, "--config", "no-such-config", cwd=tmp_path)
    assert code == 2 and "Traceback" not in err and "configs/phase_i/no-such-config.yaml" in err
    code, err = run_main_in_process(SCRIPT, "--config", str(tree / "phase_iii/mine.yaml"), cwd=tmp_path)
    assert code == 2 and "folder named phase_i" in err
    assert not (tmp_path / "checkpoints").exists()


def test_bad_notes_are_user_errors(tmp_path):
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--seeds", "0", "0", cwd=tmp_path)
    assert code == 2 and "each seed once" in err
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--note", "a/b", cwd=tmp_path)
    assert code == 2 and "cannot name a run folder" in err


def test_steps_get_the_scripts_arguments_and_a_failure_stops_the_chain(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    called = []

    def fake_call(step, spec):
        called.append((step, spec))
        if step.kind == "phase_iii" and step.method.id == "control_online":
            raise UserError("the cRT step says no")

    monkeypatch.setattr(pipeline, "_call", fake_call)
    with pytest.raises(UserError, match="the cRT step says no"):
        pipeline.run(pipeline.PipelineSpec(config="smoke", seeds=(3, 4), device="cpu",
                                           opts=("train.epochs=2", "finetune.iterations=5", "split.ts=0.7")))
    assert [step.label for step, _ in called] == [
        "phase I", "phase II", "phase III Post-hoc logit adjustment", "phase III tau-normalised classifier",
        "phase III cRT control (offline, no fusion)", "phase III FSA offline", "phase III cRT control (online, no fusion)"]
    p1, p2, _, _, crt_offline, offline, crt = (spec for _, spec in called)
    assert p1 == RunSpec(config="smoke", device="cpu", note="seed3", opts=("seed=3", "train.epochs=2"))
    assert p2 == RunSpec(config="smoke", device="cpu", note="seed3", opts=("seed=3", "split.ts=0.7"))
    assert offline.opts == ("seed=3", "finetune.iterations=5", "finetune.generator=fsa") and offline.resume is False
    assert crt.opts == crt_offline.opts == ("seed=3", "finetune.iterations=5", "finetune.generator=none")
    out = capsys.readouterr().out
    assert "phase I: started with --opts seed=3 train.epochs=2" in out
    assert "--opts: phase I: train.epochs=2; phase II and visualize: split.ts=0.7; phase III: finetune.iterations=5" in out
    assert "smoke/seed3 7/" in out and "phase III cRT control (online, no fusion): failed after" in out
    assert "smoke/seed4" not in out and not (tmp_path / "reports").exists()


def test_opts_reach_the_phases_whose_config_has_the_key():
    routed = pipeline.route_opts(["train.lr=0.05", "finetune.iterations=7", "split.ts=0.7", "seed=1",
                                  "dataset.synthetic={num_classes: 4}"], seeded=False)
    assert routed == {"phase_i": ["train.lr=0.05", "seed=1", "dataset.synthetic={num_classes: 4}"],
                      "phase_ii": ["split.ts=0.7", "seed=1"],
                      "phase_iii": ["finetune.iterations=7", "seed=1"]}
    assert pipeline.route_opts([], seeded=True) == {"phase_i": [], "phase_ii": [], "phase_iii": []}
    with pytest.raises(UserError, match="seed") as seeded:
        pipeline.route_opts(["seed=1"], seeded=True)
    assert "--seeds" in str(seeded.value)
    with pytest.raises(UserError, match="its own phase III step"):
        pipeline.route_opts(["finetune.generator=fsa"], seeded=False)
    with pytest.raises(UserError, match="not of the form"):
        pipeline.route_opts(["train.lr"], seeded=False)
    opts = {"phase_i": ["a=1"], "phase_ii": ["b=2"], "phase_iii": ["c=3"]}
    crt = pipeline.Step("phase_iii", "x", METHODS.arm("control_online"))
    assert pipeline.step_opts(crt, opts) == ["c=3", "finetune.generator=none"]
    assert pipeline.step_opts(pipeline.Step("visualize", "visualize"), opts) == ["b=2"]
    assert pipeline.step_opts(pipeline.Step("phase_i", "phase I", METHODS.arm("ce")), opts) == ["a=1"]


def test_unknown_opts_key_lists_the_known_ones_and_nothing_runs(tmp_path):
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--opts", "train.lr=0.1", "train.lrr=0.1", cwd=tmp_path)
    assert code == 2 and "Traceback" not in err
    assert "--opts train.lrr: no phase's config has this key" in err
    assert "train.lr," in err and "finetune.iterations," in err and "split.ts," in err
    assert not any(tmp_path.iterdir())  # no step ran, not even the data check


def test_opts_that_an_existing_run_would_ignore_are_refused(tmp_path, monkeypatch):
    """A finished step is skipped, so --opts changing it would be silently lost: refused, pointing to --note."""
    from utils.config import dump_config, load_config

    monkeypatch.chdir(tmp_path)
    run_dir = Path("checkpoints/phase_i/smoke/default")
    run_dir.mkdir(parents=True)
    dump_config(load_config("smoke", "phase_i"), run_dir / "config.yaml")  # epochs 20
    (run_dir / "results.json").write_text(json.dumps({"finished": True}))
    called = []
    monkeypatch.setattr(pipeline, "_call", lambda step, spec: called.append(step))
    with pytest.raises(UserError) as refused:
        pipeline.run(pipeline.PipelineSpec(config="smoke", device="cpu", opts=("train.epochs=5",)))
    assert f"{run_dir}: train.epochs is 20, --opts asks for 5" in str(refused.value)
    assert "--note NAME" in str(refused.value) and called == []
    # the same value, a speed setting, or a key of a phase without a run: nothing to refuse
    opts = {"phase_i": ["train.epochs=20", "accel.amp=bf16"], "phase_iii": ["finetune.iterations=5"]}
    pipeline.check_existing_runs([pipeline.Step("phase_i", "phase I", METHODS.arm("ce")),
                                  pipeline.Step("phase_iii", "x", METHODS.arm("fsa_online"))],
                                 {"phase_i": "smoke", "phase_iii": "smoke"}, "smoke", [("default", opts)], opts)


def test_seed_notes_and_opts():
    assert pipeline.notes_and_opts(None, None) == [("default", [])]
    assert pipeline.notes_and_opts("mine", None) == [("mine", [])]
    assert pipeline.notes_and_opts(None, [0, 1, 2]) == [("seed0", ["seed=0"]), ("seed1", ["seed=1"]), ("seed2", ["seed=2"])]
    assert pipeline.notes_and_opts("lr05", [0, 1]) == [("lr05-seed0", ["seed=0"]), ("lr05-seed1", ["seed=1"])]


def test_plan_is_the_method_table_in_order():
    steps = pipeline.plan_steps()
    assert [s.kind for s in steps] == ["phase_i", "phase_ii", *["phase_iii"] * 8, "visualize"]
    assert [s.folder() for s in steps] == [
        "phase_i", "phase_ii", "phase_iii_offline-la_posthoc", "phase_iii_offline-tau_norm", "phase_iii_offline-none",
        "phase_iii_offline", "phase_iii_online-none", "phase_iii_online", "phase_iii_offline-tailcalib",
        "phase_iii_online-tailcalibx", "visualize"]
    assert [s.method.id for s in steps if s.kind != "phase_ii" and s.method] == [m.id for m in METHODS if "fsa" in m.suites]
    full = pipeline.plan_steps("full")
    # the chain on the CE backbone first (with LWS and cRT), then the other phase I methods (CBD: tailcalibx only)
    variants = [m.id for m in METHODS.backbones() if m.id not in ("ce", "cbd")]
    assert [s.method.id for s in full if s.kind != "phase_ii" and s.method] == [
        "ce", *(m.id for m in METHODS.phase_iii_methods()), *variants]
    assert variants == ["focal", "class_balanced", "balanced_softmax", "la_loss", "ldam_drw", "cosine_ce"]
    assert [s.kind for s in full].count("phase_ii") == 1  # full trains no phase III arm off CE
    focal = next(s for s in full if s.method and s.method.id == "focal")
    assert focal.folder() == "phase_i-focal"
    assert pipeline.step_opts(focal, {"phase_i": ["seed=1"]}) == ["seed=1", "train.loss=focal"]
    ldam = next(s for s in full if s.method and s.method.id == "ldam_drw")
    assert pipeline.step_opts(ldam, {"phase_i": []}) == [
        "train.loss=ldam", "train.reweight=drw", "model.classifier=normed", "model.scale=30", "model.learn_scale=false"]
    assert pipeline.step_opts(full[0], {"phase_i": ["seed=1"]}) == ["seed=1"]
    with pytest.raises(UserError, match="--suite"):
        pipeline.route_opts(["train.loss=focal"], seeded=False)
    with pytest.raises(UserError, match="--suite"):
        pipeline.plan_steps("most")


def test_step_state_decides_skip_resume_or_fresh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    step = pipeline.Step("phase_iii", "x", METHODS.arm("control_offline"))
    run_dir = Path("checkpoints/phase_iii_offline-none/c/n")
    assert pipeline.step_state(step, "c", "n")[0] == "new"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"finished": False}))
    assert pipeline.step_state(step, "c", "n")[0] == "stale"
    (run_dir / "last.pt").write_bytes(b"")
    assert pipeline.step_state(step, "c", "n") == ("interrupted", str(run_dir / "last.pt"))
    (run_dir / "results.json").write_text(json.dumps({"finished": True}))
    assert pipeline.step_state(step, "c", "n")[0] == "finished"
    p2 = pipeline.Step("phase_ii", "phase II", METHODS.arm("ce"))
    features = Path("features/c/n")
    assert pipeline.step_state(p2, "c", "n")[0] == "new"
    features.mkdir(parents=True)
    assert pipeline.step_state(p2, "c", "n")[0] == "stale"
    (features / "results.json").write_text(json.dumps({"finished": True}))
    assert pipeline.step_state(p2, "c", "n")[0] == "finished"


def test_visualize_is_done_only_with_a_complete_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    step = pipeline.Step("visualize", "visualize")
    folder = Path("visualizations/c/n/phase_i")
    assert pipeline.step_state(step, "c", "n") == ("new", str(folder))
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"png")
    assert pipeline.step_state(step, "c", "n")[0] == "stale"  # a stray PNG, no record: interrupted
    record = folder / "results.json"
    record.write_text(json.dumps({"finished": False, "pngs": ["a.png"]}))
    assert pipeline.step_state(step, "c", "n")[0] == "stale"
    record.write_text(json.dumps({"finished": True, "pngs": ["a.png", "b.png"]}))
    assert pipeline.step_state(step, "c", "n")[0] == "stale"  # a listed PNG is missing
    (folder / "b.png").write_bytes(b"png")
    assert pipeline.step_state(step, "c", "n") == ("finished", str(record))
    record.write_text("[not json")
    assert pipeline.step_state(step, "c", "n")[0] == "stale"


def test_data_step_only_for_missing_fashion_mnist(monkeypatch, capsys):
    import app.data_install as fm

    calls = []
    monkeypatch.setattr(fm.subprocess, "run", lambda *a, **k: calls.append(a))
    fm.ensure_fashion_mnist({"name": "synthetic-LT", "root": None})
    monkeypatch.setattr(fm, "find_fashion_mnist", lambda root: {"found": True})
    fm.ensure_fashion_mnist({"name": "fashion-mnist-LT", "root": None})
    assert calls == []
    monkeypatch.setattr(fm, "find_fashion_mnist", lambda root: None)
    monkeypatch.setattr(fm.shutil, "which", lambda name: None)
    fm.ensure_fashion_mnist({"name": "fashion-mnist-LT", "root": None})
    assert calls == [] and "apt-get is not available" in capsys.readouterr().out
