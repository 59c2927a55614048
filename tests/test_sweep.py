"""sweep.py: a grid chosen on validation and reported once on test, the control on the same grid and rule.

End to end on the smoke config with a held-out validation split, short phase I (3 epochs) and phase III
(10 iterations), 2 grid points x 2 seeds, in this process; an oracle that poisons the reported test labels.
"""
import json
import re
from pathlib import Path

import pytest
import torch

from app import sweep
from tests.helpers import run_main_in_process
from utils.errors import UserError

SCRIPT = "sweep.py"
VAL = ["dataset.val.source=train", "dataset.val.fraction=0.2"]
QUICK = ["train.epochs=3", "finetune.iterations=10", "finetune.eval_every=5"]
ARGS = ["--config", "smoke", "--device", "cpu", "--method", "fsa_offline", "--grid", "finetune.lr=0.005,0.05",
        "--seeds", "0", "1", "--opts", *VAL, *QUICK]


def _sweep(cwd: Path, capsys, *args: str) -> tuple[int, str, str]:
    code, err = run_main_in_process(SCRIPT, *args, cwd=cwd)
    return code, capsys.readouterr().out, err


def _report(cwd: Path) -> dict:
    found = list((cwd / "reports/smoke").glob("sweep-fsa_offline-lr-*/sweep.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def _arm(data: dict, role: str) -> dict:
    return next(a for a in data["arms"] if a["role"] == role)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One finished sweep (fsa_offline and its control over finetune.lr, seeds 0 and 1) and its stdout."""
    cwd = tmp_path_factory.mktemp("sweep_clean")
    code, err = run_main_in_process(SCRIPT, *ARGS, cwd=cwd)
    assert code == 0, err
    return cwd


def test_prints_the_size_and_expected_time_before_running(tmp_path, capsys):
    code, out, err = _sweep(tmp_path, capsys, *ARGS, "--dry-run")
    assert code == 0, err
    assert re.search(r"^\[sweep\] size: 2 points x 2 seed\(s\) x 2 run\(s\) \(fsa_offline, control_offline\) = 8 runs; "
                     r"besides them 4 step\(s\) \(phase I / II of 2 note\(s\)\)$", out, re.M), out
    assert re.search(r"^\[sweep\] expected wall time of the 12 pending step\(s\): (<1 s|~[\d.]+ (s|min)) \(phase I ",
                     out, re.M), out
    assert "--dry-run: nothing run" in out
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "reports").exists()


def test_the_control_gets_the_same_grid_and_rule(clean):
    data = _report(clean)
    method, control = _arm(data, "method"), _arm(data, "control")
    assert data["method"] == "fsa_offline" and data["control"] == "control_offline"
    assert [p["point"] for p in method["points"]] == [p["point"] for p in control["points"]] == [
        {"finetune.lr": "0.005"}, {"finetune.lr": "0.05"}]
    assert control["collapsed"] == [] and control["keys"] == ["finetune.lr"]
    for arm, folder in ((method, "phase_iii_offline"), (control, "phase_iii_offline-none")):
        for point in arm["points"]:
            for seed, note in point["notes"].items():
                assert note == f"sweep-lr{point['point']['finetune.lr']}-{seed}"
                run_dir = clean / "checkpoints" / folder / "smoke" / note
                results = json.loads((run_dir / "results.json").read_text())
                # the point's setting, on the seed's base note's phase I / II (not retrained per point)
                assert f"lr: {point['point']['finetune.lr']}" in (run_dir / "config.yaml").read_text()
                assert results["upstream_note"] == seed == point["upstream_notes"][seed]
                assert results["phase_i_checkpoint"].endswith(f"checkpoints/phase_i/smoke/{seed}/best_model.pt")
                assert results["iterations"] == 10
                # the point's score is its run's validation score
                assert point["val"]["per_seed"][seed] == results["checkpoint_selection"]["val_mean_class_acc"]
        # the same rule: the best mean over the seeds, ties to the first
        means = [p["val"]["mean"] for p in arm["points"]]
        assert [p["chosen"] for p in arm["points"]] == [i == means.index(max(means)) for i in range(len(means))]
    assert not (clean / "checkpoints/phase_i/smoke/sweep-lr0.005-seed0").exists()  # phase I once per seed
    assert sorted(p.name for p in (clean / "checkpoints/phase_i/smoke").iterdir()) == ["seed0", "seed1"]
    # one paired difference per metric: chosen method - chosen control, by seed, with a t-interval
    paired = {d["metric"]: d for d in data["paired"]}
    assert set(paired) == {"top1", "tail"} and paired["top1"]["n"] == 2 and len(paired["top1"]["ci95"]) == 2


def test_only_the_chosen_points_test_numbers_are_reported(clean):
    data = _report(clean)
    for arm in data["arms"]:
        chosen = next(p for p in arm["points"] if p["chosen"])
        assert arm["chosen"]["point"] == chosen["point"]
        for point in arm["points"]:
            assert not {"test", "top1", "tail"} & set(point), point  # every point: validation only
        runs = [json.loads(Path(clean / path).read_text()) for path in chosen["results"].values()]
        assert arm["chosen"]["test"]["top1"]["values"] == [r["top1"] for r in runs]
    markdown = next((clean / "reports/smoke").glob("sweep-*/sweep.md")).read_text()
    table = markdown.split("## Chosen points")[1].split("## Validation")[0]
    assert len([line for line in table.splitlines() if line.startswith("| ") and "`" in line]) == 2


def test_selection_never_reads_the_reported_test_images(clean, tmp_path, monkeypatch):
    """Oracle: scramble the reported test labels of every phase; each run's validation score, hence the chosen
    point, must not move, while the test numbers do."""
    import engine.artifacts
    import engine.phase_i

    real = engine.phase_i.build_datasets

    def poisoned(cfg, run_dir=None):
        bundle = real(cfg, run_dir)
        generator = torch.Generator().manual_seed(0)
        bundle.test.targets = bundle.test.targets[torch.randperm(len(bundle.test), generator=generator)]
        return bundle

    monkeypatch.setattr(engine.phase_i, "build_datasets", poisoned)
    monkeypatch.setattr(engine.artifacts, "build_datasets", poisoned)
    code, err = run_main_in_process(SCRIPT, *ARGS, cwd=tmp_path)
    assert code == 0, err
    before, after = _report(clean), _report(tmp_path)
    for role in ("method", "control"):
        a, b = _arm(before, role), _arm(after, role)
        assert [p["val"] for p in a["points"]] == [p["val"] for p in b["points"]]
        assert a["chosen"]["point"] == b["chosen"]["point"]
        assert a["chosen"]["test"]["top1"]["values"] != b["chosen"]["test"]["top1"]["values"]  # the poison bit


def test_bad_input_is_refused_before_anything_runs(tmp_path, capsys):
    base = ["--config", "smoke", "--device", "cpu", "--seeds", "0", "--opts", *VAL]
    cases = [
        (["--method", "fsa_offline", "--grid", "finetune.lrr=0.1,0.2"], "no phase's config has this key. Did you mean 'finetune.lr'"),
        (["--method", "fsa_offline", "--grid", "finetune.lr=0.1"], "one value is no sweep"),
        (["--method", "fsa_offline", "--grid", "finetune.lr=0.1,0.10"], "are the same setting"),
        (["--method", "fsa_offlin", "--grid", "finetune.lr=0.1,0.2"], "--method fsa_offlin: no such method"),
        (["--method", "fsa_offline", "--control", "nope", "--grid", "finetune.lr=0.1,0.2"], "--control nope: no such method"),
        (["--method", "fsa_offline", "--grid", "finetune.generator=fsa,none"], "it chooses the method"),
        (["--method", "fsa_offline", "--grid", "seed=0,1"], "--seeds"),
        (["--method", "fsa_offline", "--grid", "dataset.val.fraction=0.1,0.2"], "the same validation images"),
        (["--method", "fsa_offline", "--grid", "finetune"], "not of the form KEY=V1,V2"),
        (["--method", "fsa_offline", "--grid", "finetune=1,2"], "It is a section"),
        (["--method", "fsa_offline", "--grid", "tailcalib.k=2,3"], "not read by fsa_offline"),
        (["--method", "fsa_offline", "--grid", "finetune.lr=0.1,0.2", "finetune.lr=0.3,0.4"], "given twice"),
        (["--method", "fsa_offline", "--grid", "finetune.lr=0.1,abc"], "finetune.lr"),
    ]
    for args, message in cases:
        code, _, err = _sweep(tmp_path, capsys, *base, *args)
        assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err, (args, err)
    assert not list(tmp_path.iterdir())


def test_a_config_without_a_validation_split_is_refused(tmp_path, capsys):
    code, out, err = _sweep(tmp_path, capsys, "--config", "smoke", "--device", "cpu", "--method", "fsa_offline",
                            "--grid", "finetune.lr=0.005,0.05", "--seeds", "0")
    assert code == 2 and err.startswith("error: config 'smoke' has no validation split"), err
    assert "nothing to choose a point on" in err and "--opts dataset.val.source=train" in err
    assert "[sweep] size" not in out and not list(tmp_path.iterdir())


def _plan(*grid: str, method: str = "fsa_offline", **kw) -> sweep.Plan:
    return sweep.plan(sweep.SweepSpec(config="smoke", method=method, grid=grid, seeds=(0,), opts=tuple(VAL), **kw))


def test_keys_an_arm_does_not_read_collapse_for_it():
    plan = _plan("tailcalib.k=2,3", "finetune.lr=0.01,0.02", method="tailcalib", control="control_offline")
    method, control = plan.arms
    assert len(method.points) == 4 and control.points == [(("finetune.lr", "0.01"),), (("finetune.lr", "0.02"),)]
    assert control.role.keys == ("finetune.lr",)
    assert control.notes[control.points[0]] == {"seed0": "sweep-lr0.01-seed0"}
    assert method.notes[method.points[0]] == {"seed0": "sweep-k2_lr0.01-seed0"}
    # a phase I method reads no phase III key: swept over one, it is refused
    with pytest.raises(UserError, match="not read by focal"):
        _plan("finetune.lr=0.01,0.02", method="focal")
    # a phase I key reaches every phase III arm through its backbone: its own phase I / II per value
    plan = _plan("train.lr=0.01,0.05", "finetune.lr=0.001,0.002", control="none")
    runs = {(r.step.kind, r.note): r for r in plan.runs}
    assert ("phase_i", "sweep-train.lr0.01-seed0") in runs and ("phase_ii", "sweep-train.lr0.05-seed0") in runs
    assert ("phase_i", "seed0") not in runs
    one = runs[("phase_iii", "sweep-train.lr0.01_finetune.lr0.001-seed0")]
    assert one.upstream == "sweep-train.lr0.01-seed0" and "train.lr=0.01" in one.opts["phase_i"]
    assert "finetune.lr=0.001" in one.opts["phase_iii"]
    assert [r.step.kind for r in plan.runs].count("phase_i") == 2  # once per phase I setting, not per point


def test_phase_iii_refuses_a_missing_upstream_note_with_the_command_that_makes_it(tmp_path):
    code, err = run_main_in_process("phase_iii_offline_train_or_test.py", "--config", "smoke", "--device", "cpu",
                                    "--note", "mine", "--upstream-note", "base", cwd=tmp_path)
    assert code == 2 and "note 'base' given as --upstream-note" in err, err
    assert "python phase_i_train_or_test.py --config smoke --note base" in err
    assert not (tmp_path / "checkpoints").exists()


def test_a_finished_point_is_skipped_and_an_interrupted_one_resumed(clean, capsys):
    """Last: it changes the clean sweep's runs (one resumed to the same numbers)."""
    results = clean / "checkpoints/phase_iii_offline/smoke/sweep-lr0.005-seed0/results.json"
    interrupted = clean / "checkpoints/phase_iii_offline-none/smoke/sweep-lr0.05-seed1/results.json"
    stamps = {path: path.stat().st_mtime_ns for path in clean.glob("checkpoints/**/results.json") if path != interrupted}
    before = _report(clean)
    saved = json.loads(interrupted.read_text())
    interrupted.write_text(json.dumps({"finished": False, "phase": saved["phase"], "iteration": 10,
                                       "history": saved["history"]}))
    code, out, err = _sweep(clean, capsys, *ARGS)
    assert code == 0, err
    lines = [line for line in out.splitlines() if re.match(r"\[sweep\] smoke/\S+ \d+/12 .*: (skipped|resumed|started)", line)]
    assert len(lines) == 12, out
    resumed = [line for line in lines if " resumed from " in line]
    assert len(resumed) == 1 and "sweep-lr0.05-seed1" in resumed[0] and "cRT control" in resumed[0], lines
    assert all(" skipped (finished: " in line for line in lines if line not in resumed)
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())
    assert json.loads(interrupted.read_text())["finished"] is True
    assert [p["val"] for a in _report(clean)["arms"] for p in a["points"]] == \
           [p["val"] for a in before["arms"] for p in a["points"]]
    # a finished point that read another note's phase I / II, or a phase I model changed since, is refused, not skipped
    point = clean / "checkpoints/phase_iii_offline/smoke/sweep-lr0.05-seed0/results.json"
    kept = point.read_text()
    for key, value, message in (("upstream_note", "seed1", "it read the phase I / II of note 'seed1'"),
                                ("phase_i_checkpoint_sha256", "0" * 64, "its phase I checkpoint has changed")):
        point.write_text(json.dumps({**json.loads(kept), key: value}))
        code, out, err = _sweep(clean, capsys, *ARGS)
        assert code == 2 and message in err and "--upstream-note seed0 --overwrite" in err, err
        assert "[sweep] size" not in out
    point.write_text(kept)


def test_help_and_print_config(tmp_path, capsys):
    code, out, err = _sweep(tmp_path, capsys, "--help")
    assert code == 0 and "--output-root DIR" in out and "--print-config" in out and "--dry-run" in out
    code, out, err = _sweep(tmp_path, capsys, *ARGS, "--print-config")
    assert code == 0, err
    headers = re.findall(r"^--- # (\w+) of note (\S+)", out, re.M)
    assert headers == [("phase_i", "seed0"), ("phase_ii", "seed0"), ("phase_iii", "sweep-lr0.005-seed0")]
    assert "  lr: 0.005\n" in out.split("--- # phase_iii")[1] and "generator: fsa" in out
    assert not list(tmp_path.iterdir())
