"""Phase I losses against hand-computed values, and their phase I methods (own run folders)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from engine.losses import LOSSES, build_loss
from engine.methods import METHODS
from tests.helpers import run_main_in_process
from utils.errors import UserError

COUNTS = [8, 2]  # prior 0.8 / 0.2


def test_logit_adjusted_loss_is_ce_on_logits_plus_tau_log_prior():
    logits, target = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([1, 0])
    for tau in (0.0, 0.5, 1.0, 2.0):
        adjusted = logits + tau * torch.tensor([math.log(0.8), math.log(0.2)])
        # cross-entropy by hand: -log softmax of the target
        by_hand = -sum(adjusted[i, target[i]] - torch.logsumexp(adjusted[i], 0) for i in range(2)) / 2
        torch.testing.assert_close(build_loss("la_loss", COUNTS, la_tau=tau)(logits, target), by_hand)
    torch.testing.assert_close(build_loss("la_loss", COUNTS, la_tau=0.0)(logits, target), F.cross_entropy(logits, target))
    # balanced softmax (Ren et al.) is the logit-adjusted loss at tau 1
    torch.testing.assert_close(build_loss("balanced_softmax", COUNTS)(logits, target),
                               build_loss("la_loss", COUNTS, la_tau=1.0)(logits, target))


def test_class_balanced_weights_follow_the_effective_number():
    beta = 0.9
    effective = [(1 - beta ** n) / (1 - beta) for n in COUNTS]
    weights = [1 / e for e in effective]
    expected = torch.tensor([w / sum(weights) * 2 for w in weights])
    torch.testing.assert_close(build_loss("class_balanced", COUNTS, cb_beta=beta).weight, expected)


def test_every_loss_is_a_phase_i_method_with_its_own_folder():
    assert {m.loss for m in METHODS.stage("phase_i")} == set(LOSSES)
    assert METHODS.phase_i("ce").folder == "phase_i"
    for loss in set(LOSSES) - {"ce"}:
        method = METHODS.phase_i(loss)
        assert method.folder == f"phase_i-{loss}" and method.group == "losses" and method.versus_baseline
        assert method.command("smoke", "default").endswith(f"--opts train.loss={loss}")
    with pytest.raises(UserError, match="no phase I method"):
        METHODS.phase_i("nope")


def test_a_phase_i_loss_variant_trains_into_its_own_folder(tmp_path):
    code, err = run_main_in_process("phase_i_train_or_test.py", "--config", "smoke", "--device", "cpu", "--opts",
                                    "train.loss=la_loss", "train.la_tau=0.5", "train.epochs=1", cwd=tmp_path)
    assert code == 0, err
    results = json.loads((tmp_path / "checkpoints/phase_i-la_loss/smoke/default/results.json").read_text())
    assert results["finished"] and results["method"] == "la_loss" and results["loss"] == "la_loss"
    assert not (tmp_path / "checkpoints/phase_i").exists()  # the CE run's folder is left alone
    ckpt = torch.load(tmp_path / "checkpoints/phase_i-la_loss/smoke/default/best_model.pt", weights_only=True)
    assert ckpt["phase"] == "phase_i-la_loss" and ckpt["config"]["train"]["la_tau"] == 0.5
