"""Phase I end to end through the CLI: outputs, resume exactness, and bad input."""
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import run_main_in_process, run_script, script_command, script_env

SCRIPT = "phase_i_train_or_test.py"
QUICK = ["train.epochs=2"]


@pytest.fixture(scope="module")
def smoke_run(smoke_phase_i) -> Path:
    """The session's smoke phase I run (tests here only read it or add test_results.json)."""
    return smoke_phase_i


def test_smoke_writes_the_promised_files(smoke_run):
    run_dir = smoke_run / "checkpoints/phase_i/smoke/default"
    for name in ("last.pt", "best_model.pt", "config.yaml", "results.json", "log.txt", "train_subset.json"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["finished"] is True
    for key in ("top1", "many", "medium", "few", "head", "tail", "per_class", "train_counts", "confusion"):
        assert key in results, key
    counts = results["train_counts"]
    assert counts == sorted(counts, reverse=True) and counts[0] / counts[-1] == pytest.approx(20, rel=0.15)
    assert all(n <= 100 for n in counts) and results["many"] is None  # no class above 100 images -> absent, not 0
    assert results["top1"] > 100 / len(counts) * 2, "smoke model should clearly beat chance"
    # per-class accuracies average to the mean class accuracy; confusion rows add up to the test set
    per_class = results["per_class"]
    assert sum(per_class) / len(per_class) == pytest.approx(results["mean_class_acc"])
    assert sum(map(sum, results["confusion"])) == results["num_test_samples"]


def test_checkpoints_load_weights_only_into_the_model(smoke_run):
    from models import build_model

    payload = torch.load(smoke_run / "checkpoints/phase_i/smoke/default/best_model.pt", weights_only=True)
    model = build_model(payload["arch"], payload["num_classes"], payload["in_channels"])
    model.load_state_dict(payload["model"], strict=True)
    last = torch.load(smoke_run / "checkpoints/phase_i/smoke/default/last.pt", weights_only=True)
    assert last["epoch"] == last["config"]["train"]["epochs"] and "optimizer" in last


def test_tensorboard_events_are_readable(smoke_run):
    events = EventAccumulator(str(smoke_run / "run_summary/phase_i/smoke/default"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "test/top1", "test/few", "test/tail"):
        assert tag in tags, tags
    epochs = json.loads((smoke_run / "checkpoints/phase_i/smoke/default/results.json").read_text())["epochs"]
    assert [e.step for e in events.Scalars("test/top1")] == list(range(1, epochs + 1))


def test_test_mode_evaluates_the_best_checkpoint(smoke_run):
    run_script(SCRIPT, "--config", "smoke", "--device", "cpu", "--opts", "phase=test", cwd=smoke_run)
    out = json.loads((smoke_run / "checkpoints/phase_i/smoke/default/test_results.json").read_text())
    results = json.loads((smoke_run / "checkpoints/phase_i/smoke/default/results.json").read_text())
    assert out["top1"] == pytest.approx(results["top1"])  # best_model.pt is the model the run reports


def test_finished_run_is_not_overwritten(smoke_run):
    before = (smoke_run / "checkpoints/phase_i/smoke/default/last.pt").read_bytes()
    proc = run_script(SCRIPT, "--config", "smoke", "--device", "cpu", cwd=smoke_run, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert (smoke_run / "checkpoints/phase_i/smoke/default/last.pt").read_bytes() == before


def _final_weights(cwd: Path, note: str) -> dict:
    return torch.load(cwd / f"checkpoints/phase_i/smoke/{note}/last.pt", weights_only=True)["model"]


def test_killed_run_resumes_to_identical_weights(tmp_path):
    opts = ["--opts", "train.epochs=4"]
    run_script(SCRIPT, "--config", "smoke", "--device", "cpu", "--note", "straight", *opts, cwd=tmp_path)

    last = tmp_path / "checkpoints/phase_i/smoke/killed/last.pt"
    proc = subprocess.Popen(script_command(SCRIPT, "--config", "smoke", "--device", "cpu", "--note", "killed", *opts),
                            cwd=tmp_path, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and torch.load(last, weights_only=True)["epoch"] >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    interrupted_at = torch.load(last, weights_only=True)["epoch"]
    assert interrupted_at < 4, "the run finished before it could be killed; the test proves nothing"

    proc = run_script(SCRIPT, "--config", "smoke", "--device", "cpu", "--note", "killed", *opts, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr  # an interrupted run is not silently restarted
    run_script(SCRIPT, "--config", "smoke", "--device", "cpu", "--note", "killed", "--resume", *opts, cwd=tmp_path)
    straight, resumed = _final_weights(tmp_path, "straight"), _final_weights(tmp_path, "killed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize("args, fragment", [
    (["--config", "nope"], "Available phase_i configs"),
    (["--config", "smoke", "--opts", "train.lrr=1"], "Unknown config key 'train.lrr'"),
    (["--config", "smoke", "--opts", "train.batch_size=0"], "train.batch_size' must be >= 1"),
    (["--config", "smoke", "--opts", "dataset.imbalance=0.5"], "dataset.imbalance' must be >= 1"),
    (["--config", "smoke", "--opts", "eval.hr=0"], "eval.hr' must be in (0, 1]"),  # the hr of every phase
    (["--config", "smoke", "--resume"], "nothing to resume"),
    (["--config", "smoke", "--device", "gpu0"], "--device must be"),
    (["--config", "smoke", "--opts", "model.arch=resnet33"], "resnet32"),
    (["--config", "smoke", "--device", "cpu", "--opts", "accel.amp=fp16"], "accel.amp=fp16 needs a GPU"),
    (["--config", "smoke", "--opts", "accel.amp=fp8"], "accel.amp' must be one of auto, none, bf16, fp16"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, args, fragment):
    code, stderr = run_main_in_process(SCRIPT, *args, cwd=tmp_path)
    assert code == 2, stderr
    assert fragment in stderr and stderr.startswith("error: ")
    assert not (tmp_path / "checkpoints").exists()  # nothing half-made left behind


def test_bad_input_through_a_real_process(tmp_path):
    proc = run_script(SCRIPT, "--config", "nope", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Available phase_i configs" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_of_another_architecture_or_class_count(smoke_run, tmp_path):
    ckpt = str(smoke_run / "checkpoints/phase_i/smoke/default/best_model.pt")
    for opts, fragment in ((["model.arch=resnet20"], "arch=resnet8"), (["dataset.synthetic.num_classes=5"], "8 classes")):
        code, stderr = run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", "--checkpoint", ckpt, "--opts", "phase=test",
                                           *opts, cwd=tmp_path)
        assert code == 2 and fragment in stderr, stderr


def test_truncated_checkpoint(smoke_run, tmp_path):
    broken = tmp_path / "broken.pt"
    data = (smoke_run / "checkpoints/phase_i/smoke/default/best_model.pt").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    code, stderr = run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", "--checkpoint", str(broken), "--opts",
                                       "phase=test", cwd=tmp_path)
    assert code == 2 and "truncated or corrupt" in stderr


def test_bf16_autocast_and_channels_last_train_a_float32_model(tmp_path):
    opts = ("--opts", "train.epochs=2", "accel.amp=bf16", "accel.channels_last=true")
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", *opts, cwd=tmp_path)
    assert code == 0, err
    run_dir = tmp_path / "checkpoints/phase_i/smoke/default"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["finished"] and all(h["loss"] == h["loss"] and h["loss"] > 0 for h in results["history"])
    state = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())  # autocast leaves the weights float32
    from models import build_model

    build_model("resnet8", 8, 3).load_state_dict(state)


# ---------------------------------------------------------------- fp16 loss scaling across --resume

def _scaled_run(folder: Path, total: int, *, stop_before: int | None = None, resume: bool = False) -> tuple[dict, dict]:
    """A tiny model trained through the shared loop (engine.loops.fit) with an enabled GradScaler and the
    recorder of every training run; growth_interval=1, so the scale doubles at every step.

    Interrupted (KeyboardInterrupt) at the start of unit `stop_before`; `resume` continues from last.pt.
    Returns (model state, scaler state) at the end."""
    import logging

    from engine.loops import StepResult, TrainingTask, fit
    from engine.metrics import SCALAR_KEYS
    from engine.recorder import start_recording
    from utils.layout import RunPaths

    class Task(TrainingTask):
        step_name = "epoch"

        def __init__(self, model):
            self.model, self.total = model, total

        def begin(self, unit):
            if unit == stop_before:
                raise KeyboardInterrupt
            torch.manual_seed(unit)  # each unit's data depends on the unit only, as in every method

        def batches(self, unit):
            return [torch.randn(8, 4) for _ in range(3)]

        def step(self, x):
            return StepResult(self.model(x).pow(2).mean(), len(x))

        def evaluate(self):
            return {k: 0.0 for k in SCALAR_KEYS}, None

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=1)
    assert scaler.is_enabled()
    paths = RunPaths("phase_i", "scaled", "default", folder)
    paths.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    start, recorder = start_recording(paths, "resume" if resume else "fresh", logging.getLogger("test-scaler"),
                                      lambda **extra: {"model": model.state_dict(), **extra},
                                      restore=lambda state, path: model.load_state_dict(state["model"]),
                                      optimizer=optimizer, scaler=scaler, step_name="epoch", total_steps=total,
                                      command="cmd", select_on_val=False)
    try:
        fit(Task(model), optimizer, recorder, start=start, scaler=scaler)
    finally:
        recorder.writer.close()
    return {k: v.clone() for k, v in model.state_dict().items()}, scaler.state_dict()


def test_fp16_grad_scaler_state_round_trips_through_last_pt_on_resume(tmp_path):
    """fp16 needs a GPU (the config refuses it on the CPU), so the loop and the recorder are driven directly
    with an enabled CPU GradScaler: last.pt holds the scaler's state and --resume puts it back."""
    straight_model, straight_scaler = _scaled_run(tmp_path / "straight", total=4)
    assert straight_scaler["scale"] == 2.0 ** (4 + 4 * 3)  # 12 steps, each one doubling: the state is not trivial

    with pytest.raises(KeyboardInterrupt):
        _scaled_run(tmp_path / "killed", total=4, stop_before=2)
    last = torch.load(tmp_path / "killed/checkpoints/phase_i/scaled/default/last.pt", weights_only=True)
    assert last["epoch"] == 2 and "optimizer" in last
    assert last["scaler"]["scale"] == 2.0 ** (4 + 2 * 3) and last["scaler"]["_growth_tracker"] == 0

    resumed_model, resumed_scaler = _scaled_run(tmp_path / "killed", total=4, resume=True)
    assert resumed_scaler == straight_scaler  # a fresh scaler (scale 2**4) would end at 2**10
    for key in straight_model:
        assert torch.equal(straight_model[key], resumed_model[key]), key


def test_last_pt_has_no_scaler_entry_without_fp16(smoke_run):
    last = torch.load(smoke_run / "checkpoints/phase_i/smoke/default/last.pt", weights_only=True)
    assert "scaler" not in last and last["config"]["accel"]["amp"] == "auto"  # bf16 or float32: never fp16


def test_phase_i_passes_its_fp16_scaler_to_the_loop_and_last_pt(tmp_path, monkeypatch):
    """Phase I wiring: with accel.amp=fp16 (allowed on the CPU here by lifting the config's GPU check) the
    run's GradScaler scales the loss, is saved in last.pt, and a resumed run continues its state exactly."""
    from engine import phase_i
    from engine.accel import Accel

    def fp16_on_cpu(cls, section, device):
        return cls(device, (section or {}).get("amp", "none"))

    monkeypatch.setattr(Accel, "from_config", classmethod(fp16_on_cpu))
    opts = ["--opts", "train.epochs=2", "accel.amp=fp16", "dataset.synthetic.train_per_class=40",
            "dataset.synthetic.test_per_class=5"]
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", "--note", "straight", *opts,
                                    cwd=tmp_path)
    assert code == 0, err
    straight = torch.load(tmp_path / "checkpoints/phase_i/smoke/straight/last.pt", weights_only=True)
    steps = straight["scaler"]["_growth_tracker"]
    assert steps > 0 and straight["scaler"]["scale"] == 2.0 ** 16  # the default scaler, no overflow, 2 epochs of steps

    begin, epochs = phase_i.BackboneTraining.begin, []

    def interrupted_in_epoch_2(self, unit):
        epochs.append(unit)
        if unit == 1:
            raise KeyboardInterrupt
        return begin(self, unit)

    monkeypatch.setattr(phase_i.BackboneTraining, "begin", interrupted_in_epoch_2)
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", "--note", "killed", *opts,
                                    cwd=tmp_path)
    assert code == 130, err
    killed = torch.load(tmp_path / "checkpoints/phase_i/smoke/killed/last.pt", weights_only=True)
    assert killed["epoch"] == 1 and killed["scaler"]["_growth_tracker"] == steps // 2
    monkeypatch.setattr(phase_i.BackboneTraining, "begin", begin)
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", "--note", "killed", "--resume",
                                    *opts, cwd=tmp_path)
    assert code == 0, err
    resumed = torch.load(tmp_path / "checkpoints/phase_i/smoke/killed/last.pt", weights_only=True)
    assert resumed["scaler"] == straight["scaler"]  # not restarted from a fresh scaler (tracker steps // 2)
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key
