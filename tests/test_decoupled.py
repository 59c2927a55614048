"""Decoupled classifiers on the frozen phase I backbone (engine/phase_iii_decoupled.py): hand-computed
oracles for post-hoc logit adjustment, tau-normalisation, LWS, the classifier-balancing release's
class-aware sampler and cosine schedule, then the four methods end to end on a smoke run with a
validation split."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from datasets.loader import class_balanced_indices, fresh_class_aware_indices
from engine.methods import METHODS
from engine.phase_iii_decoupled import (BalancedTraining, ScaledClassifier, adjusted_bias, epoch_lr, epoch_rows, log_prior, tau_normalized_weight)
from utils.fields import defaults
from utils.schema import SCHEMAS
from utils.seeding import stream_seed
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


def _release_class_aware_oracle(picks: torch.Tensor, labels: torch.Tensor, k: int) -> None:
    """Checks that `picks` is a possible output of the release's ClassAwareSampler (data/ClassAwareSampler.py,
    written here independently in plain Python): runs of `k` rows of one class; the runs' classes, cut into
    cycles of the C present classes, each a permutation of them; each class's rows, cut into pieces of its
    size, each a permutation of its samples (the last piece: distinct samples of it)."""
    picks, labels = picks.tolist(), labels.tolist()
    members: dict[int, set[int]] = {}
    for i, c in enumerate(labels):
        members.setdefault(c, set()).add(i)
    runs = [picks[i:i + k] for i in range(0, len(picks), k)]
    run_classes = []
    for run in runs:
        classes = {labels[i] for i in run}
        assert len(classes) == 1, f"a run of {k} mixes classes {classes}"
        run_classes.append(classes.pop())
    C = len(members)
    for start in range(0, len(run_classes), C):
        cycle = run_classes[start:start + C]
        assert len(set(cycle)) == len(cycle), f"cycle {cycle} visits a class twice"
        if len(cycle) == C:
            assert set(cycle) == set(members)
    for c, mine in members.items():
        stream = [i for i in picks if labels[i] == c]
        n = len(mine)
        for start in range(0, len(stream), n):
            piece = stream[start:start + n]
            assert len(set(piece)) == len(piece) and set(piece) <= mine, f"class {c}: {piece} is no permutation"
            if len(piece) == n:
                assert set(piece) == mine


def test_class_aware_sampler_is_the_release_sampler():
    labels = torch.tensor([0] * 7 + [1] * 3 + [3] * 1 + [4] * 2 + [2] * 5)[torch.randperm(18, generator=torch.Generator().manual_seed(3))]
    for seed, n, k in ((0, 64, 4), (1, 37, 4), (2, 50, 3), (3, 18, 1)):
        picks = fresh_class_aware_indices(labels, n, k, torch.Generator().manual_seed(seed))
        assert picks.shape == (n,) and picks.dtype == torch.long
        _release_class_aware_oracle(picks, labels, k)
        assert torch.equal(picks, fresh_class_aware_indices(labels, n, k, torch.Generator().manual_seed(seed)))
    # hand-computed: one sample per class, k = 1 -> every cycle of 3 rows is a permutation of the 3 samples
    picks = fresh_class_aware_indices(torch.tensor([2, 0, 1]), 9, 1, torch.Generator().manual_seed(0))
    assert all(sorted(picks[i:i + 3].tolist()) == [0, 1, 2] for i in (0, 3, 6))
    # the order is random: the first class, and the first sample of a class, are uniform over seeds
    firsts = torch.stack([fresh_class_aware_indices(labels, 8, 4, torch.Generator().manual_seed(s))[:1]
                          for s in range(2000)]).flatten()
    first_class = torch.bincount(labels[firsts], minlength=5).double() / 2000
    torch.testing.assert_close(first_class, torch.full((5,), 0.2, dtype=torch.float64), atol=0.04, rtol=0)
    class0 = torch.nonzero(labels == 0).flatten()
    first_of_0 = [fresh_class_aware_indices(labels, 40, 1, torch.Generator().manual_seed(s)) for s in range(700)]
    first_of_0 = torch.tensor([int(p[labels[p] == 0][0]) for p in first_of_0])
    share = torch.tensor([(first_of_0 == i).double().mean() for i in class0.tolist()])
    torch.testing.assert_close(share, torch.full((7,), 1 / 7, dtype=torch.float64), atol=0.05, rtol=0)


def test_class_aware_epoch_has_batches_of_four_sample_runs_and_balanced_classes():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 9 + [3] * 1)  # num_classes 5: class 4 has no sample
    d = {**defaults(SCHEMAS["phase_iii"]["decoupled"])}
    task = BalancedTraining(nn.Linear(2, 5), (torch.zeros(1000, 2), labels), (torch.zeros(1, 2), labels[:1]), None,
                            d={**d, "batch_size": 64}, labels=labels, train_counts=[900, 90, 9, 1, 0], hr=0.9, seed=5,
                            epochs=3, progress={"total_steps": 0})
    assert task.rows == epoch_rows(1000, 64, "class_aware") == 960  # the release's int(1000 / 64) = 15 steps
    task.begin(1)
    batches = task.batches(1)
    assert [len(b) for b in batches] == [64] * 15
    for batch in batches:  # every batch: 16 runs of 4 rows of one class
        assert (labels[batch].view(16, 4) == labels[batch].view(16, 4)[:, :1]).all()
    per_class = torch.bincount(labels[torch.cat(batches)], minlength=5)
    assert per_class[4] == 0 and per_class[:4].tolist() == [240] * 4  # 60 cycles of the 4 present classes
    _release_class_aware_oracle(torch.cat(batches), labels, 4)
    task.begin(2)
    assert not torch.equal(torch.cat(task.batches(2)), torch.cat(batches))  # a new draw every epoch
    # the earlier variant, independent draws, stays a setting: an epoch of every row, the last batch short
    task = BalancedTraining(nn.Linear(2, 5), (torch.zeros(1000, 2), labels), (torch.zeros(1, 2), labels[:1]), None,
                            d={**d, "batch_size": 64, "sampler": "independent"}, labels=labels,
                            train_counts=[900, 90, 9, 1, 0], hr=0.9, seed=5, epochs=3, progress={"total_steps": 0})
    task.begin(0)
    assert [len(b) for b in task.batches(0)] == [64] * 15 + [40]
    g = torch.Generator().manual_seed(stream_seed(5, "decoupled.sample", 0))
    assert torch.equal(torch.cat(task.batches(0)), class_balanced_indices(labels, 5, 1000, g))
    assert epoch_rows(300, 512, "class_aware") == 300  # a set smaller than a batch: one batch of every row


def test_release_schedule_lr_epochs_and_defaults():
    d = defaults(SCHEMAS["phase_iii"]["decoupled"])
    assert (d["lr"], d["batch_size"], d["schedule"], d["sampler"], d["samples_per_class"], d["features"]) == \
        (0.2, 512, "cosine", "class_aware", 4, "augmented")
    crt, lws = METHODS.get("crt"), METHODS.get("lws")
    assert (crt.epochs({"decoupled": d}), lws.epochs({"decoupled": d})) == (10, 5)
    assert lws.epochs({"decoupled": {**d, "epochs": 3}}) == 3
    finetune = defaults(SCHEMAS["phase_iii"]["finetune"])
    assert (finetune["momentum"], finetune["weight_decay"]) == (0.9, 5e-4)  # the release's SGD
    # hand-computed: epoch e (0-based) of E runs at 0.5 * lr * (1 + cos(pi * (e + 1) / E))
    assert epoch_lr(d, 0, 10) == pytest.approx(0.5 * 0.2 * (1 + math.cos(math.pi / 10)))  # 0.19511
    assert epoch_lr(d, 4, 10) == pytest.approx(0.1)
    assert epoch_lr(d, 9, 10) == pytest.approx(0.0, abs=1e-12)
    assert epoch_lr(d, 1, 5) == pytest.approx(0.5 * 0.2 * (1 + math.cos(2 * math.pi / 5)))  # 0.13090
    assert epoch_lr({**d, "schedule": "constant"}, 7, 10) == 0.2
    # oracle: the release's own stepping (run_networks.py): CosineAnnealingLR(T_max=E, eta_min=0), step()
    # at the start of every epoch, before its batches
    for E in (10, 5):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, E, eta_min=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for e in range(E):
                sched.step()
                assert epoch_lr(d, e, E) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), (E, e)


def test_lws_trains_only_the_scales_and_folds_into_a_linear_classifier():
    fc = nn.Linear(3, 4)
    weight, bias = fc.weight.detach().clone(), fc.bias.detach().clone()
    lws = ScaledClassifier(fc)
    data = (torch.randn(100, 3, generator=torch.Generator().manual_seed(2)),
            torch.tensor([0] * 60 + [1] * 30 + [2] * 6 + [3] * 4))
    task = BalancedTraining(lws, data, data, None, d={**defaults(SCHEMAS["phase_iii"]["decoupled"]), "batch_size": 16},
                            labels=data[1], train_counts=COUNTS, hr=0.9, seed=0, epochs=1,
                            progress={"total_steps": 0})
    assert [p for p in lws.parameters() if p.requires_grad] == [lws.scales]  # the only parameter
    optimizer = torch.optim.SGD([lws.scales], lr=0.5)
    task.begin(0)
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
        rows = results["train_samples"] // 64 * 64  # the release's int(N / batch) full batches an epoch
        assert results["samples_seen"] == 2 * rows and results["iterations"] == 2 * rows // 64
        assert (results["sampler"], results["features"], results["schedule"], results["lr"]) == \
            ("class_aware", "augmented", "cosine", 0.2)
        assert [h["lr"] for h in results["history"]] == pytest.approx([0.1, 0.0], abs=1e-12)  # cosine, E = 2
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


def test_crt_reinitialises_the_classifier_and_trains_on_augmented_features(with_val):
    """One cosine epoch runs at lr 0 (the release's schedule): the checkpoint holds cRT's fresh classifier,
    seeded by the run's seed, not phase I's; a constant-lr epoch moves it, differently on stored
    (un-augmented) features than on augmented ones."""
    from utils.seeding import seed_everything

    p1 = torch.load(with_val / "checkpoints/phase_i/smoke/default/best_model.pt", weights_only=True)["model"]
    path = with_val / "checkpoints/phase_iii_offline-crt/smoke/default/last.pt"
    _run(with_val, "crt", "decoupled.epochs=1", "--overwrite")
    fc = torch.load(path, weights_only=True)["model"]
    seed_everything(0)
    fresh = nn.Linear(p1["fc.weight"].shape[1], p1["fc.weight"].shape[0])
    torch.testing.assert_close(fc["fc.weight"], fresh.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(fc["fc.bias"], fresh.bias.detach(), rtol=0, atol=0)
    assert not torch.equal(fc["fc.weight"], p1["fc.weight"])
    trained = {}
    for features in ("augmented", "stored"):
        _run(with_val, "crt", "decoupled.epochs=1", "decoupled.schedule=constant", f"decoupled.features={features}",
             "--overwrite")
        trained[features] = torch.load(path, weights_only=True)["model"]
        assert not torch.equal(trained[features]["fc.weight"], fresh.weight.detach())
        for key, value in p1.items():  # the backbone, BatchNorm statistics included, is phase I's
            if not key.startswith("fc."):
                assert torch.equal(trained[features][key], value), key
    assert not torch.equal(trained["augmented"]["fc.weight"], trained["stored"]["fc.weight"])


def test_augmented_features_are_those_of_the_epochs_rows():
    """Each epoch asks for the features of exactly its sampled rows and trains on them in that order."""
    labels = torch.tensor([0] * 30 + [1] * 6 + [2] * 4)
    calls = []

    def augmented(epoch, rows):
        calls.append((epoch, rows.clone()))
        return torch.randn(len(rows), 3), labels[rows]

    d = {**defaults(SCHEMAS["phase_iii"]["decoupled"]), "batch_size": 8}
    task = BalancedTraining(nn.Linear(3, 3), None, (torch.zeros(1, 3), labels[:1]), None, d=d, labels=labels,
                            train_counts=[30, 6, 4], hr=0.9, seed=1, epochs=2, progress={"total_steps": 0},
                            augmented=augmented)
    for epoch in (0, 1):
        task.begin(epoch)
        assert calls[-1][0] == epoch and torch.equal(calls[-1][1], task.picks(epoch))
        assert torch.equal(task.data[1], labels[task.picks(epoch)])
        assert torch.equal(torch.cat(task.batches(epoch)), torch.arange(40))
