"""A new method from one file: a MapGenerator subclass plus one method-table entry is all it takes
for the phase III script, the config schema, the pipeline and the report to know it
(docs/ARCHITECTURE.md, "Adding a method")."""
import json

import pytest
import torch

from engine.methods import METHODS, Method
from fsa.generators import MapGenerator
from tests.helpers import copy_phase_i, run_main_in_process
from utils.config import load_config
from utils.errors import UserError


class TailJitter(MapGenerator):
    """A toy generator: `Na` copies of each real tail map with multiplicative Gaussian noise."""

    def extra_indices(self, tail_labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)  # needs no other sample's maps

    def generate(self, tail_maps, tail_cams, tail_labels, extra_maps, extra_cams, extra_labels, generator):
        copies = tail_maps.repeat_interleave(self.ctx.na, 0)
        noise = torch.randn(copies.shape, generator=generator).to(copies)
        return copies * (1 + 0.1 * noise), tail_labels.repeat_interleave(self.ctx.na)


JITTER = Method("jitter_offline", "Tail jitter (offline)", "FSA", "phase_iii", "maps", mode="offline",
                generator="jitter", implementation=f"{__name__}:TailJitter",
                consumes=("phase_i_model", "phase_ii_split", "phase_ii_store"), control="control_offline",
                summary="noisy copies of the real tail maps")


@pytest.fixture
def jitter():
    METHODS.register(JITTER)
    yield JITTER
    METHODS.unregister(JITTER.id)


def test_the_entry_gives_folder_command_schema_choice_and_help(jitter):
    assert jitter.folder == "phase_iii_offline-jitter"
    assert jitter.command("smoke", "default") == (
        "python phase_iii_offline_train_or_test.py --config smoke --opts finetune.generator=jitter")
    assert load_config("smoke", "phase_iii", ["finetune.generator=jitter"])["finetune"]["generator"] == "jitter"
    assert "jitter      Tail jitter (offline): noisy copies" in METHODS.help_text("offline")
    assert "jitter" not in METHODS.help_text("online")
    with pytest.raises(UserError, match="runs in phase III offline mode only"):
        METHODS.phase_iii("online", "jitter")
    assert (METHODS.arm("jitter_offline"), METHODS.arm("control_offline")) in METHODS.paired()


def test_without_the_entry_the_generator_is_refused():
    with pytest.raises(UserError, match="finetune.generator.*must be one of"):
        load_config("smoke", "phase_iii", ["finetune.generator=jitter"])


def test_clashing_entries_are_refused(jitter):
    with pytest.raises(ValueError, match="clashes"):
        METHODS.register(Method("jitter2", "x", "FSA", "phase_iii", "maps", mode="offline", generator="jitter"))


def test_the_pipeline_trains_it_and_the_report_shows_it_with_its_paired_control(jitter, smoke_phase_i, tmp_path):
    cwd = copy_phase_i(smoke_phase_i, tmp_path / "work")
    code, err = run_main_in_process("pipeline.py", "--config", "smoke", "--device", "cpu", "--opts",
                                    "finetune.iterations=10", "finetune.eval_every=10", "tailcalib.epochs=1", cwd=cwd)
    assert code == 0, err
    results = json.loads((cwd / "checkpoints/phase_iii_offline-jitter/smoke/default/results.json").read_text())
    assert results["finished"] and results["method"] == "jitter_offline" and results["generator"] == "jitter"
    assert results["iterations"] == 10 and [h["iteration"] for h in results["history"]] == [0, 10]
    report = json.loads((cwd / "reports/smoke/default/report.json").read_text())
    ids = [row["id"] for row in report["rows"]]
    assert ids == [m.id for m in METHODS if "fsa" in m.suites]  # the default suite in table order, the new method last
    row = next(r for r in report["rows"] if r["id"] == "jitter_offline")
    assert row["label"] == "Tail jitter (offline)" and row["metrics"]["top1"]["values"] == [results["top1"]]
    pairs = {(p["method"], p["reference"], p["metric"]) for p in report["paired"]}
    assert ("Tail jitter (offline)", "cRT control (offline, no fusion)", "top1") in pairs
    assert "| Tail jitter (offline) |" in (cwd / "reports/smoke/default/ablation.md").read_text()
