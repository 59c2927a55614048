"""Phase III with TailCalib (offline) and TailCalibX (online), end to end through the CLI.

One module fixture: a deliberately under-trained smoke phase I (3 epochs: it never predicts the tail
classes) + phase II in a tmp cwd, then one tailcalib and one tailcalibx run that the tests inspect.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import run_main_in_process, run_script, script_command, script_env

OFFLINE, ONLINE = "phase_iii_offline_train_or_test.py", "phase_iii_online_train_or_test.py"
BASE = ["--config", "smoke", "--device", "cpu"]
# The smoke set balances to only 8 x 100 features: the release's lr 0.01 / batch 128 would take far more epochs
# than a test can afford to fit the classifier on unit-norm features. Plain SGD (no momentum) keeps the
# classifier on the weak features of a 3-epoch backbone from oscillating between epochs.
# float32 (accel.amp=none): the tests recompute features and predictions in float32 as their oracle
COMMON = ["tailcalib.batch_size=16", "tailcalib.lr=0.1", "tailcalib.momentum=0.0", "accel.amp=none"]
BATCH = 16
OFF_OPTS = ["--opts", "finetune.generator=tailcalib", "tailcalib.epochs=15", *COMMON]
ON_OPTS = ["--opts", "finetune.generator=tailcalibx", "tailcalib.epochs=3", *COMMON]
OFF_DIR = Path("checkpoints/phase_iii_offline-tailcalib/smoke/default")
ON_DIR = Path("checkpoints/phase_iii_online-tailcalibx/smoke/default")
# the top-level keys every phase III results.json carries (engine.phase_iii + RunRecorder.finish)
STANDARD_KEYS = {"finished", "phase", "config", "note", "evaluated", "top1", "mean_class_acc", "many", "medium", "few",
                 "head", "tail", "per_class", "confusion", "train_counts", "groups", "num_test_samples",
                 "checkpoint_selection", "num_val_images", "num_test_images", "phase_i_checkpoint",
                 "phase_i_checkpoint_selection", "wall_time_s", "mode", "generator", "iterations", "train_samples", "tail_classes",
                 "head_classes", "history"}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _prepared(cwd: Path) -> Path:
    cwd.mkdir(parents=True)
    run_script("phase_i_train_or_test.py", *BASE, "--opts", "train.epochs=3", cwd=cwd)
    run_script("phase_ii_extract_feature.py", *BASE, "--opts", "accel.amp=none", cwd=cwd)  # float32: the oracle's
    return cwd


def _copy_phases_i_ii(src: Path, dst: Path) -> Path:
    """A fresh cwd holding only the phase I run and phase II outputs of `src`."""
    for sub in ("checkpoints/phase_i", "features"):
        shutil.copytree(src / sub, dst / sub)
    return dst


@pytest.fixture(scope="module")
def cwd(tmp_path_factory) -> Path:
    cwd = _prepared(tmp_path_factory.mktemp("tailcalib") / "run")
    run_script(OFFLINE, *BASE, *OFF_OPTS, cwd=cwd)
    run_script(ONLINE, *BASE, *ON_OPTS, cwd=cwd)
    return cwd


def _test_features_offline(cwd: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from fsa.feature_store import FeatureStore

    store = FeatureStore(cwd / "features/smoke/default/store")
    return store.test_pooled(), store.test_labels()


def _predict(ckpt: dict, pooled: torch.Tensor) -> torch.Tensor:
    """Independent of the runner: the library's transform, then the stored linear layer."""
    from fsa.generators.tailcalib_api import tukey_transform

    t = ckpt["feature_transform"]
    z = tukey_transform(pooled, t["tukey"], eps=t["eps"], normalize=t["normalize"])
    return F.linear(z, ckpt["fc"]["weight"], ckpt["fc"]["bias"]).argmax(1)


def _per_class_percent(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    return [float((preds[labels == c] == c).double().mean()) * 100 for c in range(num_classes)]


def test_generators_are_listed():
    from engine.methods import METHODS

    assert {"tailcalib", "tailcalibx"} <= set(METHODS.generators())
    assert "tailcalib" in METHODS.generators("offline") and "tailcalibx" in METHODS.generators("online")
    assert METHODS.phase_iii("offline", "tailcalib").folder == "phase_iii_offline-tailcalib"
    assert METHODS.phase_iii("online", "tailcalibx").folder == "phase_iii_online-tailcalibx"


@pytest.mark.parametrize("run_dir, mode, epochs", [(OFF_DIR, "offline", 15), (ON_DIR, "online", 3)])
def test_runs_write_standard_results_and_balance_the_training_set(cwd, run_dir, mode, epochs):
    results = _json(cwd / run_dir / "results.json")
    assert results["finished"] is True and results["mode"] == mode
    assert STANDARD_KEYS <= set(results), STANDARD_KEYS - set(results)
    assert results["epochs"] == epochs and [h["epoch"] for h in results["history"]] == list(range(1, epochs + 1))
    counts = results["train_counts"]
    assert counts == _json(cwd / "checkpoints/phase_i/smoke/default/results.json")["train_counts"]
    # every class topped up to the head count: real + generated == max count, the head class gets none
    generated = results["generated_per_class"]
    assert [n + g for n, g in zip(counts, generated)] == [max(counts)] * len(counts)
    assert generated[counts.index(max(counts))] == 0 and results["balanced_to"] == max(counts)
    assert all(h["train_features"] == max(counts) * len(counts) for h in results["history"])
    assert results["iterations"] == epochs * -(-max(counts) * len(counts) // BATCH)
    # bookkeeping of every run: config, log, TensorBoard, checkpoints
    folder = cwd / run_dir
    assert (folder / "config.yaml").is_file() and "generated per class" in (folder / "log.txt").read_text()
    assert list((cwd / "run_summary" / run_dir.relative_to("checkpoints")).glob("events.out.tfevents.*"))
    for name in ("last.pt", "best_model.pt"):
        ckpt = torch.load(folder / name, weights_only=True)
        assert "model" not in ckpt, "a feature classifier must not pass for a backbone + fc model"
        assert ckpt["kind"] == "feature-classifier" and ckpt["feature_transform"]["normalize"] is True
        assert ckpt["feature_transform"]["tukey"] == 1.0 and ckpt["arch"] == "resnet8"
        assert ckpt["fc"]["weight"].shape == (len(counts), ckpt["feature_dim"])
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == epochs


def test_offline_evaluation_applies_the_transform(cwd):
    """top1 / per-class accuracy recomputed from the checkpoints + phase II's test_pooled, exactly."""
    pooled, labels = _test_features_offline(cwd)
    results = _json(cwd / OFF_DIR / "results.json")
    last = torch.load(cwd / OFF_DIR / "last.pt", weights_only=True)
    preds = _predict(last, pooled)
    assert float((preds == labels).double().mean()) * 100 == pytest.approx(results["top1"], abs=1e-9)
    assert _per_class_percent(preds, labels, len(results["train_counts"])) == pytest.approx(results["per_class"], abs=1e-9)
    best = torch.load(cwd / OFF_DIR / "best_model.pt", weights_only=True)  # no validation split: the final epoch
    assert results["checkpoint_selection"] == {"by": "final", "epoch": results["epochs"]}
    assert torch.equal(_predict(best, pooled), preds)
    # the same linear layer on the untransformed features gives other predictions (the transform matters)
    raw = F.linear(pooled, last["fc"]["weight"], last["fc"]["bias"]).argmax(1)
    assert not torch.equal(raw, preds)

    from engine.phase_iii_features import feature_logits

    assert torch.equal(feature_logits(last, pooled).argmax(1), preds)


def test_online_evaluation_uses_backbone_features_of_the_test_images(cwd):
    from engine.artifacts import open_phase_i_run
    from engine.phase_iii_features import pooled_features

    p1 = open_phase_i_run("smoke", "default", cwd)
    model = p1.load_model(torch.device("cpu"), cwd / "checkpoints/phase_i/smoke/default/best_model.pt", "phase I")
    model.eval()
    pooled, labels = pooled_features(model, p1.bundle.test.with_augment(False), 256, torch.device("cpu"))
    stored, stored_labels = _test_features_offline(cwd)
    assert torch.equal(labels, stored_labels) and torch.allclose(pooled, stored, atol=1e-4)
    results = _json(cwd / ON_DIR / "results.json")
    preds = _predict(torch.load(cwd / ON_DIR / "last.pt", weights_only=True), pooled)
    assert float((preds == labels).double().mean()) * 100 == pytest.approx(results["top1"], abs=1e-9)


def test_tailcalib_lifts_the_tail_of_an_under_trained_model(cwd):
    phase_i = _json(cwd / "checkpoints/phase_i/smoke/default/results.json")
    best = next(h for h in phase_i["history"]  # phase II used best_model.pt, the selected epoch
                if h["epoch"] == phase_i["checkpoint_selection"]["epoch"])
    for run_dir in (OFF_DIR, ON_DIR):
        results = _json(cwd / run_dir / "results.json")
        ref = results["phase_i_reference"]  # the phase I classifier on the same test features
        assert ref["top1"] == pytest.approx(best["top1"], abs=100 / results["num_test_samples"] + 1e-9)
        assert results["tail"] > ref["tail"] and results["tail"] > best["tail"], (run_dir, results["tail"], ref["tail"])
    offline = _json(cwd / OFF_DIR / "results.json")
    assert offline["top1"] > offline["phase_i_reference"]["top1"]


@pytest.mark.parametrize("script, generator", [(OFFLINE, "tailcalib"), (ONLINE, "tailcalibx")])
def test_the_classifier_starts_as_phase_i_s_and_trains_with_the_release_s_momentum(cwd, tmp_path, monkeypatch,
                                                                                  script, generator):
    """Release defaults (experiments 1.2 / 2.2 / 2.4 of TailCalibX's experiments_maker.py): the classifier is the
    backbone run's own (pretrain: True), bit for bit when its optimiser is built, and SGD momentum is 0.7 (--cv3 at
    imbalance 100 in run_all_CIFAR100-LT.sh), whatever finetune.momentum says."""
    import engine.phase_iii_features as features

    seen = {}
    real = features.build_optimizer

    def spy(params, cfg):
        params = list(params)
        seen["params"] = [p.detach().clone() for p in params]
        seen["optimizer"] = real(params, cfg)
        return seen["optimizer"]

    monkeypatch.setattr(features, "build_optimizer", spy)
    work = _copy_phases_i_ii(cwd, tmp_path)
    code, stderr = run_main_in_process(script, *BASE, "--opts", f"finetune.generator={generator}", "tailcalib.epochs=1",
                                       "finetune.momentum=0.3", "accel.amp=none", cwd=work)
    assert code == 0, stderr
    phase_i = torch.load(work / "checkpoints/phase_i/smoke/default/best_model.pt", weights_only=True)["model"]
    assert [p.shape for p in seen["params"]] == [phase_i["fc.weight"].shape, phase_i["fc.bias"].shape]
    assert torch.equal(seen["params"][0], phase_i["fc.weight"]) and torch.equal(seen["params"][1], phase_i["fc.bias"])
    group = seen["optimizer"].param_groups[0]
    assert isinstance(seen["optimizer"], torch.optim.SGD) and group["momentum"] == 0.7
    results = _json(work / (OFF_DIR if script == OFFLINE else ON_DIR) / "results.json")
    assert results["classifier_init"] == "phase_i" and results["momentum"] == 0.7


@pytest.mark.parametrize("script, generator, right", [(ONLINE, "tailcalib", OFFLINE), (OFFLINE, "tailcalibx", ONLINE)])
def test_wrong_mode_is_a_user_error_naming_the_right_script(tmp_path, script, generator, right):
    code, stderr = run_main_in_process(script, *BASE, "--opts", f"finetune.generator={generator}", cwd=tmp_path)
    assert code == 2 and stderr.startswith("error: ") and f"python {right} --config smoke" in stderr, stderr
    assert not (tmp_path / "checkpoints").exists()


def test_resume_of_a_finished_run_is_a_no_op(cwd, capsys):
    before = (cwd / OFF_DIR / "results.json").read_bytes()
    stamp = (cwd / OFF_DIR / "last.pt").stat().st_mtime_ns
    code, stderr = run_main_in_process(OFFLINE, *BASE, "--resume", *OFF_OPTS, cwd=cwd)
    assert code == 0, stderr
    assert "already finished" in capsys.readouterr().out
    assert (cwd / OFF_DIR / "results.json").read_bytes() == before and (cwd / OFF_DIR / "last.pt").stat().st_mtime_ns == stamp


def test_killed_run_resumes_to_the_straight_run(cwd, tmp_path):
    killed = _copy_phases_i_ii(cwd, tmp_path)
    last = killed / OFF_DIR / "last.pt"
    proc = subprocess.Popen(script_command(OFFLINE, *BASE, *OFF_OPTS), cwd=killed, env=script_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if last.is_file() and torch.load(last, weights_only=True)["epoch"] >= 1:
                proc.send_signal(signal.SIGKILL)
                break
        except (RuntimeError, EOFError):  # pragma: no cover - replaced while reading
            pass
        time.sleep(0.02)
    proc.wait()
    interrupted_at = torch.load(last, weights_only=True)["epoch"]
    results = killed / OFF_DIR / "results.json"  # absent when killed between last.pt and its first booking
    if interrupted_at >= 15 or (results.is_file() and _json(results).get("finished")):
        pytest.skip("the run finished before it could be killed; nothing to resume")

    code, stderr = run_main_in_process(OFFLINE, *BASE, *OFF_OPTS, cwd=killed)
    assert code == 2 and "--resume" in stderr  # an interrupted run is not silently restarted
    code, stderr = run_main_in_process(OFFLINE, *BASE, "--resume", *OFF_OPTS, "tailcalib.lr=0.05", cwd=killed)
    assert code == 2 and "tailcalib.lr" in stderr  # nor resumed with other settings
    run_script(OFFLINE, *BASE, "--resume", *OFF_OPTS, cwd=killed)

    straight_ckpt = torch.load(cwd / OFF_DIR / "last.pt", weights_only=True)
    resumed_ckpt = torch.load(last, weights_only=True)
    for key in ("weight", "bias"):
        assert torch.equal(straight_ckpt["fc"][key], resumed_ckpt["fc"][key]), key
    straight, resumed = _json(cwd / OFF_DIR / "results.json"), _json(killed / OFF_DIR / "results.json")
    strip = ("wall_time_s", "generate_s")
    assert resumed["finished"] and resumed["iterations"] == straight["iterations"]
    assert [{k: v for k, v in h.items() if k not in strip} for h in resumed["history"]] == \
           [{k: v for k, v in h.items() if k not in strip} for h in straight["history"]]
    assert resumed["per_class"] == straight["per_class"]
    assert resumed["checkpoint_selection"] == straight["checkpoint_selection"]


def test_a_bias_free_normed_head_round_trips_through_the_feature_checkpoint(tmp_path):
    """TailCalib on an LDAM-DRW backbone: its head (normed, no bias, fixed s = 30) is saved and rebuilt."""
    from engine.artifacts import read_feature_classifier_checkpoint
    from engine.phase_iii_features import classifier_spec, feature_logits
    from models.base import build_classifier
    from utils.checkpoint import save_checkpoint

    torch.manual_seed(0)
    fc = build_classifier("normed", 6, 3, scale=30.0, learn_scale=False)
    z = torch.randn(4, 6).abs()
    transform = {"tukey": 1.0, "eps": 1e-6, "normalize": False}
    path = tmp_path / "best_model.pt"
    from engine.artifacts import FEATURE_CLASSIFIER_KIND

    save_checkpoint(path, {"kind": FEATURE_CLASSIFIER_KIND, "fc": fc.state_dict(), "classifier": classifier_spec(fc),
                           "feature_transform": transform, "arch": "resnet8", "num_classes": 3, "in_channels": 1})
    payload = read_feature_classifier_checkpoint(path, "test", "tailcalib")
    assert payload["classifier"]["kind"] == "normed"
    from engine.phase_iii_features import apply_feature_transform

    torch.testing.assert_close(feature_logits(payload, z), fc(apply_feature_transform(z, transform)))
