"""Backbones other than CE: the cosine classifier, CBD's distillation, phase I methods selected by their
settings, and phases II / III (and the report) on any phase I method's backbone."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from datasets.loader import EpochBatches
from engine.methods import METHODS, SUITES
from app.steps import plan_steps, route_opts
from fsa.distillation import DistillStudent, TeacherEnsemble, cbd_loss
from fsa.gradcam import CamExtractor
from models import CosineClassifier, build_model, fresh_like
from models.base import build_classifier
from tests.helpers import run_main_in_process
from utils.errors import UserError
from utils.layout import RunPaths

SMOKE = ("--config", "smoke", "--device", "cpu")
COSINE = "model.classifier=cosine"


# ------------------------------------------------------------------------------------------------
# Cosine classifier
# ------------------------------------------------------------------------------------------------
def test_fixed_scale_heads_are_rebuilt_fresh_of_the_same_form():
    # the forms themselves are checked by hand against their releases in tests/test_models.py
    fixed = build_classifier("normed", 2, 2, scale=30.0, learn_scale=False)
    assert "raw_scale" not in dict(fixed.named_parameters()) and math.isclose(fixed.scale_value(), 30.0, rel_tol=1e-6)
    again = fresh_like(fixed)  # cRT / TailCalib on LDAM-DRW: a fresh head of the same form and scale
    assert isinstance(again, CosineClassifier) and again.kind == "normed" and again.bias is None
    assert math.isclose(again.scale_value(), 30.0, rel_tol=1e-6) and "raw_scale" not in dict(again.named_parameters())
    learned = fresh_like(build_classifier("cosine", 2, 2))
    assert learned.kind == "cosine" and isinstance(learned.raw_scale, torch.nn.Parameter) and learned.bias is not None


def test_grad_cam_of_a_cosine_head_takes_the_autograd_path_and_matches_it():
    torch.manual_seed(0)
    model = build_model("resnet8", 4, 3, classifier="cosine").eval()
    extractor = CamExtractor(model)  # auto: the logit is not linear in the map, so no closed form
    assert extractor.method == "autograd"
    with pytest.raises(UserError, match="closed-form CAM needs"):
        CamExtractor(model, method="closed_form")(torch.randn(1, 3, 32, 32), torch.tensor([0]))
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 3])
    fmap = model.features(x).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.head(fmap).gather(1, y[:, None]).sum(), fmap)
    by_hand = F.relu((grad.mean(dim=(2, 3), keepdim=True) * fmap).sum(1)).detach()
    cams = extractor.layer_cams(x, y)
    peak = by_hand.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    torch.testing.assert_close(cams, by_hand / peak, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# CBD
# ------------------------------------------------------------------------------------------------
def test_cbd_loss_by_hand():
    logits, target = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    student = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=1)
    teacher = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    ce = F.cross_entropy(logits, target)
    distill = ((1 - 0.0) + (1 - 1 / math.sqrt(2))) / 2  # 1 - cos per row, averaged
    torch.testing.assert_close(cbd_loss(logits, target, student, teacher, alpha=0.4, beta=100.0),
                               0.6 * ce + 0.4 * 100.0 * torch.tensor(distill))
    torch.testing.assert_close(cbd_loss(logits, target, student, teacher, alpha=0.0, beta=100.0), ce)


def test_teachers_are_frozen_and_their_features_normalised():
    torch.manual_seed(0)
    # distill.teacher_bn: running (the release's teachers normalise with batch statistics: tests/test_cbd.py)
    teachers = TeacherEnsemble([build_model("resnet8", 4, 3, classifier="cosine") for _ in range(2)],
                               batch_statistics=False)
    before = [p.clone() for p in teachers.parameters()]
    student = DistillStudent(build_model("resnet8", 4, 3, classifier="cosine"), teachers.feature_dim)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(teachers.parameters()), lr=0.5)
    teachers.train()  # stays in eval mode: the teachers' batch-norm statistics are theirs
    assert not teachers.training and all(not p.requires_grad for p in teachers.parameters())
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    t = teachers(x)
    assert t.shape == (6, 2 * 64) and not t.requires_grad
    torch.testing.assert_close(t.norm(dim=1), torch.ones(6))
    # each teacher's part is its normalised pooled feature, scaled by 1/sqrt(2) by the outer normalisation
    first = F.normalize(teachers.teachers[0].pool(teachers.teachers[0].features(x)), dim=1)
    torch.testing.assert_close(t[:, :64] * math.sqrt(2), first.detach(), atol=1e-5, rtol=1e-5)
    logits, s = student(x)
    cbd_loss(logits, y, s, t, alpha=0.5, beta=10.0).backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, teachers.parameters()))
    assert student.projection.weight.grad is not None and student.model.fc.weight.grad is not None


def test_cbd_batches_are_half_class_balanced():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)
    sampler = EpochBatches(100, 20, seed=3, labels=labels, balanced_share=0.5)
    rows = torch.tensor([i for batch in sampler for i in batch])
    assert len(rows) == 100 and [len(b) for b in sampler] == [20] * 5
    balanced = torch.cat([torch.tensor(b[10:]) for b in sampler])
    share = torch.bincount(labels[balanced], minlength=3).float() / len(balanced)
    assert share[2] > 0.15  # class 2 holds 1% of the data; the balanced half draws it a third of the time
    instance = torch.cat([torch.tensor(b[:10]) for b in sampler])
    assert len(set(instance.tolist())) == 50  # the other half: a permutation without repeats
    assert [b for b in sampler] == [b for b in sampler]  # a function of (seed, epoch)
    sampler.set_epoch(1)
    assert [b for b in sampler] != [b for b in EpochBatches(100, 20, seed=3, labels=labels, balanced_share=0.5)]
    plain = EpochBatches(100, 20, seed=3)
    assert sorted(i for b in plain for i in b) == list(range(100))


# ------------------------------------------------------------------------------------------------
# The method table's arms and suites
# ------------------------------------------------------------------------------------------------
def test_tailcalibx_suite_is_the_releases_seven_experiments():
    assert "tailcalibx" in SUITES
    assert [a.id for a in METHODS.suite("tailcalibx")] == [
        "ce", "cosine_ce", "cbd", "crt", "cosine_tailcalib", "cosine_tailcalibx", "cbd_tailcalibx"]
    arm = METHODS.arm("tailcalibx", "cbd")
    assert arm.folder == "phase_iii_online-tailcalibx-on-cbd" and arm.phase_ii == "phase_ii-cbd"
    assert arm.command("smoke", "seed0").endswith("--opts finetune.generator=tailcalibx backbone=cbd")
    assert METHODS.by_folder(arm.folder) == arm
    assert (arm, METHODS.arm("cbd")) in METHODS.paired()  # against its own backbone
    assert (METHODS.arm("cbd"), METHODS.arm("ce")) in METHODS.paired()
    assert RunPaths("phase_ii-cbd", "smoke", "seed0").features_dir.as_posix() == "features-cbd/smoke/seed0"
    steps = plan_steps("tailcalibx", teachers=2)
    assert [(s.kind, s.folder(), s.note("n")) for s in steps] == [
        ("phase_i", "phase_i", "n"), ("phase_ii", "phase_ii", "n"), ("phase_iii", "phase_iii_offline-crt", "n"),
        ("phase_i", "phase_i-cosine_ce", "n"), ("phase_ii", "phase_ii-cosine_ce", "n"),
        ("phase_iii", "phase_iii_offline-tailcalib-on-cosine_ce", "n"),
        ("phase_iii", "phase_iii_online-tailcalibx-on-cosine_ce", "n"),
        ("phase_i", "phase_i-cosine_ce", "n-teacher1"), ("phase_i", "phase_i-cosine_ce", "n-teacher2"),
        ("phase_i", "phase_i-cbd", "n"), ("phase_ii", "phase_ii-cbd", "n"),
        ("phase_iii", "phase_iii_online-tailcalibx-on-cbd", "n"), ("visualize", "visualize", "n")]


@pytest.mark.parametrize("key", ["backbone=cbd", "model.classifier=cosine", "distill.enabled=true", "train.loss=focal"])
def test_pipeline_refuses_opts_that_choose_methods(key):
    with pytest.raises(UserError, match="--suite"):
        route_opts([key], seeded=False)


# ------------------------------------------------------------------------------------------------
# End to end on the smoke config: CosineCE -> phase II -> TailCalib, CBD and its teachers
# ------------------------------------------------------------------------------------------------
def _run(script: str, *args: str, cwd) -> None:
    code, err = run_main_in_process(script, *args, cwd=cwd)
    assert code == 0, err


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cosine")
    _run("phase_i_train_or_test.py", *SMOKE, "--opts", COSINE, "train.epochs=4", cwd=cwd)
    _run("phase_ii_extract_feature.py", *SMOKE, "--opts", "backbone=cosine_ce", cwd=cwd)
    return cwd


def test_phases_ii_and_iii_on_the_cosine_backbone(cosine_run):
    cwd = cosine_run
    assert not (cwd / "checkpoints/phase_i").exists() and not (cwd / "features").exists()  # CE untouched
    phase_ii = json.loads((cwd / "features-cosine_ce/smoke/default/results.json").read_text())
    assert phase_ii["backbone"] == "cosine_ce" and phase_ii["cam_method"] == "autograd"
    _run("phase_iii_offline_train_or_test.py", *SMOKE, "--opts", "finetune.generator=tailcalib", "backbone=cosine_ce",
         "tailcalib.epochs=2", cwd=cwd)
    folder = cwd / "checkpoints/phase_iii_offline-tailcalib-on-cosine_ce/smoke/default"
    results = json.loads((folder / "results.json").read_text())
    assert results["arm"] == "cosine_tailcalib" and results["backbone"] == "cosine_ce"
    assert results["phase_i_checkpoint"].endswith("phase_i-cosine_ce/smoke/default/best_model.pt")
    ckpt = torch.load(folder / "best_model.pt", weights_only=True)
    assert ckpt["classifier"]["kind"] == "cosine" and ckpt["feature_transform"]["renormalize"] is True
    # phase: test evaluates the checkpoint on the same features: the recorded top-1
    _run("phase_iii_offline_train_or_test.py", *SMOKE, "--opts", "finetune.generator=tailcalib", "backbone=cosine_ce",
         "phase=test", cwd=cwd)
    tested = json.loads((folder / "test_results.json").read_text())
    assert tested["top1"] == pytest.approx(results["top1"])


@pytest.mark.parametrize("generator, folder", [("crt", "phase_iii_offline-crt-on-cosine_ce"),
                                               ("fsa", "phase_iii_offline-on-cosine_ce")])
def test_model_checkpoints_on_the_cosine_backbone_reproduce_their_top1_under_phase_test(cosine_run, generator, folder):
    cwd = cosine_run
    opts = ("--opts", f"finetune.generator={generator}", "backbone=cosine_ce", "decoupled.epochs=2",
            "finetune.iterations=6", "finetune.eval_every=3")
    _run("phase_iii_offline_train_or_test.py", *SMOKE, *opts, cwd=cwd)
    run = cwd / "checkpoints" / folder / "smoke/default"
    results = json.loads((run / "results.json").read_text())
    assert results["arm"] == ("cosine_crt" if generator == "crt" else "cosine_fsa_offline")
    ckpt = torch.load(run / "best_model.pt", weights_only=True)
    assert "fc.raw_scale" in ckpt["model"]  # the cosine head, re-trained (cRT: a fresh one) or fine-tuned
    _run("phase_iii_offline_train_or_test.py", *SMOKE, *opts, "phase=test", cwd=cwd)
    assert json.loads((run / "test_results.json").read_text())["top1"] == pytest.approx(results["top1"])


def test_fsa_online_on_the_cosine_backbone_takes_autograd_cams_and_trains_the_last_stage_if_asked(cosine_run):
    """Online FSA recomputes CAMs of a cosine head, which has no closed form (it failed before); with
    finetune.unfreeze the last stage still receives gradients through the maps."""
    cwd = cosine_run
    run = cwd / "checkpoints/phase_iii_online-on-cosine_ce/smoke/default"
    start = torch.load(cwd / "checkpoints/phase_i-cosine_ce/smoke/default/best_model.pt", weights_only=True)["model"]
    for unfreeze, again in ((False, ()), (True, ("--overwrite",))):
        _run("phase_iii_online_train_or_test.py", *SMOKE, *again, "--opts", "backbone=cosine_ce",
             "finetune.iterations=4", "finetune.eval_every=2", f"finetune.unfreeze={str(unfreeze).lower()}", cwd=cwd)
        assert json.loads((run / "results.json").read_text())["arm"] == "cosine_fsa_online"
        tuned = torch.load(run / "last.pt", weights_only=True)["model"]
        changed = {k for k in tuned if not torch.equal(tuned[k], start[k])}
        assert "fc.weight" in changed
        assert any(k.startswith("layer3.") and k.endswith("conv1.weight") for k in changed) == unfreeze, sorted(changed)


def test_missing_phase_ii_of_a_backbone_names_its_command(cosine_run):
    code, err = run_main_in_process("phase_iii_offline_train_or_test.py", *SMOKE, "--opts", "finetune.generator=crt",
                                    "backbone=cbd", cwd=cosine_run)
    assert code == 2 and "CBD" in err and "--opts model.classifier=cosine distill.enabled=true" in err


def test_rescaling_methods_refuse_a_cosine_backbone(cosine_run):
    code, err = run_main_in_process("phase_iii_offline_train_or_test.py", *SMOKE, "--opts", "finetune.generator=lws",
                                    "backbone=cosine_ce", cwd=cosine_run)
    assert code == 2 and "cosine" in err and "la_posthoc or crt" in err
    assert not (cosine_run / "checkpoints/phase_iii_offline-lws-on-cosine_ce").exists()


def test_post_hoc_adjustment_refuses_ldams_bias_free_head_and_tailcalib_runs_on_it(tmp_path):
    ldam = ["train.loss=ldam", "train.reweight=drw", "model.classifier=normed", "model.scale=30", "model.learn_scale=false"]
    _run("phase_i_train_or_test.py", *SMOKE, "--opts", *ldam, "train.epochs=2", cwd=tmp_path)
    _run("phase_ii_extract_feature.py", *SMOKE, "--opts", "backbone=ldam_drw", cwd=tmp_path)
    code, err = run_main_in_process("phase_iii_offline_train_or_test.py", *SMOKE, "--opts",
                                    "finetune.generator=la_posthoc", "backbone=ldam_drw", cwd=tmp_path)
    assert code == 2 and "has none" in err and "NormedLinear" in err
    assert not (tmp_path / "checkpoints/phase_iii_offline-la_posthoc-on-ldam_drw").exists()
    # TailCalib's checkpoint of a bias-free head is evaluated again under phase: test
    tailcalib = ["finetune.generator=tailcalib", "backbone=ldam_drw", "tailcalib.epochs=1"]
    _run("phase_iii_offline_train_or_test.py", *SMOKE, "--opts", *tailcalib, cwd=tmp_path)
    folder = tmp_path / "checkpoints/phase_iii_offline-tailcalib-on-ldam_drw/smoke/default"
    trained = json.loads((folder / "results.json").read_text())["top1"]
    _run("phase_iii_offline_train_or_test.py", *SMOKE, "--opts", *tailcalib, "phase=test", cwd=tmp_path)
    assert json.loads((folder / "test_results.json").read_text())["top1"] == pytest.approx(trained)


def test_cbd_needs_its_teachers_then_distils_from_them(cosine_run):
    cwd = cosine_run
    student = ("--opts", COSINE, "distill.enabled=true", "distill.teachers=2", "train.epochs=2")
    code, err = run_main_in_process("phase_i_train_or_test.py", *SMOKE, *student, cwd=cwd)
    assert code == 2 and "--note default-teacher1 --opts model.classifier=cosine seed=1000" in err
    assert "--note default-teacher2 --opts model.classifier=cosine seed=2000" in err
    assert not (cwd / "checkpoints/phase_i-cbd").exists()  # refused before any folder is made
    for k in (1, 2):
        _run("phase_i_train_or_test.py", *SMOKE, "--note", f"default-teacher{k}", "--opts", COSINE, f"seed={1000 * k}",
             "train.epochs=2", cwd=cwd)
    teacher = cwd / "checkpoints/phase_i-cosine_ce/smoke/default-teacher1/best_model.pt"
    before = teacher.read_bytes()
    _run("phase_i_train_or_test.py", *SMOKE, *student, cwd=cwd)
    results = json.loads((cwd / "checkpoints/phase_i-cbd/smoke/default/results.json").read_text())
    assert results["method"] == "cbd" and len(results["teachers"]) == 2 and results["classifier"] == "cosine"
    assert teacher.read_bytes() == before
    ckpt = torch.load(cwd / "checkpoints/phase_i-cbd/smoke/default/best_model.pt", weights_only=True)
    assert ckpt["projection"]["weight"].shape == (2 * 64, 64)  # student 64-d -> two 64-d teachers
    # a teacher of another seed is refused
    _run("phase_i_train_or_test.py", *SMOKE, "--note", "other-teacher1", "--opts", COSINE, "seed=5", "train.epochs=1",
         cwd=cwd)
    code, err = run_main_in_process("phase_i_train_or_test.py", *SMOKE, "--note", "other", "--opts", COSINE,
                                    "distill.enabled=true", "distill.teachers=1", cwd=cwd)
    assert code == 2 and "another seed" in err


def test_pipeline_tailcalibx_suite_reports_the_releases_seven_rows(tmp_path):
    code, err = run_main_in_process("pipeline.py", *SMOKE, "--suite", "tailcalibx", "--opts", "train.epochs=2",
                                    "distill.teachers=2", "tailcalib.epochs=1", "decoupled.epochs=1", cwd=tmp_path)
    assert code == 0, err
    report = json.loads((tmp_path / "reports/smoke/default/report.json").read_text())
    assert [row["id"] for row in report["rows"]] == [
        "ce", "cosine_ce", "cbd", "crt", "cosine_tailcalib", "cosine_tailcalibx", "cbd_tailcalibx"]
    pairs = {(p["method"], p["reference"]) for p in report["paired"] if p["metric"] == "top1"}
    assert ("TailCalibX (online) on CBD (class-balanced distillation)", "CBD (class-balanced distillation)") in pairs
    teachers = json.loads((tmp_path / "checkpoints/phase_i-cbd/smoke/default/results.json").read_text())["teachers"]
    assert [t.split("/")[-2] for t in teachers] == ["default-teacher1", "default-teacher2"]
    assert json.loads((tmp_path / "checkpoints/phase_i-cosine_ce/smoke/default-teacher2/results.json").read_text())[
        "history"][-1]["epoch"] == 2
    # the suite chooses the methods: a config that picks one itself is refused before any step
    config = tmp_path / "mine" / "phase_i" / "smoke.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("inherit: smoke\nmodel: {classifier: cosine}\n")
    code, err = run_main_in_process("pipeline.py", "--config", str(config), "--device", "cpu", cwd=tmp_path)
    assert code == 2 and "selects the phase I method cosine_ce" in err
