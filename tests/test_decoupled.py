"""Decoupled classifiers on the frozen phase I backbone (engine/phase_iii_decoupled.py): hand-computed
oracles for post-hoc logit adjustment, tau-normalisation, LWS and cRT's class-balanced sampling, then
the four methods end to end on a smoke run with a validation split."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from datasets.loader import class_balanced_indices
from engine.phase_iii_decoupled import (BalancedTraining, ScaledClassifier, adjusted_bias,
                                        log_prior, tau_normalized_weight)
from tests.helpers import copy_phase_i, run_main_in_process, run_script

COUNTS = [60, 30, 6, 4]


def test_post_hoc_adjustment_is_argmax_of_logits_minus_tau_log_prior():
    fc = nn.Linear(3, 4)
    z = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    prior = torch.tensor([60 / 100, 30 / 100, 6 / 100, 4 / 100])
    torch.testing.assert_close(log_prior(COUNTS), prior.log())
    for tau in (0.0, 1.0, 1.5):
        adjusted = nn.functional.linear(z, fc.weight, adjusted_bias(fc, COUNTS, tau))
        expected = fc(z).detach() - tau * prior.log()
        torch.testing.assert_close(adjusted.detach(), expected)
    # tau = 1 moves predictions towards the rare classes
    moved = nn.functional.linear(z, fc.weight, adjusted_bias(fc, COUNTS, 1.0)).argmax(1)
    assert (moved >= 2).sum() >= (fc(z).argmax(1) >= 2).sum()


def test_tau_normalisation_divides_each_row_by_its_norm_to_the_tau():
    fc = nn.Linear(2, 2)
    fc.weight.data = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # row norms 5 and 2
    torch.testing.assert_close(tau_normalized_weight(fc, 1.0), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(tau_normalized_weight(fc, 0.0), fc.weight.detach())
    torch.testing.assert_close(tau_normalized_weight(fc, 0.5),
                               torch.tensor([[3 / math.sqrt(5), 4 / math.sqrt(5)], [0.0, 2 / math.sqrt(2)]]))


def test_class_balanced_sampling_draws_classes_uniformly():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 9 + [3] * 1)
    picks = class_balanced_indices(labels, 5, 40_000, torch.Generator().manual_seed(1))  # class 4 has no sample
    share = torch.bincount(labels[picks], minlength=5).double() / len(picks)
    torch.testing.assert_close(share[:4], torch.full((4,), 0.25, dtype=torch.float64), atol=0.01, rtol=0)
    assert share[4] == 0
    # within a class, every sample is drawn alike (class 2: 9 samples, ~1111 draws each)
    within = torch.bincount(picks[labels[picks] == 2] - 990, minlength=9).double()
    assert within.min() > 0.8 * within.mean()
    again = class_balanced_indices(labels, 5, 40_000, torch.Generator().manual_seed(1))
    assert torch.equal(picks, again)


def test_lws_trains_only_the_scales_and_folds_into_a_linear_classifier():
    fc = nn.Linear(3, 4)
    weight, bias = fc.weight.detach().clone(), fc.bias.detach().clone()
    lws = ScaledClassifier(fc)
    data = (torch.randn(100, 3, generator=torch.Generator().manual_seed(2)),
            torch.tensor([0] * 60 + [1] * 30 + [2] * 6 + [3] * 4))
    task = BalancedTraining(lws, data, data, None, train_counts=COUNTS, hr=0.9, seed=0, epochs=1, batch_size=16,
                            lr=0.5, progress={"total_steps": 0}, shuffle_stream="decoupled.sample")
    optimizer = torch.optim.SGD([lws.scales], lr=0.5)
    for batch in task.batches(0):
        out = task.step(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert torch.equal(lws.weight, weight) and torch.equal(lws.bias, bias)  # frozen
    assert not torch.equal(lws.scales.detach(), torch.ones(4))
    folded_w, folded_b = lws.folded()
    z = data[0][:5]
    torch.testing.assert_close(nn.functional.linear(z, folded_w, folded_b), lws(z).detach())


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def with_val(tmp_path_factory) -> Path:
    """A short smoke phase I with a validation split held out of the training set, and phase II."""
    cwd = tmp_path_factory.mktemp("decoupled")
    run_script("phase_i_train_or_test.py", "--config", "smoke", "--device", "cpu", "--opts", "train.epochs=3",
               "dataset.val.source=train", "dataset.val.fraction=0.2", cwd=cwd)
    run_script("phase_ii_extract_feature.py", "--config", "smoke", "--device", "cpu", cwd=cwd)
    return cwd


def _run(cwd: Path, generator: str, *opts: str) -> dict:
    code, err = run_main_in_process("phase_iii_offline_train_or_test.py", "--config", "smoke", "--device", "cpu",
                                    "--opts", f"finetune.generator={generator}", *opts, cwd=cwd)
    assert code == 0, err
    return json.loads((cwd / f"checkpoints/phase_iii_offline-{generator}/smoke/default/results.json").read_text())


def _store_features(cwd: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from fsa.feature_store import FeatureStore

    store = FeatureStore(cwd / "features/smoke/default/store")
    return store.test_pooled(), store.test_labels()


def test_post_hoc_methods_choose_tau_on_validation_and_report_its_test_numbers(with_val):
    from engine.metrics import classification_report

    phase_i = json.loads((with_val / "checkpoints/phase_i/smoke/default/results.json").read_text())
    for generator in ("la_posthoc", "tau_norm"):
        results = _run(with_val, generator, "decoupled.tau_grid=[0.0, 0.5, 1.0, 1.5]")
        scores = results["tau_val_mean_class_acc"]
        assert results["tau_chosen_by"] == "validation" and set(scores) == {"0", "0.5", "1", "1.5"}
        assert scores[f"{results['tau']:g}"] == max(scores.values())
        assert results["checkpoint_selection"]["by"] == "val" and results["method"] == generator
        # the checkpoint is a standard model: its fc on the stored test features gives the reported numbers
        ckpt = torch.load(with_val / f"checkpoints/phase_iii_offline-{generator}/smoke/default/best_model.pt",
                          weights_only=True)
        assert ckpt["tau"] == results["tau"]
        z, y = _store_features(with_val)
        preds = nn.functional.linear(z, ckpt["model"]["fc.weight"], ckpt["model"]["fc.bias"]).argmax(1)
        assert classification_report(preds, y, phase_i["train_counts"], 0.9)["top1"] == results["top1"]
        if generator == "la_posthoc" and results["tau"] == 0:  # tau 0 is the phase I classifier itself
            assert results["top1"] == pytest.approx(phase_i["top1"])


def test_fixed_tau_without_validation_split(smoke_phase_i, tmp_path):
    cwd = copy_phase_i(smoke_phase_i, tmp_path / "work")  # the smoke run has no validation split
    run_script("phase_ii_extract_feature.py", "--config", "smoke", "--device", "cpu", cwd=cwd)
    results = _run(cwd, "la_posthoc", "decoupled.tau=0.75")
    assert results["tau"] == 0.75 and results["tau_chosen_by"] == "fixed (no validation split)"
    assert results["tau_val_mean_class_acc"] == {} and results["checkpoint_selection"]["by"] == "final"


def test_lws_and_crt_train_on_class_balanced_batches(with_val):
    lws = _run(with_val, "lws", "decoupled.epochs=2", "decoupled.batch_size=64")
    crt = _run(with_val, "crt", "decoupled.epochs=2", "decoupled.batch_size=64")
    p1 = torch.load(with_val / "checkpoints/phase_i/smoke/default/best_model.pt", weights_only=True)["model"]
    for results, generator in ((lws, "lws"), (crt, "crt")):
        assert results["epochs"] == 2 and [h["epoch"] for h in results["history"]] == [1, 2]
        assert results["samples_seen"] == 2 * results["train_samples"]
        assert results["checkpoint_selection"]["by"] == "val"
        last = torch.load(with_val / f"checkpoints/phase_iii_offline-{generator}/smoke/default/last.pt",
                          weights_only=True)
        # the backbone is untouched; only the classifier changed
        for key, value in p1.items():
            if not key.startswith("fc."):
                assert torch.equal(last["model"][key], value), key
        assert not torch.equal(last["model"]["fc.weight"], p1["fc.weight"])
    scales = torch.load(with_val / "checkpoints/phase_iii_offline-lws/smoke/default/last.pt", weights_only=True)["scales"]
    lws_fc = torch.load(with_val / "checkpoints/phase_iii_offline-lws/smoke/default/last.pt", weights_only=True)["model"]
    torch.testing.assert_close(lws_fc["fc.weight"], scales[:, None] * p1["fc.weight"])  # LWS: rows only rescaled
