"""Phase II end to end (smoke phase I -> phase II through the CLI), the feature store, provenance,
and bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import copy_phase_i, run_main_in_process, run_script

SCRIPT = "phase_ii_extract_feature.py"
FEATURES = Path("features/smoke/default")
PHASE_I = Path("checkpoints/phase_i/smoke/default")


def smoke_phase_ii(tmp_path_factory, phase_i_dir: Path) -> Path:
    """A tmp cwd holding the smoke phase I run and its phase II outputs, made once per session
    (shared with tests/test_visualize.py through the session's base temp folder)."""
    cwd = tmp_path_factory.getbasetemp() / "phase_ii_smoke"
    done = cwd / ".ready"
    if not done.is_file():
        if cwd.exists():
            shutil.rmtree(cwd)
        copy_phase_i(phase_i_dir, cwd)
        # float32 (accel.amp=none): the tests recompute maps, CAMs and scores with the float32 model as their oracle
        run_script(SCRIPT, "--config", "smoke", "--device", "cpu", "--opts", "accel.amp=none", cwd=cwd)
        done.write_text("ok")
    return cwd


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, smoke_phase_i) -> Path:
    return smoke_phase_ii(tmp_path_factory, smoke_phase_i)


@pytest.fixture(scope="module")
def phase_i(run_dir):
    """(model in eval mode, dataset bundle) of the smoke phase I run, rebuilt in this process."""
    from engine.artifacts import open_phase_i_run

    p1 = open_phase_i_run("smoke", "default", run_dir)
    model = p1.load_model(torch.device("cpu"), run_dir / PHASE_I / "best_model.pt", "phase I")
    return model.eval(), p1.bundle


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------
def test_outputs_exist_and_parse(run_dir):
    out = run_dir / FEATURES
    for name in ("score_matrix.pt", "confusion.json", "split.json", "split_statistics.json", "provenance.json",
                 "config.yaml", "log.txt", "results.json", "store/meta.json", "store/fmaps.npy"):
        assert (out / name).is_file(), name
    results = _json(out / "results.json")
    assert results["finished"] is True and results["cam_method"] == "closed_form"
    assert results["store_bytes"] > 0 and set(results["timings"]) >= {"forward_cam_s", "store_write_s"}
    assert "feature store" in (out / "log.txt").read_text()
    stats = _json(out / "split_statistics.json")
    assert stats["ts"] == 0.8 and stats["tg"] == 0.2
    assert sum(stats["count"]) == results["num_samples"]
    for s, g in zip(stats["specific"], stats["generic"]):
        assert 0 <= s <= 1 and 0 <= g <= 1 and s + g <= 1 + 1e-9


def test_score_matrix_rows_are_true_classes_and_confusion_matches(run_dir, phase_i):
    from fsa.confusion import confusing_classes

    model, bundle = phase_i
    out = run_dir / FEATURES
    matrix = torch.load(out / "score_matrix.pt", weights_only=True)
    c = bundle.num_classes
    assert matrix.shape == (c, c)
    assert torch.allclose(matrix.sum(1), torch.ones(c), atol=1e-4)
    # recompute from the model: rows = TRUE class (mean softmax over that class's training images)
    x = bundle.train.with_augment(False).get_batch(torch.arange(len(bundle.train)))
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
    expected = torch.stack([probs[bundle.train.targets == k].mean(0) for k in range(c)])
    assert torch.allclose(matrix, expected, atol=1e-5)

    conf = _json(out / "confusion.json")
    tail = _json(out / "split.json")["tail"]
    recomputed = confusing_classes(torch.tensor(conf["score_matrix"]), tail, conf["nf"])
    assert {int(k): v for k, v in conf["confusing"].items()} == recomputed
    assert recomputed == confusing_classes(matrix, tail, conf["nf"]) and len(recomputed) == len(tail) > 0
    assert conf["class_names"] == bundle.class_names and conf["nf"] == 2


def test_split_is_head_tail_split_of_train_counts(run_dir):
    from fsa.class_split import head_tail_split

    import yaml

    split = _json(run_dir / FEATURES / "split.json")
    assert split["hr"] == yaml.safe_load((run_dir / PHASE_I / "config.yaml").read_text())["eval"]["hr"]  # phase I's hr
    assert split["train_counts"] == _json(run_dir / PHASE_I / "results.json")["train_counts"]
    head, tail = head_tail_split(split["train_counts"], split["hr"])
    assert (split["head"], split["tail"]) == (head, tail) and tail
    assert sorted(split["head"] + split["tail"]) == list(range(len(split["train_counts"])))


def test_store_view0_equals_model_features_of_unaugmented_images(run_dir, phase_i):
    from fsa.feature_store import FeatureStore

    model, bundle = phase_i
    store = FeatureStore(run_dir / FEATURES / "store")
    n = len(bundle.train)
    assert store.num_samples == n and store.views == 1 and store.num_test == len(bundle.test)
    x = bundle.train.with_augment(False).get_batch(torch.arange(n))
    with torch.no_grad():
        fmap = model.features(x)
    assert store.fmap_shape == tuple(fmap.shape[1:])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    fm, cams, labels = store.get(perm, 0)
    assert fm.dtype == torch.float32 and cams.shape == (n, *fmap.shape[2:])
    torch.testing.assert_close(fm, fmap[perm], atol=2e-3, rtol=2e-3)  # float16 storage
    assert torch.equal(labels, bundle.train.targets[perm])
    assert torch.equal(store.indices, torch.arange(n)) and torch.equal(store.labels, bundle.train.targets)
    torch.testing.assert_close(store.pooled(0), fmap.mean((2, 3)), atol=1e-5, rtol=1e-5)
    assert 0 <= cams.min() and cams.max() <= 1
    xt = bundle.test.with_augment(False).get_batch(torch.arange(len(bundle.test)))
    with torch.no_grad():
        torch.testing.assert_close(store.test_pooled(), model.pool(model.features(xt)), atol=1e-5, rtol=1e-5)
    assert torch.equal(store.test_labels(), bundle.test.targets)


def test_cams_lie_on_the_class_shape(run_dir, phase_i):
    """The class-specific part is the shape: mean CAM inside the shape mask beats the background."""
    from fsa.feature_store import FeatureStore

    _, bundle = phase_i
    store = FeatureStore(run_dir / FEATURES / "store")
    _, cams, _ = store.get(torch.arange(store.num_samples), 0)
    masks = bundle.train.masks.float()
    up = F.interpolate(cams[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    inside = (up * masks).sum((1, 2)) / masks.sum((1, 2))
    outside = (up * (1 - masks)).sum((1, 2)) / (1 - masks).sum((1, 2))
    share = (inside > outside).float().mean().item()
    assert share > 0.8, (
        f"CAM beats the background on only {share:.0%} of samples (inside {inside.mean():.3f}, outside "
        f"{outside.mean():.3f}); is the smoke phase I model still near chance?")
    assert inside.mean() > 2 * outside.mean()


def test_autograd_path_equals_closed_form_and_other_layers_resize(phase_i):
    from fsa.gradcam import CamExtractor

    model, bundle = phase_i
    x = bundle.train.with_augment(False).get_batch(torch.arange(0, len(bundle.train), 7))
    y = bundle.train.targets[torch.arange(0, len(bundle.train), 7)]
    auto = CamExtractor(model, None, "auto")
    assert (auto.layer, auto.method) == (model.cam_layer, "closed_form")
    f1, c1, l1 = CamExtractor(model, None, "closed_form")(x, y)
    f2, c2, l2 = CamExtractor(model, None, "autograd")(x, y)
    torch.testing.assert_close(f1, f2)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(c1, c2, atol=1e-4, rtol=1e-4)
    other = CamExtractor(model, "layer2", "auto")
    assert (other.layer, other.method) == ("layer2", "autograd")
    f3, c3, _ = other(x, y)
    assert c3.shape == c1.shape and torch.equal(f3, f1) and 0 <= c3.min() and c3.max() <= 1
    assert all(p.grad is None for p in model.parameters())


def test_views_autograd_and_disabled_store_through_the_cli(run_dir, tmp_path):
    from fsa.feature_store import FeatureStore

    cwd = _copy_run(run_dir, tmp_path / "copy")
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", "--overwrite", "--opts",
                                    "gradcam.method=autograd", "store.views=1", "accel.amp=none", cwd=cwd)
    assert code == 0, err
    results = _json(cwd / FEATURES / "results.json")
    assert results["cam_method"] == "autograd" and results["views"] == 2
    new, old = FeatureStore(cwd / FEATURES / "store"), FeatureStore(run_dir / FEATURES / "store")
    assert new.views == 2 and new.num_samples == old.num_samples
    idx = torch.arange(new.num_samples)
    f_new, c_new, _ = new.get(idx, 0)
    f_old, c_old, _ = old.get(idx, 0)
    assert torch.equal(f_new, f_old)
    assert (c_new - c_old).abs().max() < 2e-3
    f_v1, c_v1, _ = new.get(idx, 1)
    assert not torch.equal(f_v1, f_old) and 0 <= c_v1.min() and c_v1.max() <= 1  # augmented view differs
    per_row = torch.arange(len(idx)) % 2
    f_mix, _, _ = new.get(idx, per_row)
    assert torch.equal(f_mix, torch.where((per_row == 0)[:, None, None, None], f_old, f_v1))
    assert _json(cwd / FEATURES / "confusion.json")["confusing"] == _json(run_dir / FEATURES / "confusion.json")["confusing"]

    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", "--overwrite", "--opts",
                                    "store.enabled=false", cwd=cwd)
    assert code == 0, err
    assert not (cwd / FEATURES / "store").exists()
    results = _json(cwd / FEATURES / "results.json")
    assert results["store_enabled"] is False and results["store_bytes"] == 0
    assert (cwd / FEATURES / "confusion.json").is_file()


# ------------------------------------------------------------------------------------------------
# the feature store on its own
# ------------------------------------------------------------------------------------------------
def test_store_round_trips_exactly(tmp_path):
    from fsa.feature_store import FeatureStore, FeatureStoreWriter
    from utils.errors import UserError

    g = torch.Generator().manual_seed(0)
    n, views, shape, nt = 37, 2, (5, 3, 4), 9
    fmaps = (torch.randn(views, n, *shape, generator=g) * 10).half()
    cams = torch.rand(views, n, *shape[1:], generator=g).half()
    pooled = torch.randn(views, n, shape[0], generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    test_pooled, test_labels = torch.randn(nt, shape[0], generator=g), torch.randint(0, 4, (nt,), generator=g)
    writer = FeatureStoreWriter(tmp_path / "s", num_samples=n, fmap_shape=shape, views=views, num_test=nt)
    for v in (1, 0):  # any order of views and batches
        for start in (30, 0, 10, 20):
            stop = min(start + 10, n)
            writer.write(v, start, fmaps[v, start:stop], cams[v, start:stop], pooled[v, start:stop])
    writer.write_labels(0, labels, torch.arange(n))
    writer.write_test(0, test_pooled, test_labels)
    with pytest.raises(UserError):
        FeatureStore(tmp_path / "s")  # not closed yet: no meta.json
    meta = writer.close({"note": "x"})
    assert meta["complete"] and meta["note"] == "x" and meta["views"] == views

    for in_memory in (False, True):
        store = FeatureStore(tmp_path / "s", in_memory=in_memory)
        assert (store.num_samples, store.views, store.fmap_shape) == (n, views, shape)
        assert store.array("fmaps").dtype == np.float16 and store.array("cams").dtype == np.float16
        idx = torch.tensor([5, 0, 36, 5, 12])
        for v in range(views):
            f, c, lab = store.get(idx, v)
            assert torch.equal(f, fmaps[v, idx].float()) and torch.equal(c, cams[v, idx].float())
            assert torch.equal(lab, labels[idx])
            assert torch.equal(store.pooled(v), pooled[v])
        vrow = torch.tensor([1, 0, 1, 0, 1])
        f, c, _ = store.get(idx, vrow)
        assert torch.equal(f, fmaps[vrow, idx].float()) and torch.equal(c, cams[vrow, idx].float())
        assert torch.equal(store.test_pooled(), test_pooled) and torch.equal(store.test_labels(), test_labels)
        assert torch.equal(store.labels, labels)
    raw = np.load(tmp_path / "s" / "fmaps.npy", mmap_mode="r")  # plain .npy files
    assert np.array_equal(raw, fmaps.numpy())

    incomplete = FeatureStoreWriter(tmp_path / "t", num_samples=4, fmap_shape=shape)
    incomplete.write(0, 0, fmaps[0, :2], cams[0, :2])
    with pytest.raises(ValueError, match="incomplete"):
        incomplete.close()


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status")


def test_store_writer_memory_stays_flat(tmp_path):
    from fsa.feature_store import FeatureStoreWriter

    n, shape, bs = 20_000, (64, 8, 8), 500
    array_mib = n * 64 * 8 * 8 * 2 / 2**20  # 156 MiB of float16 feature maps
    fm = torch.randn(bs, *shape)
    cam = torch.rand(bs, 8, 8)
    writer = FeatureStoreWriter(tmp_path / "big", num_samples=n, fmap_shape=shape)
    before = _rss_kib()
    peak = before
    for start in range(0, n, bs):
        writer.write(0, start, fm, cam)
        writer.write_labels(start, torch.zeros(bs, dtype=torch.long), torch.arange(start, start + bs))
        peak = max(peak, _rss_kib())
    writer.close()
    growth_mib = (max(peak, _rss_kib()) - before) / 1024
    assert (tmp_path / "big" / "fmaps.npy").stat().st_size > array_mib * 2**20
    assert growth_mib < array_mib / 8, f"RSS grew by {growth_mib:.1f} MiB writing a {array_mib:.0f} MiB array"


# ------------------------------------------------------------------------------------------------
# provenance, overwrite
# ------------------------------------------------------------------------------------------------
def test_provenance_accepts_the_right_run_and_refuses_another(run_dir, tmp_path):
    from engine.phase_ii_outputs import check_provenance
    from utils.errors import UserError

    out, ckpt, cfg = run_dir / FEATURES, run_dir / PHASE_I / "best_model.pt", run_dir / PHASE_I / "config.yaml"
    prov = check_provenance(out, ckpt, cfg)
    assert prov["config"] == "smoke" and len(prov["phase_i_checkpoint"]["sha256"]) == 64
    assert prov["phase_ii_config"]["confusion"]["nf"] == 2

    payload = torch.load(ckpt, weights_only=True)
    key = next(iter(payload["model"]))
    payload["model"][key] = payload["model"][key] + 1e-3
    other = tmp_path / "retrained.pt"
    torch.save(payload, other)
    with pytest.raises(UserError, match="different phase I checkpoint") as info:
        check_provenance(out, other, cfg)
    assert "python phase_ii_extract_feature.py --config smoke --overwrite" in str(info.value)
    edited = tmp_path / "config.yaml"
    edited.write_text(cfg.read_text().replace("seed: 0", "seed: 1", 1))
    with pytest.raises(UserError, match="different phase I config"):
        check_provenance(out, ckpt, edited)
    with pytest.raises(UserError, match="Run phase II first"):
        check_provenance(tmp_path / "features/smoke/default", ckpt, cfg)


def test_finished_outputs_are_not_overwritten(run_dir):
    before = {p.name: p.read_bytes() for p in (run_dir / FEATURES).glob("*.json")}
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", cwd=run_dir)
    assert code == 2 and "--overwrite" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (run_dir / FEATURES).glob("*.json")} == before


# ------------------------------------------------------------------------------------------------
# bad input: exit 2, a clear message, no traceback, and finished outputs left alone
# ------------------------------------------------------------------------------------------------
def test_phase_ii_before_phase_i_names_the_phase_i_command(tmp_path):
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", cwd=tmp_path)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "python phase_i_train_or_test.py --config smoke" in err
    assert not (tmp_path / "features").exists()
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--note", "other", "--device", "cpu", cwd=tmp_path)
    assert code == 2 and "python phase_i_train_or_test.py --config smoke --note other" in err


@pytest.mark.parametrize("opts, expected", [
    (["gradcam.layer=no_such_layer"], ["no_such_layer", "layer1", "layer3"]),
    (["split.ts=0.2", "split.tg=0.5"], ["tg < ts"]),
    (["split.ts=0.5", "split.tg=0.5"], ["tg < ts"]),
    (["split.hr=1.5"], ["split.hr moved", "eval.hr"]),  # one hr for every phase: phase I's eval.hr
    (["split.hr=0"], ["split.hr moved", "eval.hr"]),
    (["confusion.nf=8"], ["confusion.nf", "number of classes"]),
    (["gradcam.method=closed_form", "gradcam.layer=layer2"], ["closed_form", "layer2"]),
])
def test_bad_settings_fail_cleanly(run_dir, opts, expected):
    before = (run_dir / FEATURES / "results.json").read_bytes()
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", "--overwrite", "--opts", *opts,
                                    cwd=run_dir)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    assert (run_dir / FEATURES / "results.json").read_bytes() == before  # validation precedes any deletion


def test_nf_message_names_the_class_count(run_dir):
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", "--overwrite", "--opts",
                                    "confusion.nf=99", cwd=run_dir)
    n = len(_json(run_dir / FEATURES / "split.json")["train_counts"])
    assert code == 2 and "confusion.nf = 99" in err and f"number of classes ({n}" in err


def test_checkpoint_of_another_dataset_is_refused(run_dir, tmp_path):
    from utils.checkpoint import save_checkpoint

    payload = torch.load(run_dir / PHASE_I / "best_model.pt", weights_only=True)
    payload.pop("format")
    payload["dataset"] = "cifar10-LT"
    other = tmp_path / "cifar.pt"
    save_checkpoint(other, payload)
    code, err = run_main_in_process(SCRIPT, "--config", "smoke", "--device", "cpu", "--overwrite",
                                    "--checkpoint", str(other), cwd=run_dir)
    assert code == 2 and "cifar10-LT" in err and "synthetic-LT" in err and "Traceback" not in err
    assert (run_dir / FEATURES / "store" / "meta.json").is_file()
