"""A new backbone from one file: a builder (tests/extensions/tiny_backbone.py) plus one ``register_model``
call is all it takes for the config schema, every step of the pipeline and the report to run on it
(docs/ARCHITECTURE.md, "Adding a backbone")."""
import json

import pytest
import torch

from models import MODELS, build_model, register_model, unregister_model
from tests.extensions.tiny_backbone import NAME, build_tiny_cnn
from tests.helpers import run_main_in_process
from utils.config import load_config
from utils.errors import UserError

# a short chain: the test is about the backbone reaching every step, not about accuracy
PHASE_I_OPTS = (f"model.arch={NAME}", "train.epochs=2")
PHASE_III_OPTS = ("finetune.iterations=10", "finetune.eval_every=10", "tailcalib.epochs=1")


@pytest.fixture
def tiny_cnn():
    register_model(NAME, build_tiny_cnn)
    yield NAME
    unregister_model(NAME)  # other tests see the project's backbones only


def test_the_schema_takes_the_arch_only_while_it_is_registered(tiny_cnn):
    assert load_config("smoke", "phase_i", [f"model.arch={NAME}"])["model"]["arch"] == NAME
    unregister_model(NAME)
    try:
        with pytest.raises(UserError, match=f"model.arch' must be one of .*got '{NAME}'"):
            load_config("smoke", "phase_i", [f"model.arch={NAME}"])
    finally:
        register_model(NAME, build_tiny_cnn)


def test_a_name_is_registered_once(tiny_cnn):
    with pytest.raises(ValueError, match="already registered"):
        register_model(NAME, build_tiny_cnn)
    assert MODELS[NAME] is build_tiny_cnn


def test_the_pipeline_trains_it_and_the_report_shows_it(tiny_cnn, tmp_path):
    code, err = run_main_in_process("pipeline.py", "--config", "smoke", "--device", "cpu", "--opts", *PHASE_I_OPTS,
                                    *PHASE_III_OPTS, cwd=tmp_path)
    assert code == 0, err
    run = tmp_path / "checkpoints/phase_i/smoke/default"
    results = json.loads((run / "results.json").read_text())
    assert results["finished"]

    payload = torch.load(run / "best_model.pt", weights_only=True)
    assert payload["arch"] == NAME and payload["config"]["model"]["arch"] == NAME
    # the checkpoint's arch rebuilds a model its weights fit exactly ...
    build_model(payload["arch"], payload["num_classes"], payload["in_channels"]).load_state_dict(payload["model"])
    # ... and phase III, which rebuilt the backbone so, scores it at iteration 0 as phase I did
    fsa_offline = json.loads((tmp_path / "checkpoints/phase_iii_offline/smoke/default/results.json").read_text())
    assert fsa_offline["history"][0]["iteration"] == 0 and fsa_offline["history"][0]["top1"] == results["top1"]

    report = json.loads((tmp_path / "reports/smoke/default/report.json").read_text())
    baseline = next(row for row in report["rows"] if row["id"] == "ce")
    assert baseline["metrics"]["top1"]["values"] == [results["top1"]]
    # the phase III methods ran on the tiny backbone: their rows have numbers too
    assert len(report["rows"]) > 1 and all(row["metrics"]["top1"]["values"] for row in report["rows"])
