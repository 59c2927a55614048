"""Phase I losses and re-weighting schedules against hand-computed values, and their phase I methods (own run
folders)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.losses import LOSSES, build_loss, class_balanced_weights, ldam_margins
from engine.reweighting import build_reweighting, drw_start
from models import build_classifier
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
    assert {dict(m.settings).get("train.loss", "ce") for m in METHODS.backbones()} == set(LOSSES)
    assert METHODS.phase_i(_phase_i_cfg()).folder == "phase_i"
    for loss in set(LOSSES) - {"ce"}:
        method = next(m for m in METHODS.backbones() if dict(m.settings).get("train.loss") == loss)
        assert METHODS.phase_i(_phase_i_cfg(*method.selecting_opts())) is method  # its own opts select it
        # its own folder, named after the loss (ldam: ldam_drw, the loss with train.reweight=drw)
        assert method.folder == f"phase_i-{method.id}" and method.id.startswith(loss)
        assert method.group == "losses" and method.versus_baseline
        assert f"--opts train.loss={loss}" in method.command("smoke", "default")
    # a combination no method trains names the methods and their settings
    with pytest.raises(UserError,
                       match="No phase I method .* trains train.loss=focal, train.reweight=none, model.classifier=cosine"):
        METHODS.phase_i(_phase_i_cfg("train.loss=focal", "model.classifier=cosine"))


def test_ldam_margins_and_deferred_weights_by_hand():
    counts = [100, 16, 1]
    margins = ldam_margins(counts, 0.5)
    # n^-1/4 = 0.3162, 0.5, 1 -> scaled so that the rarest class gets 0.5
    torch.testing.assert_close(margins, torch.tensor([0.5 * 100 ** -0.25, 0.5 * 16 ** -0.25, 0.5]))
    loss = build_loss("ldam", counts, scale=30.0, ldam_max_margin=0.5)
    drw = build_reweighting("drw", counts, drw_epoch=3, cb_beta=0.99)
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 0])
    shifted = logits.clone()
    shifted[torch.arange(5), target] -= 30.0 * margins[target]  # s * m_y off the true class's logit only
    loss.set_class_weights(drw(2))  # before drw_epoch: unweighted
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(shifted, target))
    loss.set_class_weights(drw(3))  # from drw_epoch on: the effective-number weights
    weights = class_balanced_weights(counts, 0.99)
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(shifted, target, weight=weights))


def test_ldam_default_drw_epoch_is_80_percent_of_the_epochs():
    assert drw_start({"drw_epoch": None, "epochs": 200}) == 160 and drw_start({"drw_epoch": 7, "epochs": 200}) == 7
    drw = build_reweighting("drw", [5, 1], epochs=10)  # drw_epoch null: from epoch 8 of 10 on
    assert drw(7) is None and torch.equal(drw(8), class_balanced_weights([5, 1], 0.9999))


def test_ldam_needs_the_fixed_scale_normed_classifier():
    with pytest.raises(UserError, match="model.classifier=normed model.scale=30 model.learn_scale=false"):
        _phase_i_cfg("train.loss=ldam")
    with pytest.raises(UserError, match="model.classifier=normed"):  # the biased cosine of CosineCE does not do
        _phase_i_cfg("train.loss=ldam", "model.classifier=cosine", "model.scale=30", "model.learn_scale=false")
    ldam = METHODS.get("ldam_drw")
    cfg = _phase_i_cfg(*ldam.selecting_opts())
    assert METHODS.phase_i(cfg) is ldam and cfg["model"]["classifier"] == "normed"
    assert cfg["model"]["scale"] == 30.0 and cfg["model"]["learn_scale"] is False
    assert (cfg["train"]["loss"], cfg["train"]["reweight"]) == ("ldam", "drw")
    assert METHODS.phase_i(_phase_i_cfg("model.classifier=cosine")).id == "cosine_ce"
    # the loss's old name, which held the re-weighting too, names the new spelling
    with pytest.raises(UserError,
                       match="train.loss=ldam_drw was renamed: LDAM-DRW is train.loss=ldam train.reweight=drw"):
        _phase_i_cfg("train.loss=ldam_drw", "model.classifier=normed", "model.scale=30", "model.learn_scale=false")


# ------------------------------------------------------------------------------------------------
# Against the releases, transcribed in numpy (float64)
# ------------------------------------------------------------------------------------------------
def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _ce_none(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -_log_softmax(z)[np.arange(len(y)), y]


def release_focal(z: np.ndarray, y: np.ndarray, gamma: float) -> float:
    """kaidic/LDAM-DRW losses.py focal_loss(F.cross_entropy(input, target, reduction='none'), gamma):
    p = exp(-l); ((1 - p) ** gamma * l).mean()."""
    l = _ce_none(z, y)
    return float(((1 - np.exp(-l)) ** gamma * l).mean())


def release_cb_weights(counts: list[int], beta: float) -> np.ndarray:
    """richardaecn/class-balanced-loss src/cifar_main.py: (1 - beta) / (1 - beta ** n), / sum * number of classes."""
    w = (1.0 - beta) / (1.0 - np.power(beta, np.array(counts, dtype=np.float64)))
    return w / w.sum() * len(counts)


def release_cb_softmax(z: np.ndarray, y: np.ndarray, counts: list[int], beta: float) -> float:
    """src/cifar_main.py _tower_fn, loss_type 'softmax': tf.losses.softmax_cross_entropy(one_hot, logits,
    weights=w_y), default reduction SUM_BY_NONZERO_WEIGHTS = sum(w_y l) / #(w_y != 0), then reduce_mean."""
    w = release_cb_weights(counts, beta)[y]
    return float((w * _ce_none(z, y)).sum() / np.count_nonzero(w))


def release_ldam(cos: np.ndarray, y: np.ndarray, counts: list[int], max_m: float, s: float,
                 weight: np.ndarray | None) -> float:
    """kaidic/LDAM-DRW losses.py LDAMLoss on NormedLinear's cos: m_list = 1 / sqrt(sqrt(n)) * max_m / max;
    output = where(one_hot, x - m_y, x); F.cross_entropy(s * output, target, weight) (mean: sum w_y l / sum w_y)."""
    m_list = 1.0 / np.sqrt(np.sqrt(np.array(counts, dtype=np.float64)))
    m_list = m_list * (max_m / np.max(m_list))
    index = np.zeros_like(cos, dtype=bool)
    index[np.arange(len(y)), y] = True
    output = np.where(index, cos - m_list[y][:, None], cos)
    l = _ce_none(s * output, y)
    w = np.ones(len(counts)) if weight is None else weight
    return float((w[y] * l).sum() / w[y].sum())


Z = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])  # 2 samples x 3 classes
Y = np.array([0, 1])


def test_focal_loss_by_hand_and_against_the_ldam_release():
    # sample 0: p_0 = e^2 / (e^2 + e^0.5 + e^-1); sample 1: p_1 = e^0.2 / (e^0.1 + e^0.2 + e^3)
    p = [math.exp(2) / (math.exp(2) + math.exp(0.5) + math.exp(-1)),
         math.exp(0.2) / (math.exp(0.1) + math.exp(0.2) + math.exp(3))]
    for gamma in (0.0, 1.0, 2.0):
        by_hand = sum(-((1 - q) ** gamma) * math.log(q) for q in p) / 2
        loss = float(build_loss("focal", [5, 3, 1], focal_gamma=gamma)(torch.tensor(Z), torch.tensor(Y)))
        assert math.isclose(loss, by_hand, rel_tol=1e-9)
        assert math.isclose(loss, release_focal(Z, Y, gamma), rel_tol=1e-9)
    # the default is the LDAM-DRW release's focal baseline, gamma = 1 (cifar_train.py FocalLoss(..., gamma=1))
    assert build_loss("focal", [5, 3, 1]).gamma == 1.0
    assert math.isclose(float(build_loss("focal", [5, 3, 1])(torch.tensor(Z), torch.tensor(Y))),
                        release_focal(Z, Y, 1.0), rel_tol=1e-9)


def test_class_balanced_loss_is_cui_et_al_batch_mean_by_default():
    counts, beta = [100, 10, 1], 0.99
    logits, target = torch.tensor(Z), torch.tensor(Y)
    weights = release_cb_weights(counts, beta)
    np.testing.assert_allclose(class_balanced_weights(counts, beta).double().numpy(), weights, rtol=1e-6)
    assert math.isclose(weights.sum(), 3.0)  # normalised to sum to the number of classes
    loss = float(build_loss("class_balanced", counts, cb_beta=beta)(logits, target))
    assert math.isclose(loss, release_cb_softmax(Z, Y, counts, beta), rel_tol=1e-6)
    # by hand: mean over the 2 samples of w_y * l
    l = _ce_none(Z, Y)
    assert math.isclose(loss, (weights[0] * l[0] + weights[1] * l[1]) / 2, rel_tol=1e-6)
    # the named variant: PyTorch's weighted mean, sum(w_y l) / sum(w_y) (the LDAM-DRW release's Reweight)
    variant = float(build_loss("class_balanced", counts, cb_beta=beta, cb_reduction="weighted_mean")(logits, target))
    assert math.isclose(variant, (weights[0] * l[0] + weights[1] * l[1]) / (weights[0] + weights[1]), rel_tol=1e-6)
    assert not math.isclose(loss, variant, rel_tol=1e-3)  # the two averages differ on this batch
    with pytest.raises(UserError, match="cb_reduction"):
        _phase_i_cfg("train.loss=class_balanced", "train.cb_reduction=sum")


def test_ldam_drw_on_the_normed_classifier_matches_the_release():
    counts, s, max_m = [100, 16, 1], 30.0, 0.5
    torch.manual_seed(0)
    fc = build_classifier("normed", 4, 3, scale=s, learn_scale=False)
    # a head-heavy batch: with every class equally often, sum of w_y = N (the weights sum to C) and the two
    # averages of DRW would agree
    features, target = torch.randn(6, 4).abs().double(), torch.tensor([0, 0, 0, 1, 2, 0])
    fc = fc.double()
    logits = fc(features).detach()  # s * cos, no bias
    # the release's NormedLinear on a weight [in, out] = our weight transposed, normalised along dim 0
    x, w = features.numpy(), fc.weight.detach().numpy().T
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    np.testing.assert_allclose(logits.numpy(), s * cos, rtol=1e-12)
    loss = build_loss("ldam", counts, scale=s, ldam_max_margin=max_m)
    deferred = build_reweighting("drw", counts, drw_epoch=160, cb_beta=0.9999)
    loss.set_class_weights(deferred(159))  # the release: idx = epoch // 160 -> betas[0] = 0 -> all-one weights
    assert math.isclose(float(loss(logits, target)), release_ldam(cos, target.numpy(), counts, max_m, s, None),
                        rel_tol=1e-6)  # (margins are float32)
    loss.set_class_weights(deferred(160))  # betas[1] = 0.9999, weighted CE averaged by the batch's sum of weights
    drw = release_cb_weights(counts, 0.9999)
    assert math.isclose(float(loss(logits, target)), release_ldam(cos, target.numpy(), counts, max_m, s, drw),
                        rel_tol=1e-6)
    # by hand for one sample of the rarest class: its logit loses s * max_m = 15
    one = torch.tensor([[0.2, 0.1, 0.9]], dtype=torch.float64) * s
    shifted = [6.0, 3.0, 27.0 - 15.0]
    by_hand = -(shifted[2] - math.log(sum(math.exp(v) for v in shifted)))
    loss.set_class_weights(deferred(0))
    assert math.isclose(float(loss(one, torch.tensor([2]))), by_hand, rel_tol=1e-9)


def test_balanced_softmax_and_logit_adjusted_loss_match_their_releases():
    counts = [100, 10, 1]
    logits, target = torch.tensor(Z), torch.tensor(Y)
    # jiawei-ren/BalancedMetaSoftmax-Classification loss/BalancedSoftmaxLoss.py: CE(logits + log(sample_per_class))
    release = float(_ce_none(Z + np.log(np.array(counts, dtype=np.float64)), Y).mean())
    assert math.isclose(float(build_loss("balanced_softmax", counts)(logits, target)), release, rel_tol=1e-6)
    # google-research logit_adjustment/utils.py build_loss_fn: CE(logits + log(base_probs ** tau + 1e-12)), batch mean
    prior = np.array(counts, dtype=np.float64) / sum(counts)
    for tau in (1.0, 0.5):
        release = float(_ce_none(Z + np.log(prior ** tau + 1e-12), Y).mean())
        assert math.isclose(float(build_loss("la_loss", counts, la_tau=tau)(logits, target)), release, rel_tol=1e-6)


def test_a_phase_i_loss_variant_trains_into_its_own_folder(tmp_path):
    code, err = run_main_in_process("phase_i_train_or_test.py", "--config", "smoke", "--device", "cpu", "--opts",
                                    "train.loss=la_loss", "train.la_tau=0.5", "train.epochs=1", cwd=tmp_path)
    assert code == 0, err
    results = json.loads((tmp_path / "checkpoints/phase_i-la_loss/smoke/default/results.json").read_text())
    assert results["finished"] and results["method"] == "la_loss" and results["loss"] == "la_loss"
    assert not (tmp_path / "checkpoints/phase_i").exists()  # the CE run's folder is left alone
    ckpt = torch.load(tmp_path / "checkpoints/phase_i-la_loss/smoke/default/best_model.pt", weights_only=True)
    assert ckpt["phase"] == "phase_i-la_loss" and ckpt["config"]["train"]["la_tau"] == 0.5
