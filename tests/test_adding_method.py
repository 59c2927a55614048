"""A new phase III method with its own hyper-parameter from one file (tests/extensions/tail_jitter.py:
a MapGenerator, its config section, its entry) plus one registration: the phase III script, the config
schema, --help, the pipeline and the report know it (docs/ARCHITECTURE.md, "Adding a phase III method")."""
import json

import pytest
import torch

from engine.methods import METHODS, phase_iii_help
from engine.methods.maps import MapMethod
from fsa.generators import GeneratorContext
from tests.extensions.tail_jitter import TAIL_JITTER, TailJitter
from tests.helpers import copy_phase_i, run_main_in_process
from utils.config import load_config
from utils.errors import UserError


@pytest.fixture
def jitter():
    METHODS.register(TAIL_JITTER)
    yield TAIL_JITTER
    METHODS.unregister(TAIL_JITTER.id)  # other tests see the project's methods only


def test_the_entry_gives_folder_command_schema_section_choice_and_help(jitter):
    assert jitter.folder == "phase_iii_offline-jitter"
    assert jitter.command("smoke", "default") == (
        "python phase_iii_offline_train_or_test.py --config smoke --opts finetune.generator=jitter")
    cfg = load_config("smoke", "phase_iii", ["finetune.generator=jitter", "jitter.noise=0.3"])
    assert cfg["finetune"]["generator"] == "jitter" and jitter.options(cfg) == {"noise": 0.3}
    with pytest.raises(UserError, match="jitter.noise"):
        load_config("smoke", "phase_iii", ["jitter.noise=-1"])  # its section's range is checked like any key's
    assert "jitter      Tail jitter (offline): noisy copies" in phase_iii_help("offline")
    assert "jitter: tail jitter: multiplicative noise of the copies; noise=0.1" in phase_iii_help("offline")
    assert "jitter" not in phase_iii_help("online")
    with pytest.raises(UserError, match="runs in phase III offline mode only"):
        METHODS.phase_iii("online", "jitter")
    assert (METHODS.arm("jitter_offline"), METHODS.arm("control_offline")) in METHODS.paired()
    assert jitter.reads("jitter") and not METHODS.get("fsa_offline").reads("jitter")  # sweep.py collapses it for others


def test_without_the_entry_its_generator_and_section_are_refused():
    with pytest.raises(UserError, match="finetune.generator.*must be one of"):
        load_config("smoke", "phase_iii", ["finetune.generator=jitter"])
    with pytest.raises(UserError, match="jitter"):
        load_config("smoke", "phase_iii", ["jitter.noise=0.3"])


def test_clashing_entries_are_refused(jitter):
    with pytest.raises(ValueError, match="clashes"):
        METHODS.register(MapMethod(id="jitter2", label="x", group="FSA", mode="offline", generator="jitter",
                                   implementation=TAIL_JITTER.implementation))
    with pytest.raises(ValueError, match="another family"):
        METHODS.register(MapMethod(id="jitter3", label="x", group="FSA", mode="online", generator="jitter3",
                                   implementation=TAIL_JITTER.implementation, section=type(TAIL_JITTER.section)(
                                       "jitter", {}, "a second jitter section")))


def test_the_generator_receives_its_own_setting():
    def copies(noise: float) -> torch.Tensor:
        ctx = GeneratorContext(labels=torch.zeros(4, dtype=torch.long), confusing=torch.zeros(1, 1, dtype=torch.long),
                               composer=None, na=2, ts=0.8, tg=0.2, options={"noise": noise})
        maps = torch.ones(3, 2, 2, 2)
        rows, labels = TailJitter(ctx).generate(maps, None, torch.tensor([0, 1, 2]), None, None, None,
                                                torch.Generator().manual_seed(0))
        assert labels.tolist() == [0, 0, 1, 1, 2, 2]
        return rows

    assert torch.equal(copies(0.0), torch.ones(6, 2, 2, 2))
    assert copies(0.5).std() > 2 * copies(0.1).std() > 0


def test_the_pipeline_trains_it_with_its_setting_and_the_report_shows_it(jitter, smoke_phase_i, tmp_path):
    cwd = copy_phase_i(smoke_phase_i, tmp_path / "work")
    code, err = run_main_in_process("pipeline.py", "--config", "smoke", "--device", "cpu", "--opts",
                                    "finetune.iterations=10", "finetune.eval_every=10", "tailcalib.epochs=1",
                                    "jitter.noise=0.3", cwd=cwd)
    assert code == 0, err
    results = json.loads((cwd / "checkpoints/phase_iii_offline-jitter/smoke/default/results.json").read_text())
    assert results["finished"] and results["method"] == "jitter_offline" and results["generator"] == "jitter"
    assert results["method_options"] == {"noise": 0.3}
    assert results["iterations"] == 10 and [h["iteration"] for h in results["history"]] == [0, 10]
    report = json.loads((cwd / "reports/smoke/default/report.json").read_text())
    ids = [row["id"] for row in report["rows"]]
    assert ids == [m.id for m in METHODS if "fsa" in m.suites]  # the default suite in table order, the new method last
    row = next(r for r in report["rows"] if r["id"] == "jitter_offline")
    assert row["label"] == "Tail jitter (offline)" and row["metrics"]["top1"]["values"] == [results["top1"]]
    pairs = {(p["method"], p["reference"], p["metric"]) for p in report["paired"]}
    assert ("Tail jitter (offline)", "cRT control (offline, no fusion)", "top1") in pairs
    assert "| Tail jitter (offline) |" in (cwd / "reports/smoke/default/ablation.md").read_text()
