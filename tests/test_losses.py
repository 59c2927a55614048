"""Phase I losses against hand-computed values, and their phase I methods (own run folders)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from engine.losses import LOSSES, build_loss, class_balanced_weights, drw_start, ldam_margins
from utils.config import load_config
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


def _phase_i_cfg(*opts: str) -> dict:
    return load_config("smoke", "phase_i", list(opts))


def test_every_loss_is_a_phase_i_method_with_its_own_folder():
    assert {dict(m.settings).get("train.loss", "ce") for m in METHODS.stage("phase_i")} == set(LOSSES)
    assert METHODS.phase_i(_phase_i_cfg()).folder == "phase_i"
    for loss in set(LOSSES) - {"ce"}:
        method = next(m for m in METHODS.stage("phase_i") if dict(m.settings).get("train.loss") == loss)
        assert METHODS.phase_i(_phase_i_cfg(*method.selecting_opts())) is method  # its own opts select it
        assert method.folder == f"phase_i-{loss}" and method.group == "losses" and method.versus_baseline
        assert f"--opts train.loss={loss}" in method.command("smoke", "default")
    # a combination no method trains names the methods and their settings
    with pytest.raises(UserError, match="No phase I method .* trains train.loss=focal, model.classifier=cosine"):
        METHODS.phase_i(_phase_i_cfg("train.loss=focal", "model.classifier=cosine"))


def test_ldam_margins_and_deferred_weights_by_hand():
    counts = [100, 16, 1]
    margins = ldam_margins(counts, 0.5)
    # n^-1/4 = 0.3162, 0.5, 1 -> scaled so that the rarest class gets 0.5
    torch.testing.assert_close(margins, torch.tensor([0.5 * 100 ** -0.25, 0.5 * 16 ** -0.25, 0.5]))
    loss = build_loss("ldam_drw", counts, scale=30.0, ldam_max_margin=0.5, drw_epoch=3, cb_beta=0.99)
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 0])
    shifted = logits.clone()
    shifted[torch.arange(5), target] -= 30.0 * margins[target]  # s * m_y off the true class's logit only
    loss.set_epoch(2)  # before drw_epoch: unweighted
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(shifted, target))
    loss.set_epoch(3)  # from drw_epoch on: the effective-number weights
    weights = class_balanced_weights(counts, 0.99)
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(shifted, target, weight=weights))


def test_ldam_default_drw_epoch_is_80_percent_of_the_epochs():
    assert drw_start({"drw_epoch": None, "epochs": 200}) == 160 and drw_start({"drw_epoch": 7, "epochs": 200}) == 7
    assert build_loss("ldam_drw", [5, 1], epochs=10).drw_epoch == 8


def test_ldam_needs_a_fixed_scale_cosine_classifier():
    with pytest.raises(UserError, match="model.classifier=cosine model.scale=30 model.learn_scale=false"):
        _phase_i_cfg("train.loss=ldam_drw")
    ldam = METHODS.get("ldam_drw")
    cfg = _phase_i_cfg(*ldam.selecting_opts())
    assert METHODS.phase_i(cfg) is ldam and cfg["model"]["scale"] == 30.0 and cfg["model"]["learn_scale"] is False


def test_a_phase_i_loss_variant_trains_into_its_own_folder(tmp_path):
    code, err = run_main_in_process("phase_i_train_or_test.py", "--config", "smoke", "--device", "cpu", "--opts",
                                    "train.loss=la_loss", "train.la_tau=0.5", "train.epochs=1", cwd=tmp_path)
    assert code == 0, err
    results = json.loads((tmp_path / "checkpoints/phase_i-la_loss/smoke/default/results.json").read_text())
    assert results["finished"] and results["method"] == "la_loss" and results["loss"] == "la_loss"
    assert not (tmp_path / "checkpoints/phase_i").exists()  # the CE run's folder is left alone
    ckpt = torch.load(tmp_path / "checkpoints/phase_i-la_loss/smoke/default/best_model.pt", weights_only=True)
    assert ckpt["phase"] == "phase_i-la_loss" and ckpt["config"]["train"]["la_tau"] == 0.5
