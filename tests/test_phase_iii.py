"""Phase III: batch composition, generators, online/offline fine-tuning, resume, bad input."""
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from engine import phase_iii_maps
from engine.methods import METHODS
from fsa.batch_composition import TailHeadComposer, batch_size
from fsa.confusion import confusing_table
from fsa.generators import FusionGenerator, GeneratorContext, ResampleGenerator
from utils.config import load_config
from utils.errors import UserError
from tests.helpers import copy_phase_i, run_main_in_process, run_script

LABELS = torch.tensor([0] * 50 + [1] * 30 + [2] * 6 + [3] * 4 + [4] * 2)
HEAD, TAIL = [0, 1], [2, 3, 4]
CONFUSING = confusing_table({2: [0, 1], 3: [1, 0], 4: [0, 3]}, 5, 2)


def make_context(nt: int = 4, na: int = 3) -> GeneratorContext:
    composer = TailHeadComposer(LABELS, TAIL, HEAD, nt, na, seed=0)
    return GeneratorContext(labels=LABELS, confusing=CONFUSING, composer=composer, na=na, ts=0.8, tg=0.2)


def test_composer_draws_tail_and_head_sets_of_the_right_size():
    composer = TailHeadComposer(LABELS, TAIL, HEAD, nt=4, na=3, seed=0)
    plan, _ = composer.plan(0)
    assert len(plan.tail) == 4 and len(plan.head) == 4 * (1 + 3)
    assert set(LABELS[plan.tail].tolist()) <= set(TAIL) and set(LABELS[plan.head].tolist()) <= set(HEAD)
    assert batch_size(16, 3) == 128  # the paper's batch


def test_every_tail_class_is_visited_and_draws_are_reproducible():
    composer = TailHeadComposer(LABELS, TAIL, HEAD, nt=1, na=3, seed=5)
    window = math.ceil((2 * len(TAIL) - 1) / 1)  # any 2T-1 stream positions hold a whole permutation
    for start in range(0, 20):
        seen = {int(LABELS[composer.plan(it)[0].tail[0]]) for it in range(start, start + window)}
        assert seen == set(TAIL)
    again = TailHeadComposer(LABELS, TAIL, HEAD, nt=1, na=3, seed=5)
    assert all(torch.equal(composer.plan(it)[0].head, again.plan(it)[0].head) for it in range(5))


def test_tail_sampling_is_class_balanced_not_instance_balanced():
    composer = TailHeadComposer(LABELS, TAIL, HEAD, nt=3, na=1, seed=1)
    labels = torch.cat([LABELS[composer.plan(it)[0].tail] for it in range(300)])
    counts = torch.bincount(labels, minlength=5)[TAIL]
    assert counts.tolist() == [300, 300, 300]  # class 4 has 2 images but is drawn as often as class 2 with 6


def test_fusion_generator_takes_donors_from_each_rows_confusing_classes():
    gen = FusionGenerator(make_context())
    tail_labels = torch.tensor([2, 3, 4, 4])
    donors = gen.extra_indices(tail_labels, torch.Generator().manual_seed(0))
    assert len(donors) == 4 * 3
    for label, donor in zip(tail_labels.repeat_interleave(3), donors):
        assert int(LABELS[donor]) in CONFUSING[label].tolist()


def test_fused_maps_keep_their_own_tail_labels_in_mixed_batches():
    ctx = make_context(nt=3, na=2)
    gen = FusionGenerator(ctx)
    tail_labels = torch.tensor([2, 3, 4])
    tail_maps = torch.rand(3, 4, 2, 2) + 1
    tail_cams = torch.rand(3, 2, 2)
    extra = torch.rand(6, 4, 2, 2) + 1
    maps, labels = gen.generate(tail_maps, tail_cams, tail_labels, extra, torch.rand(6, 2, 2), torch.zeros(6, dtype=torch.long),
                                torch.Generator().manual_seed(0))
    assert maps.shape == (6, 4, 2, 2)
    assert labels.tolist() == [2, 2, 3, 3, 4, 4]  # not all labelled with the first tail sample's class


def test_resample_generator_is_real_tail_samples_of_the_same_class():
    gen = ResampleGenerator(make_context(nt=3, na=2))
    tail_labels = torch.tensor([2, 3, 4])
    extra = gen.extra_indices(tail_labels, torch.Generator().manual_seed(0))
    assert LABELS[extra].tolist() == [2, 2, 3, 3, 4, 4]


def test_unknown_generator_lists_the_available_ones():
    every, offline = ", ".join(METHODS.generators()), ", ".join(METHODS.generators("offline"))
    assert {"none", "fsa", "tailcalib", "tailcalibx", "la_posthoc", "crt"} <= set(METHODS.generators())
    with pytest.raises(UserError, match=re.escape(f"Unknown finetune.generator 'mixup'. Available: {every} "
                                                  f"(phase III offline: {offline})")):
        METHODS.phase_iii("offline", "mixup")
    # the config schema refuses it first, with the same list
    with pytest.raises(UserError, match=re.escape(f"finetune.generator' must be one of {every}; got 'mixup'")):
        load_config("smoke", "phase_iii", ["finetune.generator=mixup"])


def test_batch_loss_feeds_2nt_1_plus_na_rows_to_the_classifier():
    from models import build_model

    nt, na = 3, 2
    ctx = make_context(nt=nt, na=na)
    gen = FusionGenerator(ctx)
    model = build_model("resnet8", 5)
    seen = {}
    original_head = model.head

    def spy(fmap):
        seen["rows"] = fmap.shape[0]
        return original_head(fmap)

    model.head = spy

    def fetch(indices, rng):
        return torch.rand(len(indices), 64, 2, 2), torch.rand(len(indices), 2, 2), LABELS[indices]

    plan, rng = ctx.composer.plan(0)
    loss, logits, targets = phase_iii_maps.batch_loss(model, gen, plan, rng, fetch)
    assert seen["rows"] == batch_size(nt, na) == 2 * nt * (1 + na)
    assert logits.shape == (seen["rows"], 5) and targets.shape == (seen["rows"],) and loss.ndim == 0


# ---------------------------------------------------------------- end to end on the smoke run

@pytest.fixture(scope="module")
def smoke_ii(tmp_path_factory, smoke_phase_i) -> Path:
    """Smoke phase I (tail accuracy 0: the under-trained starting point) + phase II."""
    cwd = copy_phase_i(smoke_phase_i, tmp_path_factory.mktemp("phase_iii"))
    run_script("phase_ii_extract_feature.py", "--config", "smoke", "--device", "cpu", cwd=cwd)
    return cwd


def results(cwd: Path, phase: str, note: str = "default") -> dict:
    return json.loads((cwd / f"checkpoints/{phase}/smoke/{note}/results.json").read_text())


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_fine_tuning_improves_tail_accuracy(smoke_ii, mode):
    code, err = run_main_in_process(f"phase_iii_{mode}_train_or_test.py", "--config", "smoke", "--device", "cpu", cwd=smoke_ii)
    assert code == 0, err
    before = results(smoke_ii, "phase_i")
    after = results(smoke_ii, f"phase_iii_{mode}")
    assert after["finished"] and after["mode"] == mode and after["generator"] == "fsa"
    # iteration 0 = the phase I model that phase II used: best_model.pt
    best = next(h for h in before["history"] if h["epoch"] == before["checkpoint_selection"]["epoch"])
    assert after["history"][0]["tail"] == pytest.approx(best["tail"])
    assert after["tail"] > best["tail"] + 20, (best["tail"], after["tail"])
    # last.pt: best_model.pt may be iteration 0 (the phase I model itself) when fine-tuning lowers top-1
    payload = torch.load(smoke_ii / f"checkpoints/phase_iii_{mode}/smoke/default/last.pt", weights_only=True)
    phase_i_weights = torch.load(smoke_ii / "checkpoints/phase_i/smoke/default/best_model.pt", weights_only=True)["model"]
    changed = {k for k in payload["model"] if not torch.equal(payload["model"][k], phase_i_weights[k])}
    assert changed == {"fc.weight", "fc.bias"}  # classifier-only fine-tuning by default


def test_offline_never_touches_images(smoke_ii, monkeypatch):
    from datasets.base import InMemoryDataset

    calls = []
    original = InMemoryDataset.get_batch

    def counting(self, indices, *args, **kwargs):
        calls.append(self.augment)
        return original(self, indices, *args, **kwargs)

    monkeypatch.setattr(InMemoryDataset, "get_batch", counting)
    shutil.rmtree(smoke_ii / "checkpoints/phase_iii_offline-none", ignore_errors=True)
    code, err = run_main_in_process("phase_iii_offline_train_or_test.py", "--config", "smoke", "--device", "cpu", "--opts",
                                    "finetune.generator=none", "finetune.iterations=5", "finetune.eval_every=5", cwd=smoke_ii)
    assert code == 0, err
    assert calls and not any(calls), "offline training read augmented training images; only un-augmented test batches allowed"


# cRT's recipe (a fresh classifier, cosine lr) with fused rows matched to the real moments: resumes exactly too
RECIPE = ["finetune.init=reinit", "finetune.schedule=cosine", "fusion.match=moments"]


@pytest.mark.parametrize("recipe", [[], RECIPE], ids=["paper", "recipe"])
def test_interrupted_run_resumes_to_identical_weights(smoke_ii, monkeypatch, recipe):
    opts = ["--opts", "finetune.iterations=40", "finetune.eval_every=10", *recipe]
    straight, crashed = ("straight", "crashed") if not recipe else ("straight-recipe", "crashed-recipe")

    def weights(note):
        return torch.load(smoke_ii / f"checkpoints/phase_iii_offline/smoke/{note}/last.pt", weights_only=True)["model"]

    for note in (straight, crashed):
        for sub in ("phase_i", "features"):
            src = smoke_ii / ("checkpoints/phase_i/smoke/default" if sub == "phase_i" else "features/smoke/default")
            dst = smoke_ii / ("checkpoints/phase_i/smoke" if sub == "phase_i" else "features/smoke") / note
            shutil.copytree(src, dst, dirs_exist_ok=True)
    # provenance names the phase I checkpoint by path: point each copy at its own phase I copy
    for note in (straight, crashed):
        prov_path = smoke_ii / f"features/smoke/{note}/provenance.json"
        prov = json.loads(prov_path.read_text())
        prov["phase_i_checkpoint"]["path"] = str(smoke_ii / f"checkpoints/phase_i/smoke/{note}/best_model.pt")
        prov_path.write_text(json.dumps(prov))

    code, err = run_main_in_process("phase_iii_offline_train_or_test.py", "--config", "smoke", "--device", "cpu", "--note", straight,
                                    *opts, cwd=smoke_ii)
    assert code == 0, err

    real_step, calls = phase_iii_maps.batch_loss, {"n": 0}

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt  # killed between the checkpoints at 20 and 30
        return real_step(*args, **kwargs)

    monkeypatch.setattr(phase_iii_maps, "batch_loss", crashing_step)
    code, _ = run_main_in_process("phase_iii_offline_train_or_test.py", "--config", "smoke", "--device", "cpu", "--note", crashed,
                                  *opts, cwd=smoke_ii)
    assert code == 130
    assert torch.load(smoke_ii / f"checkpoints/phase_iii_offline/smoke/{crashed}/last.pt", weights_only=True)["iteration"] == 20
    monkeypatch.setattr(phase_iii_maps, "batch_loss", real_step)
    code, err = run_main_in_process("phase_iii_offline_train_or_test.py", "--config", "smoke", "--device", "cpu", "--note", crashed,
                                    "--resume", *opts, cwd=smoke_ii)
    assert code == 0, err
    whole, resumed = weights(straight), weights(crashed)
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    # the recorded feature statistics cover the whole training in both (last.pt carries them)
    stats = [results(smoke_ii, "phase_iii_offline", note)["feature_statistics"] for note in (straight, crashed)]
    assert stats[0] == stats[1] and stats[0]["iterations"] == [0, 40]


def test_recipe_options_at_their_defaults_change_nothing(smoke_ii):
    """finetune.init / finetune.schedule / fusion.match stated at their defaults give the run of the config that
    does not state them, bit for bit (phase I's classifier, constant lr, the paper's fusion); both record them."""
    def run(*opts):
        code, err = run_main_in_process("phase_iii_offline_train_or_test.py", "--config", "smoke", "--device", "cpu",
                                        "--note", "default", "--overwrite", "--opts", "finetune.iterations=20",
                                        "finetune.eval_every=10", *opts, cwd=smoke_ii)
        assert code == 0, err
        folder = smoke_ii / "checkpoints/phase_iii_offline-none/smoke/default"
        return torch.load(folder / "last.pt", weights_only=True)["model"], results(smoke_ii, "phase_iii_offline-none")

    implicit, implicit_results = run("finetune.generator=none")
    explicit, explicit_results = run("finetune.generator=none", "finetune.init=phase_i", "finetune.schedule=constant",
                                     "fusion.match=none")
    assert all(torch.equal(implicit[k], explicit[k]) for k in implicit)
    for r in (implicit_results, explicit_results):
        assert r["finetune"] == {"init": "phase_i", "schedule": "constant", "lr": 0.01}
        assert r["fusion"] == {"match": "none", "applied": False}
        assert [h["lr"] for h in r["history"][1:]] == [0.01, 0.01]
        assert {"real", "generated", "iterations"} <= set(r["feature_statistics"])
        assert "generated_before_match" not in r["feature_statistics"]
    assert implicit_results["feature_statistics"] == explicit_results["feature_statistics"]


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_crt_recipe_with_matched_fusion(smoke_ii, monkeypatch, mode):
    """finetune.init: reinit trains a fresh classifier (not phase I's), finetune.schedule: cosine sets each
    iteration's lr, fusion.match: norm gives the fused rows their class's real norm; all recorded."""
    from models import fresh_like

    started = {}
    real_fit = phase_iii_maps.fit

    def spy_fit(task, optimizer, *args, **kwargs):
        started["fc"] = {k: v.clone() for k, v in task.inputs.model.fc.state_dict().items()}
        started["lr"] = []
        real_step = task.step

        def step(batch):
            started["lr"].append(optimizer.param_groups[0]["lr"])
            return real_step(batch)

        task.step = step
        return real_fit(task, optimizer, *args, **kwargs)

    monkeypatch.setattr(phase_iii_maps, "fit", spy_fit)
    code, err = run_main_in_process(f"phase_iii_{mode}_train_or_test.py", "--config", "smoke", "--device", "cpu", "--note",
                                    "default", "--overwrite", "--opts", "finetune.iterations=10", "finetune.eval_every=5",
                                    "finetune.init=reinit", "finetune.schedule=cosine", "fusion.match=norm", cwd=smoke_ii)
    assert code == 0, err
    phase_i_fc = torch.load(smoke_ii / "checkpoints/phase_i/smoke/default/best_model.pt", weights_only=True)["model"]
    assert not torch.equal(started["fc"]["weight"], phase_i_fc["fc.weight"])
    template = torch.nn.Linear(phase_i_fc["fc.weight"].shape[1], phase_i_fc["fc.weight"].shape[0])
    torch.manual_seed(0)  # the config's seed
    expected = fresh_like(template)
    assert all(torch.equal(started["fc"][k], v) for k, v in expected.state_dict().items())
    assert started["lr"] == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(10)])
    r = results(smoke_ii, f"phase_iii_{mode}")
    assert r["finetune"] == {"init": "reinit", "schedule": "cosine", "lr": 0.01}
    assert r["fusion"] == {"match": "norm", "applied": True}
    stats = r["feature_statistics"]
    for c in r["tail_classes"]:
        assert stats["generated"]["norm"][c] == pytest.approx(stats["match_targets"]["norm"][c], rel=1e-5)
        assert stats["generated_before_match"]["rows"][c] == stats["generated"]["rows"][c] > 0
    assert all(n is None for c, n in enumerate(stats["generated"]["norm"]) if c not in r["tail_classes"])


def copy_outputs(src: Path, dst: Path, features: bool = True) -> None:
    shutil.copytree(src / "checkpoints/phase_i", dst / "checkpoints/phase_i")
    if features:
        shutil.copytree(src / "features", dst / "features")


def test_phase_iii_before_phase_ii_names_the_command(tmp_path, smoke_ii):
    copy_outputs(smoke_ii, tmp_path, features=False)
    code, err = run_main_in_process("phase_iii_online_train_or_test.py", "--config", "smoke", "--device", "cpu", cwd=tmp_path)
    assert code == 2 and "python phase_ii_extract_feature.py --config smoke" in err


def test_stale_phase_ii_outputs_are_refused(tmp_path, smoke_ii):
    copy_outputs(smoke_ii, tmp_path)
    best = tmp_path / "checkpoints/phase_i/smoke/default/best_model.pt"
    payload = torch.load(best, weights_only=True)
    payload["model"]["fc.bias"] += 1  # "retrained" phase I
    torch.save(payload, best)
    prov_path = tmp_path / "features/smoke/default/provenance.json"
    prov = json.loads(prov_path.read_text())
    prov["phase_i_checkpoint"]["path"] = str(best)
    prov_path.write_text(json.dumps(prov))
    code, err = run_main_in_process("phase_iii_offline_train_or_test.py", "--config", "smoke", "--device", "cpu", cwd=tmp_path)
    assert code == 2 and "different phase I checkpoint" in err and "--overwrite" in err


def test_offline_without_a_store(tmp_path, smoke_ii):
    copy_outputs(smoke_ii, tmp_path)
    shutil.rmtree(tmp_path / "features/smoke/default/store")
    code, err = run_main_in_process("phase_iii_offline_train_or_test.py", "--config", "smoke", "--device", "cpu", cwd=tmp_path)
    assert code == 2 and "store.enabled=true" in err


def test_tail_class_without_confusing_class(tmp_path, smoke_ii):
    copy_outputs(smoke_ii, tmp_path)
    path = tmp_path / "features/smoke/default/confusion.json"
    confusion = json.loads(path.read_text())
    tail = sorted(confusion["confusing"], key=int)[0]
    del confusion["confusing"][tail]
    path.write_text(json.dumps(confusion))
    code, err = run_main_in_process("phase_iii_online_train_or_test.py", "--config", "smoke", "--device", "cpu", cwd=tmp_path)
    assert code == 2 and f"tail classes [{tail}] have no confusing class" in err


def test_zero_batch_is_rejected(smoke_ii):
    code, err = run_main_in_process("phase_iii_online_train_or_test.py", "--config", "smoke", "--device", "cpu", "--opts",
                                    "finetune.nt=0", cwd=smoke_ii)
    assert code == 2 and "batch = 2*nt*(1+na)" in err


def test_batch_loss_shares_average_to_the_full_batch_gradient():
    """Under torchrun each rank takes every W-th tail / head row; with the loss scaled by
    world_size / global_rows, DDP's mean of the ranks' gradients is the full batch's gradient."""
    from types import SimpleNamespace

    from fsa.batch_composition import BatchPlan
    from models import build_model

    nt, na, world = 3, 2, 2  # uneven shares (2 + 1 tail, 5 + 4 head rows): a plain mean per rank would be wrong
    maps_table = torch.randn(len(LABELS), 64, 2, 2, generator=torch.Generator().manual_seed(0))

    class Doubling:  # deterministic stand-in for a generator: na scaled copies of each tail map
        ctx = SimpleNamespace(labels=LABELS)

        def extra_indices(self, tail_labels, rng):
            return torch.zeros(0, dtype=torch.long)

        def generate(self, tail_maps, tail_cams, tail_y, extra_maps, extra_cams, extra_y, rng):
            return 0.5 * tail_maps.repeat_interleave(na, 0), tail_y.repeat_interleave(na)

    def fetch(indices, rng):
        return maps_table[indices], torch.rand(len(indices), 2, 2), LABELS[indices]

    plan, _ = TailHeadComposer(LABELS, TAIL, HEAD, nt, na, seed=3).plan(7)
    model = build_model("resnet8", 5)

    def fc_grad(share: BatchPlan, world_size: int) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss, _, _ = phase_iii_maps.batch_loss(model, Doubling(), share, torch.Generator(), fetch,
                                               global_rows=batch_size(nt, na), world_size=world_size)
        loss.backward()  # the caller (engine.loops.fit) steps the optimizer
        return model.fc.weight.grad.clone()

    full = fc_grad(plan, 1)
    shares = [BatchPlan(tail=plan.tail[r::world], head=plan.head[r::world]) for r in range(world)]
    averaged = sum(fc_grad(share, world) for share in shares) / world
    torch.testing.assert_close(averaged, full)


def test_online_fine_tuning_on_image_files_prefetches_through_dataloader_workers(tmp_path, monkeypatch):
    """A file dataset (image folder): phase III online loads each iteration's images ahead through
    one persistent DataLoader with workers, and every batch matches the iteration's draws."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, counts in (("train", (30, 10, 4)), ("val", (5, 5, 5))):
        for cls, (n, colour) in enumerate(zip(counts, ((200, 30, 30), (30, 200, 30), (30, 30, 200)))):
            folder = tmp_path / "data" / split / f"c{cls}"
            folder.mkdir(parents=True)
            for k in range(n):
                pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")
    data = ["dataset.name=image-folder", f"dataset.root={tmp_path / 'data'}", "dataset.image_size=16"]
    common = ("--config", "smoke", "--device", "cpu")
    code, err = run_main_in_process("phase_i_train_or_test.py", *common, "--opts", *data, "model.arch=resnet8",
                                    "train.epochs=1", "train.batch_size=8", "train.num_workers=2", cwd=tmp_path)
    assert code == 0, err
    code, err = run_main_in_process("phase_ii_extract_feature.py", *common, "--opts", "confusion.nf=1",
                                    "store.num_workers=2", cwd=tmp_path)
    assert code == 0, err

    fetched = []
    original = phase_iii_maps._OnlineMaps._images

    def spy(self, indices, rng):
        fetched.append((self._ahead is not None, indices.tolist()))
        return original(self, indices, rng)

    monkeypatch.setattr(phase_iii_maps._OnlineMaps, "_images", spy)
    code, err = run_main_in_process("phase_iii_online_train_or_test.py", *common, "--opts", "finetune.iterations=4",
                                    "finetune.eval_every=2", "finetune.nt=2", "finetune.na=1", "finetune.num_workers=2",
                                    cwd=tmp_path)
    assert code == 0, err
    results = json.loads((tmp_path / "checkpoints/phase_iii_online/smoke/default/results.json").read_text())
    assert results["finished"] and results["num_test_samples"] == 15
    assert len(fetched) == 4 and all(prefetched for prefetched, _ in fetched)
    # nt tail + nt*na donors + nt*(1+na) head images; a batch out of step with the draws raises in _images
    assert all(len(indices) == 2 + 2 * 1 + 2 * (1 + 1) for _, indices in fetched)


def test_default_budget_is_the_papers_rows_per_training_image():
    """finetune.iterations: null = the paper's 6,400 iterations of 128 rows per CIFAR-10-LT's 12,406 images,
    scaled to the training set (a 438-image folder: 226 iterations, not 6,400); an explicit value stays."""
    from engine.phase_iii import _resolve_iterations
    from fsa.batch_composition import auto_iterations
    from utils.config import load_config

    assert auto_iterations(12406, 16, 3) == 6400
    assert auto_iterations(438, 16, 3) == round(6400 * 128 / 12406 * 438 / 128) == 226
    assert auto_iterations(438, 4, 3) == round(6400 * 128 / 12406 * 438 / 32)
    assert auto_iterations(1, 16, 3) == 1
    cfg = load_config("smoke", "phase_iii", ["finetune.iterations=null"])
    assert cfg["finetune"]["iterations"] is None
    _resolve_iterations(cfg, 438)
    assert cfg["finetune"]["iterations"] == auto_iterations(438, 4, 3)  # smoke: nt 4, na 3
    explicit = load_config("smoke", "phase_iii")
    _resolve_iterations(explicit, 438)
    assert explicit["finetune"]["iterations"] == 60
    assert load_config("cifar10-LT_resnet18", "phase_iii")["finetune"]["iterations"] == 6400


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_frozen_backbone_evaluation_equals_a_full_forward(classifier, amp):
    """Classifier-only runs evaluate fc on features computed once: the reports must be those of model(x)."""
    from datasets import build_datasets
    from engine.accel import Accel
    from engine.loops import EvalSets
    from models import build_model

    cfg = load_config("smoke", "phase_i", ["dataset.val.source=train", "dataset.val.fraction=0.2"])
    bundle = build_datasets(cfg["dataset"])
    torch.manual_seed(0)
    model = build_model("resnet8", bundle.num_classes, bundle.train.images.shape[1], classifier=classifier)
    model.eval()
    accel = Accel.from_config({"amp": amp, "channels_last": "auto"}, torch.device("cpu"))
    accel.prepare_model(model)
    sets = EvalSets.of(bundle, 16, torch.device("cpu"))
    frozen = phase_iii_maps.FrozenBackboneEval(model, sets, accel)
    for step in range(3):  # the fc moves as training would; the cached features stay valid
        with torch.no_grad():
            model.fc.weight.add_(torch.randn_like(model.fc.weight) * 0.3)
        expected = sets.evaluate(model, bundle.train_counts, 0.2, accel=accel)
        assert frozen.evaluate(model, bundle.train_counts, 0.2, accel=accel) == expected
        assert expected[1] is not None
