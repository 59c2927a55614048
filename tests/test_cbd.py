"""CBD at the TailCalibX release's settings (github.com/rahulvigneswaran/TailCalibX, experiment 0.4 of
libs/utils/experiments_maker.py, run_all_CIFAR100-LT.sh): class-aware batches (libs/samplers/ClassAwareSampler.py,
num_samples_cls 4), alpha 0.8 / beta 100, one teacher and no projection (libs/core/ecbd.py), the teachers' batch norm
in train mode. The oracles below are written from the release's code, not from fsa.distillation / datasets.loader."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
import torch.nn.functional as F
from torch import nn

from datasets.loader import EpochBatches, fresh_class_aware_indices
from fsa.distillation import DistillStudent, TeacherEnsemble, cbd_loss
from models import build_model
from utils.seeding import stream_seed


# ------------------------------------------------------------------------------------------------
# The class-aware sampler
# ------------------------------------------------------------------------------------------------
def _release_sampler_could_give(labels: torch.Tensor, rows: torch.Tensor, spc: int) -> bool:
    """Whether the release's class_aware_sample_generator (ClassAwareSampler.py), started fresh, can yield `rows`:
    it takes a class from a RandomCycleIter over the classes (a new random order at every wrap, the first
    call included), then `spc` consecutive items of that class's own RandomCycleIter (a new permutation of its
    images at every wrap). So: runs of `spc` rows of one class; the runs' classes, cut in passes of C, each a
    permutation of the classes; each class's rows, in order, cut in blocks of its size, each a permutation of
    its images (the last pass / block may be partial, without repeats)."""
    classes = sorted(set(labels.tolist()))
    members = {c: sorted(torch.nonzero(labels == c).flatten().tolist()) for c in classes}
    rows = rows.tolist()
    runs = [rows[i:i + spc] for i in range(0, len(rows), spc)]
    run_class = []
    for run in runs:
        owners = {int(labels[i]) for i in run}
        if len(owners) != 1:
            return False
        run_class.append(owners.pop())
    for p in range(0, len(run_class), len(classes)):
        chunk = run_class[p:p + len(classes)]
        if len(set(chunk)) != len(chunk):
            return False
    for c, mine in members.items():
        seq = [i for i in rows if int(labels[i]) == c]
        for q in range(0, len(seq), len(mine)):
            block = seq[q:q + len(mine)]
            if len(set(block)) != len(block) or not set(block) <= set(mine):
                return False
    return True


LABELS = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)  # images 0-5, 6-8, 9


def _fresh(n: int, seed: int, labels: torch.Tensor = LABELS) -> torch.Tensor:
    return fresh_class_aware_indices(labels, n, 4, torch.Generator().manual_seed(seed))


def test_class_aware_rows_by_hand():
    for seed in range(20):
        rows = _fresh(120, seed)
        assert _release_sampler_could_give(LABELS, rows, 4)
        labels = LABELS[rows]
        # 120 rows = 30 runs of 4 = 10 passes over the 3 classes: 40 rows of each class, whatever its size (6, 3, 1)
        assert torch.bincount(labels).tolist() == [40, 40, 40]
        assert set(rows[labels == 2].tolist()) == {9}  # the only image of class 2 fills all its rows
        # class 1's 40 rows: 13 permutations of 6, 7, 8 then one more image; class 0's: 6 permutations of 0..5 and 4
        ones, zeros = rows[labels == 1].tolist(), rows[labels == 0].tolist()
        assert all(sorted(ones[3 * q:3 * q + 3]) == [6, 7, 8] for q in range(13))
        assert all(sorted(zeros[6 * q:6 * q + 6]) == list(range(6)) for q in range(6)) and len(set(zeros[36:])) == 4
    # the oracle refuses what the release cannot yield: i.i.d. class-balanced rows, a run split between classes
    assert not _release_sampler_could_give(LABELS, torch.tensor([9, 9, 9, 9, 6, 7, 8, 0]), 4)
    assert not _release_sampler_could_give(LABELS, torch.tensor([9, 9, 9, 9, 9, 9, 9, 9]), 4)
    assert not _release_sampler_could_give(LABELS, torch.tensor([6, 7, 6, 8]), 4)


def test_epoch_batches_are_the_release_s_class_aware_batches():
    labels = torch.tensor([0] * 20 + [1] * 6 + [2] * 2 + [3] * 1 + [4] * 1)  # n = 30
    sampler = EpochBatches(30, 8, seed=5, labels=labels, samples_per_class=4)
    assert len(sampler) == 3 and sampler.samples_per_epoch() == 24  # int(30 / 8) full batches, as the release
    seen = []
    for e in range(3):
        sampler.set_epoch(e)
        batches = list(sampler)
        assert [len(b) for b in batches] == [8, 8, 8] and batches == list(sampler)  # a function of (seed, epoch)
        rows = torch.tensor(sum(batches, []))
        assert torch.equal(rows, fresh_class_aware_indices(
            labels, 24, 4, torch.Generator().manual_seed(stream_seed(5, "phase_i.balanced", e))))
        assert _release_sampler_could_give(labels, rows, 4)
        # 24 rows = 6 runs: one pass over the 5 classes (4 rows each) and one more class
        assert sorted(torch.bincount(labels[rows], minlength=5).tolist()) == [4, 4, 4, 4, 8]
        seen.append(rows)
    assert not torch.equal(seen[0], seen[1])
    # two processes: rank r takes half r of every global batch
    halves = [EpochBatches(30, 8, seed=5, rank=r, world_size=2, labels=labels, samples_per_class=4) for r in (0, 1)]
    for h in halves:
        h.set_epoch(2)
    assert [a + b for a, b in zip(*halves)] == list(sampler)
    with pytest.raises(ValueError):
        EpochBatches(30, 8, seed=5, labels=labels, samples_per_class=4, balanced_share=0.5)


def test_release_settings_are_the_defaults():
    from utils.config import load_config

    d = load_config("smoke", "phase_i", ["model.classifier=cosine", "distill.enabled=true"])["distill"]
    assert (d["alpha"], d["beta"], d["teachers"]) == (0.8, 100.0, 1)
    assert (d["sampler"], d["samples_per_class"], d["teacher_bn"]) == ("class_aware", 4, "batch")


def test_phase_i_student_batches_are_class_aware():
    from datasets import build_datasets
    from engine.accel import NO_ACCEL
    from engine.artifacts import build_phase_i_model
    from engine.phase_i import BackboneTraining
    from utils.config import load_config

    cfg = load_config("smoke", "phase_i", ["model.classifier=cosine", "distill.enabled=true", "accel.amp=none"])
    bundle = build_datasets(cfg["dataset"], None)
    torch.manual_seed(0)
    model = build_phase_i_model(cfg, bundle, torch.device("cpu"))
    teachers = TeacherEnsemble([build_phase_i_model(cfg, bundle, torch.device("cpu"))])
    student = DistillStudent(model, teachers.feature_dim, project=False)
    task = BackboneTraining(cfg, bundle, model, student, torch.device("cpu"), NO_ACCEL, teachers)
    task.begin(0)
    batches = list(task.batches(0))
    n, size = len(bundle.train), cfg["train"]["batch_size"]
    assert len(batches) == n // size
    targets = bundle.train.targets
    for x, y, idx in batches:
        assert len(y) == size and torch.equal(targets[idx.cpu()], y.cpu())
        runs = y.view(-1, 4)
        assert (runs == runs[:, :1]).all()
    # one step: the release's loss on this batch, teachers with batch statistics, the student's own normalised feature
    x, y, _ = batches[0]
    result = task.step(batches[0])
    feature = model.pool(model.features(x))
    teacher = teachers.teachers[0]
    teacher.train()
    target = F.normalize(F.normalize(teacher.pool(teacher.features(x)), dim=1), dim=1)
    expected = 0.2 * nn.CrossEntropyLoss()(model.fc(feature), y) + \
        0.8 * 100 * (1 - nn.CosineSimilarity(dim=1)(F.normalize(feature, dim=1), target)).mean(dim=0)
    torch.testing.assert_close(result.loss, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The loss, the student, the teachers
# ------------------------------------------------------------------------------------------------
def test_cbd_loss_at_the_release_s_alpha_and_beta():
    logits, target = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    student = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=1)
    teacher = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # by hand: CE rows log(1 + e^-2), log(1 + e); 1 - cos rows 1, 1 - 1/sqrt(2)
    ce = (math.log(1 + math.exp(-2)) + math.log(1 + math.e)) / 2
    distill = (1 + (1 - 1 / math.sqrt(2))) / 2
    by_hand = 0.2 * ce + 0.8 * 100 * distill
    assert by_hand == pytest.approx(51.8597, abs=1e-4)
    loss = cbd_loss(logits, target, student, teacher, alpha=0.8, beta=100.0)
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)
    # the release's composition (ecbd.py batch_loss): ClassifierLoss weight 1 - cv1, CosineDistill(beta) weight cv1
    release = (1 - 0.8) * nn.CrossEntropyLoss()(logits, target) + \
        0.8 * (100 * (1 - nn.CosineSimilarity(dim=1)(student, teacher)).mean(dim=0))
    torch.testing.assert_close(loss, release)


def test_one_teacher_means_no_projection_and_more_mean_one():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    student = DistillStudent(build_model("resnet8", 4, 3, classifier="cosine"), 64, project=False)
    assert student.projection is None and sum(1 for _ in student.parameters()) == \
        sum(1 for _ in student.model.parameters())
    logits, s = student(x)
    pooled = student.model.pool(student.model.features(x))
    assert torch.equal(s, F.normalize(pooled, dim=1)) and torch.equal(logits, student.model.fc(pooled))
    with pytest.raises(ValueError):
        DistillStudent(build_model("resnet8", 4, 3, classifier="cosine"), 128, project=False)
    projected = DistillStudent(build_model("resnet8", 4, 3, classifier="cosine"), 128)
    assert projected.projection.weight.shape == (128, 64)


@pytest.mark.parametrize("batch_statistics", [True, False])
def test_teachers_batch_norm_mode(batch_statistics):
    torch.manual_seed(0)
    model = build_model("resnet8", 4, 3, classifier="cosine")
    model.train()
    for _ in range(3):  # running statistics that differ from a batch's
        model(torch.randn(8, 3, 32, 32) * 3 + 1)
    teachers = TeacherEnsemble([model], batch_statistics=batch_statistics)
    teachers.eval()
    teachers.train()
    teachers.eval()  # neither call changes the mode chosen at construction
    assert teachers.training is batch_statistics and model.training is batch_statistics
    assert all(not p.requires_grad for p in teachers.parameters())
    x = torch.randn(6, 3, 32, 32)
    t = teachers(x)
    # oracles: copies of the teacher (its statistics after that call) in the expected mode and in the other one
    outputs = {}
    for mode in (True, False):
        copy = build_model("resnet8", 4, 3, classifier="cosine")
        copy.load_state_dict(model.state_dict())
        copy.train(mode)
        with torch.no_grad():
            outputs[mode] = F.normalize(copy.pool(copy.features(x)), dim=1)
    torch.testing.assert_close(t, outputs[batch_statistics], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(t, outputs[not batch_statistics], atol=1e-3)


def test_a_one_teacher_cbd_run_has_no_projection(tmp_path):
    """Phase I end to end at the defaults: one CosineCE teacher, the student distilled without a projection."""
    from tests.helpers import run_main_in_process

    smoke = ("--config", "smoke", "--device", "cpu")
    code, err = run_main_in_process("phase_i_train_or_test.py", *smoke, "--note", "default-teacher1", "--opts",
                                    "model.classifier=cosine", "seed=1000", "train.epochs=1", cwd=tmp_path)
    assert code == 0, err
    code, err = run_main_in_process("phase_i_train_or_test.py", *smoke, "--opts", "model.classifier=cosine",
                                    "distill.enabled=true", "train.epochs=1", cwd=tmp_path)
    assert code == 0, err
    run = tmp_path / "checkpoints/phase_i-cbd/smoke/default"
    results = json.loads((run / "results.json").read_text())
    assert len(results["teachers"]) == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["distill"]["sampler"] == "class_aware"
    assert results["samples_seen"] == (results["train_samples"] // 32) * 32  # int(n / batch) full batches
    ckpt = torch.load(run / "best_model.pt", weights_only=True)
    assert "projection" not in ckpt
