"""Phase II: batched Grad-CAM over the long-tailed training set, the class-specific / class-generic
split statistics, the confusing classes of every tail class, and the offline feature store.

Every file is written through ``engine.artifacts`` (which later phases read it with). Inputs: the
phase I run with the same config name and note of the config's ``backbone`` (a phase I method of
``engine.methods``; ``ce``: ``checkpoints/phase_i/<config>/<note>/``, else ``checkpoints/phase_i-<backbone>/``):
its ``config.yaml`` gives dataset and model, its ``train_subset.json`` the long-tailed subset, its
``best_model.pt`` the weights unless ``--checkpoint`` names another file).

Outputs in ``features/<config>/<note>/`` (``features-<backbone>/`` off CE; formats: see :func:`run` and ``fsa/feature_store.py``):

    score_matrix.pt         float32 [C, C] mean softmax score, rows = TRUE class
    confusion.json          {nf, tail, confusing: {tail class: [top-nf classes]}, score_matrix, class_names}
    split.json              {hr, head, tail, train_counts, class_names}
    split_statistics.json   {ts, tg, specific, generic, count, per_class: {...}}
    store/                  the feature store (unless store.enabled: false)
    provenance.json         sha256 of the phase I checkpoint and config.yaml (engine/artifacts.py)
    config.yaml, log.txt, results.json {finished, timings, num_samples, store_bytes, ...}

CAMs come from :class:`fsa.gradcam.CamExtractor`: one forward pass per batch for the CAM layer of a
GAP + linear head (closed form, no backward); ``gradcam.method: autograd`` differentiates the head
with autograd on the same forward; a non-CAM ``gradcam.layer`` costs a forward + backward plus a
no-grad forward for the CAM-layer maps, and its CAMs are resized to the CAM-layer resolution.
"""
from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from datasets.loader import BatchLoader
from engine.accel import NO_ACCEL, Accel
from engine.artifacts import (STORE_DIR, make_provenance, open_phase_i_run, phase_ii_command, phase_ii_paths, write_phase_ii,
                              write_provenance)
from engine.loops import ordered_map
from fsa.class_split import head_tail_split
from fsa.confusion import ScoreAccumulator, confusing_classes
from fsa.decomposition import SplitStatistics
from fsa.feature_store import FeatureStoreWriter, format_bytes, store_nbytes
from fsa.gradcam import CamExtractor, eval_mode
from utils.cli import RunSpec
from utils.config import config_name, dump_config, load_config
from utils import distributed
from utils.errors import UserError
from utils.logging import setup_logger, silent_logger
from utils.provenance import begin_run, collect
from utils.run_dir import (is_finished, lock_run, open_pending, output_root, read_results, recover_replaced,
                           run_started, write_json_atomic)
from utils.seeding import seed_everything, stream_seed

PHASE = "phase_ii"

__all__ = ["PHASE", "ExtractionTimer", "extract_view", "extract_test_pooled", "run"]


# ------------------------------------------------------------------------------------------------
# Feature maps + CAMs of the training set
# ------------------------------------------------------------------------------------------------
class ExtractionTimer:
    """Wall-clock seconds of compute (forward + CAM + statistics) and of store writes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.compute_s = 0.0
        self.write_s = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def measure(self, what: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - start
            if what == "compute":
                self.compute_s += elapsed
            else:
                self.write_s += elapsed


def _write_rows(writer: FeatureStoreWriter, view: int, fmap16: Tensor, cam16: Tensor, pooled: Tensor, y: Tensor,
                idx: Tensor) -> None:
    """Store rows of one batch; they must be consecutive training-set positions."""
    if not len(idx):
        return
    start = int(idx[0])
    if not torch.equal(idx, torch.arange(start, start + len(idx))):
        raise RuntimeError("phase II batches must cover the training set in order")
    writer.write(view, start, fmap16, cam16, pooled)
    if view == 0:
        writer.write_labels(start, y, idx)


def extract_view(extractor: CamExtractor, dataset, batch_size: int, device: torch.device, *, view: int = 0,
                 seed: int | None = None, writer: FeatureStoreWriter | None = None,
                 scores: ScoreAccumulator | None = None, stats: SplitStatistics | None = None,
                 timer: ExtractionTimer | None = None, accel: Accel = NO_ACCEL, store: bool | None = None,
                 num_workers: int = 0, desc: str = "phase II") -> None:
    """One pass over `dataset` (augmented batch b seeded ``stream_seed(seed, b)``): CAMs of the true
    class, score / split statistics (when given) and store rows of ``view`` (when a writer is given).

    Through :func:`engine.loops.ordered_map`: under torchrun the ranks share the batches and rank 0
    books them in single-process order, so statistics and store are those of a single process.
    ``store`` (whether rank 0 writes store rows, hence whether maps are gathered; default: ``writer
    is not None``) must be the same on every rank."""
    timer = timer or ExtractionTimer(torch.device("cpu"))
    store = writer is not None if store is None else store

    def maps_of(x: Tensor, y: Tensor, idx: Tensor) -> dict[str, Tensor]:
        with timer.measure("compute"):
            with accel.autocast():
                fmap, cam, logits = extractor(accel.inputs(x), y)
            rows = {"cam": cam.float(), "logits": logits.float(), "y": y, "idx": idx}
            if store:
                fmap = fmap.float()
                rows.update(fmap16=fmap.to(torch.float16), pooled=fmap.mean(dim=(2, 3)))
        return rows

    def book(part: dict[str, Tensor]) -> None:
        with timer.measure("write"):
            if scores is not None:
                scores.update(part["logits"], part["y"])
            if stats is not None:
                stats.update(part["cam"], part["y"])
            if writer is not None:
                _write_rows(writer, view, part["fmap16"].cpu(), part["cam"].to(torch.float16).cpu(),
                            part["pooled"].cpu(), part["y"].cpu(), part["idx"].cpu())

    ordered_map(maps_of, dataset, batch_size, device, seed=seed, num_workers=num_workers, consume=book, desc=desc)


@torch.no_grad()
def extract_test_pooled(model, dataset, batch_size: int, device: torch.device, writer: FeatureStoreWriter | None, *,
                        accel: Accel = NO_ACCEL, num_workers: int = 0) -> None:
    """Pooled features of the (un-augmented) test images into the store (rank 0 writes)."""
    def pooled_of(x: Tensor, y: Tensor, idx: Tensor) -> dict[str, Tensor]:
        with accel.autocast():
            return {"pooled": model.pool(model.features(accel.inputs(x))).float(), "y": y, "idx": idx}

    def book(part: dict[str, Tensor]) -> None:
        if len(part["idx"]):
            writer.write_test(int(part["idx"][0]), part["pooled"].cpu(), part["y"].cpu())

    with eval_mode(model):
        ordered_map(pooled_of, dataset.with_augment(False), batch_size, device, num_workers=num_workers,
                    consume=book, desc="phase II test features")


# ------------------------------------------------------------------------------------------------
# The phase II run
# ------------------------------------------------------------------------------------------------
def _check_not_finished(features_dir: Path, overwrite: bool, config: str, note: str, backbone: str,
                        opts: tuple[str, ...]) -> None:
    results = read_results(features_dir / "results.json")
    if results and results.get("finished") and not overwrite:
        raise UserError(
            f"Finished phase II outputs already exist in {features_dir}. They are not overwritten silently: "
            f"pass --overwrite to replace them ({phase_ii_command(config, note, overwrite=True, backbone=backbone, opts=opts)}), or --note "
            f"NAME for a separate experiment (which needs a phase I run with that note)."
        )


def run(spec: RunSpec) -> dict:
    cfg = load_config(spec.config, PHASE, list(spec.opts))
    name = config_name(spec.config)
    note = spec.note
    root = output_root()
    backbone = cfg["backbone"]
    paths = phase_ii_paths(name, note, backbone, root)
    features_dir = paths.features_dir
    device = distributed.setup_device(spec.device)
    lock_run(paths)
    if distributed.context().is_main and recover_replaced(paths):
        print(f"note: restored the phase II outputs in {features_dir} that an interrupted --overwrite had moved aside.",
              file=sys.stderr)
    # the user's --opts without backbone=, which phase_ii_command states itself
    user_opts = tuple(o for o in spec.opts if not o.startswith("backbone="))
    _check_not_finished(features_dir, spec.overwrite, name, note, backbone, user_opts)

    accel = Accel.from_config(cfg["accel"], device)
    ctx = distributed.context()
    begin_run(cfg)  # determinism, and the start time that provenance records
    seed_everything(cfg["seed"])
    p1 = open_phase_i_run(name, note, root, backbone=backbone)
    bundle = p1.bundle
    num_classes = bundle.num_classes
    nf = cfg["confusion"]["nf"]
    if nf >= num_classes:
        raise UserError(
            f"confusion.nf = {nf} must be smaller than the number of classes ({num_classes}, dataset "
            f"'{bundle.name}'): a class has only {num_classes - 1} other classes to be confused with. "
            f"Set e.g. --opts confusion.nf={max(1, min(3, num_classes - 1))}."
        )
    checkpoint = Path(spec.checkpoint) if spec.checkpoint else p1.paths.best
    model = p1.load_model(device, checkpoint)
    model.eval()
    accel.prepare_model(model)
    extractor = CamExtractor(model, cfg["gradcam"]["layer"], cfg["gradcam"]["method"])
    layer, method = extractor.layer, extractor.method

    train_set = bundle.train.with_augment(False)
    n = len(train_set)
    bs = cfg["gradcam"]["batch_size"]
    probe_x, probe_y, _ = next(iter(BatchLoader(train_set, [[0]], device)))
    with torch.no_grad(), eval_mode(model):
        fmap_shape = tuple(model.features(probe_x).shape[1:])
    extractor(probe_x, probe_y)  # fails early on a bad layer / head

    store_cfg = cfg["store"]
    views = 1 + store_cfg["views"]
    expected_bytes = store_nbytes(views, n, fmap_shape, len(bundle.test)) if store_cfg["enabled"] else 0
    if expected_bytes:
        free = shutil.disk_usage(features_dir.parent if features_dir.parent.exists() else root).free
        if expected_bytes > free:
            raise UserError(
                f"the feature store needs {format_bytes(expected_bytes)} but only {format_bytes(free)} are free "
                f"on the disk of {features_dir}. Free space, lower store.views, or set store.enabled=false "
                f"(phase III offline needs the store)."
            )

    # Every input checked: move any previous (unfinished, or --overwrite) output aside (rank 0); it goes for
    # good once these outputs are complete, and comes back if this run fails before (utils.run_dir).
    if ctx.is_main:
        open_pending(paths, replace=True)
        features_dir.mkdir(parents=True)
        dump_config(cfg, features_dir / "config.yaml")
    logger = setup_logger(features_dir) if ctx.is_main else silent_logger()
    logger.info(f"phase II for config '{name}' note '{note}' on {device} ({ctx.world_size} process(es)): checkpoint "
                f"{checkpoint}, dataset {bundle.name} ({n} train / {len(bundle.test)} test images, {num_classes} "
                f"classes); {accel.describe()}")
    logger.info(f"Grad-CAM: layer {layer} ({method}), CAM-layer maps {list(fmap_shape)}, batch size {bs}")
    if not spec.checkpoint and not is_finished(p1.paths):
        logger.info(f"warning: the phase I run in {p1.paths.checkpoint_dir} has not finished; using its best_model.pt "
                    f"so far (finish it with: {p1.command('--resume')})")

    started = time.perf_counter()
    timer = ExtractionTimer(device)
    scores = ScoreAccumulator(num_classes, device)
    ts, tg = cfg["split"]["ts"], cfg["split"]["tg"]
    stats = SplitStatistics(num_classes, ts, tg, device)
    writer = None
    if store_cfg["enabled"] and ctx.is_main:
        writer = FeatureStoreWriter(features_dir / STORE_DIR, num_samples=n, fmap_shape=fmap_shape, views=views,
                                    num_test=len(bundle.test))
        logger.info(f"feature store: {views} view(s) x {n} samples x {list(fmap_shape)} float16 -> "
                    f"{format_bytes(expected_bytes)} in {features_dir / STORE_DIR}")
    test_s = 0.0
    common = {"timer": timer, "accel": accel, "store": store_cfg["enabled"], "writer": writer,
              "num_workers": store_cfg["num_workers"]}
    try:
        extract_view(extractor, train_set, bs, device, view=0, scores=scores, stats=stats, desc="phase II (view 0)",
                     **common)
        if store_cfg["enabled"]:
            augmented = bundle.train.with_augment(True)
            for view in range(1, views):
                # one seed per batch number (per row for file datasets), so the views depend neither on the
                # process count nor on num_workers
                extract_view(extractor, augmented, bs, device, view=view, seed=stream_seed(cfg["seed"], view),
                             desc=f"phase II (view {view})", **common)
            t0 = time.perf_counter()
            extract_test_pooled(model, bundle.test, bs, device, writer, accel=accel, num_workers=store_cfg["num_workers"])
            test_s = time.perf_counter() - t0
            if writer is not None:
                store_meta = writer.close({"cam_layer": layer, "cam_method": method, "arch": model.arch,
                                           "dataset": bundle.name, "class_names": bundle.class_names})
                logger.info(f"feature store written: {format_bytes(store_meta['bytes'])} in {features_dir / STORE_DIR}")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise

    if not ctx.is_main:  # rank 0 holds the gathered statistics and writes every output
        return {}

    # --- confusion, split, statistics -----------------------------------------------------------
    matrix = scores.matrix().cpu()
    counts = bundle.train_counts
    hr = p1.hr  # one head / tail share for every phase: phase I's eval.hr
    head, tail = head_tail_split(counts, hr)
    confusing = confusing_classes(matrix, tail, nf)
    names = bundle.class_names
    st = stats.result()
    write_phase_ii(features_dir, matrix=matrix, nf=nf, hr=hr, head=head, tail=tail, confusing=confusing,
                   counts=counts, names=names, statistics=st, ts=ts, tg=tg,
                   cam={"layer": layer, "method": method, "shape": fmap_shape[1:]})
    for t, c in confusing.items():
        logger.info(f"tail class {t} ({names[t]}, {counts[t]} images): confusing {[names[j] for j in c]}")
    if not tail:
        logger.info(f"no tail class: with phase I's eval.hr={hr} every class is head; phase III has nothing to augment")
    specific = [v for v in st["specific"].cpu().tolist() if v == v]
    generic = [v for v in st["generic"].cpu().tolist() if v == v]
    logger.info(f"split ts={ts} tg={tg}: mean class-specific share {sum(specific) / num_classes:.3f}, "
                f"class-generic share {sum(generic) / num_classes:.3f}")

    write_provenance(features_dir, make_provenance(
        config=name, note=note, checkpoint_path=checkpoint, phase_i_config_path=p1.config_path,
        phase_ii_config=cfg, features_dir=features_dir, backbone=backbone))
    total_s = time.perf_counter() - started
    results = {
        "finished": True,
        "phase": PHASE,
        "config": name,
        "note": note,
        "backbone": backbone,
        "checkpoint": str(checkpoint),
        "phase_i_checkpoint_selection": p1.selection_of(checkpoint),
        "device": str(device),
        "processes": ctx.world_size,
        "accel": accel.describe(),
        "num_samples": n,
        "num_test": len(bundle.test),
        "num_classes": num_classes,
        "cam_layer": layer,
        "cam_method": method,
        "fmap_shape": list(fmap_shape),
        "views": views if writer is not None else 0,
        "store_enabled": writer is not None,
        "store_dir": STORE_DIR if writer is not None else None,
        "store_bytes": store_meta["bytes"] if writer is not None else 0,
        "timings": {
            "forward_cam_s": round(timer.compute_s, 4),
            "store_write_s": round(timer.write_s, 4),
            "test_features_s": round(test_s, 4),
            "total_s": round(total_s, 4),
        },
        "head": head,
        "tail": tail,
        "confusing": {str(t): c for t, c in confusing.items()},
        "provenance": collect(),
    }
    write_json_atomic(features_dir / "results.json", results)
    run_started(paths)
    logger.info(f"phase II finished in {total_s:.1f}s (forward+CAM {timer.compute_s:.1f}s, statistics + store writes "
                f"{timer.write_s:.1f}s) -> {features_dir}")
    return results
