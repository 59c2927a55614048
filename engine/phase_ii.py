"""Phase II: batched Grad-CAM over the long-tailed training set, the class-specific / class-generic
split statistics, the confusing classes of every tail class, and the offline feature store.

Inputs: the phase I run with the same config name and note (``checkpoints/phase_i/<config>/<note>/``:
its ``config.yaml`` gives dataset and model, its ``train_subset.json`` the long-tailed subset, its
``best_model.pt`` the weights unless ``--checkpoint`` names another file).

Outputs in ``features/<config>/<note>/`` (formats: see :func:`run` and ``fsa/feature_store.py``):

    score_matrix.pt         float32 [C, C] mean softmax score, rows = TRUE class
    confusion.json          {nf, tail, confusing: {tail class: [top-nf classes]}, score_matrix, class_names}
    split.json              {hr, head, tail, train_counts, class_names}
    split_statistics.json   {ts, tg, specific, generic, count, per_class: {...}}
    store/                  the feature store (unless store.enabled: false)
    provenance.json         sha256 of the phase I checkpoint and config.yaml (fsa/provenance.py)
    config.yaml, log.txt, results.json {finished, timings, num_samples, store_bytes, ...}

One forward pass per batch: for the CAM layer of a GAP + linear head the CAM is closed-form
(no backward). ``gradcam.method: autograd`` differentiates the head with autograd on the same
forward; a non-CAM ``gradcam.layer`` uses :func:`fsa.gradcam.grad_cam` (forward + backward) plus a
no-grad forward for the CAM-layer maps, and its CAMs are resized to the CAM-layer resolution.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from datasets import DatasetBundle, build_datasets
from datasets.loader import BatchLoader
from engine.accel import NO_ACCEL, Accel
from engine.loops import progress
from engine.phase_i import load_phase_i_model, phase_i_command, selection_of
from fsa.class_split import head_tail_split
from fsa.confusion import ScoreAccumulator, confusing_classes
from fsa.decomposition import SplitStatistics
from fsa.feature_store import FeatureStoreWriter, format_bytes, store_nbytes
from fsa.gradcam import eval_mode, features_and_cams, grad_cam, normalize_cams
from fsa.provenance import make_provenance, phase_ii_command, write_provenance
from models import LTModel
from utils.config import config_name, dump_config, load_config
from utils import distributed
from utils.errors import UserError
from utils.logging import setup_logger, silent_logger
from utils.run_dir import RunPaths, is_finished, lock_run, read_results, remove_run_folder, write_json_atomic
from utils.seeding import derived_seed, seed_everything

PHASE = "phase_ii"
STORE_DIR = "store"

__all__ = ["PHASE", "PhaseIRun", "open_phase_i_run", "resolve_cam_method", "batch_features_cams",
           "ExtractionTimer", "extract_view", "extract_test_pooled", "run", "phase_ii_command", "load_confusion"]


# ------------------------------------------------------------------------------------------------
# The phase I run a later stage builds on
# ------------------------------------------------------------------------------------------------
@dataclass
class PhaseIRun:
    paths: RunPaths          # phase I paths (checkpoint_dir = the phase I run folder)
    config_path: Path        # checkpoints/phase_i/<config>/<note>/config.yaml
    cfg: dict                # the resolved phase I config
    bundle: DatasetBundle    # built with run_dir = the phase I run, so its train_subset.json is reused


def open_phase_i_run(config: str, note: str, root: Path = Path("."), *, needed_by: str = "phase II") -> PhaseIRun:
    """Find the phase I run of (config, note) and rebuild its datasets; UserError naming the phase I
    command when it does not exist."""
    paths = RunPaths("phase_i", config, note, Path(root))
    config_path = paths.checkpoint_dir / "config.yaml"
    if not config_path.is_file():
        raise UserError(
            f"{needed_by} needs the phase I run of config '{config}' (note '{note}'), but "
            f"{config_path} does not exist. Run phase I first: {phase_i_command(config, note)}"
        )
    cfg = load_config(str(config_path), "phase_i")
    bundle = build_datasets(cfg["dataset"], paths.checkpoint_dir)
    return PhaseIRun(paths=paths, config_path=config_path, cfg=cfg, bundle=bundle)


# ------------------------------------------------------------------------------------------------
# Feature maps + CAMs of one batch
# ------------------------------------------------------------------------------------------------
def resolve_cam_method(model: LTModel, layer: str | None, method: str) -> tuple[str, str]:
    """``(layer, method)`` with ``auto`` resolved as :func:`grad_cam` does; checks the layer name."""
    cam_layer = model.cam_layer
    layer = layer or cam_layer
    names = {name for name, _ in model.named_modules()}
    if layer not in names:
        # let grad_cam phrase the error (it lists the valid layers)
        grad_cam(model, torch.zeros(1, model.in_channels, 8, 8), torch.zeros(1, dtype=torch.long), layer=layer)
    if method == "auto":
        method = "closed_form" if layer == cam_layer and isinstance(getattr(model, "fc", None), torch.nn.Linear) else "autograd"
    if method == "closed_form" and layer != cam_layer:
        raise UserError(
            f"gradcam.method closed_form only applies to the CAM layer ('{cam_layer}'), not '{layer}'; "
            f"use gradcam.method=autograd (or auto) for other layers."
        )
    return layer, method


def batch_features_cams(model: LTModel, x: Tensor, y: Tensor, layer: str, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(fmap [B,C,H,W] at the CAM layer, cam [B,H,W] in [0,1], logits [B,K])`` in eval mode.

    ``layer``/``method`` as returned by :func:`resolve_cam_method`. The CAM always has the
    CAM-layer resolution (a CAM of another layer is resized bilinearly and re-normalised).
    """
    if method == "closed_form":
        return features_and_cams(model, x, y)
    with eval_mode(model):
        if layer == model.cam_layer:
            # Grad-CAM at the CAM layer: one backbone forward without graph, autograd through the head only.
            with torch.no_grad():
                fmap = model.features(x)
            with torch.enable_grad():
                leaf = fmap.detach().requires_grad_(True)
                logits = model.head(leaf)
                score = logits.gather(1, y.long().view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(score, leaf)
            weights = grad.mean(dim=(2, 3))
            cam = normalize_cams(F.relu(torch.einsum("bc,bchw->bhw", weights.float(), fmap.float())))
            return fmap, cam, logits.detach()
        cam = grad_cam(model, x, y, layer=layer, method="autograd")
        with torch.no_grad():
            fmap = model.features(x)
            logits = model.head(fmap)
    if cam.shape[-2:] != fmap.shape[-2:]:
        cam = normalize_cams(F.interpolate(cam[:, None], size=fmap.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    return fmap, cam, logits


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


def extract_view(model: LTModel, loader, *, layer: str, method: str, view: int = 0,
                 writer: FeatureStoreWriter | None = None, scores: ScoreAccumulator | None = None,
                 stats: SplitStatistics | None = None, timer: ExtractionTimer | None = None,
                 accel: Accel = NO_ACCEL, rounds: int | None = None, empty: tuple[Tensor, Tensor, Tensor] | None = None,
                 store: bool | None = None, desc: str = "phase II") -> None:
    """One pass over ``loader`` (batches ``(x, y, idx)``): CAMs of the true class, score / split
    statistics (when given) and store rows of ``view`` (when a writer is given).

    Single process: the loader covers the training set in order. Under torchrun each rank's loader
    holds the interleaved batches r, r+W, ... (:func:`utils.distributed.interleaved_batches`); every
    round, rank 0 gathers the W batches of the round and books them in batch order, so statistics and
    store are those of a single process. ``rounds`` (every rank the same), ``empty`` (zero-row
    ``(fmap, cam, logits)``, for a rank whose batches ran out) and ``store`` (whether rank 0 writes
    store rows, hence whether maps are gathered; default: ``writer is not None``) are then required."""
    timer = timer or ExtractionTimer(torch.device("cpu"))
    store = writer is not None if store is None else store
    batches = iter(loader)
    for _ in progress(range(len(loader) if rounds is None else rounds), desc):
        item = next(batches, None)
        with timer.measure("compute"):
            if item is not None:
                x, y, idx = item
                with accel.autocast():
                    fmap, cam, logits = batch_features_cams(model, accel.inputs(x), y, layer, method)
                fmap, cam, logits = fmap.float(), cam.float(), logits.float()
            else:
                assert empty is not None, "a rank without batches needs the zero-row template"
                fmap, cam, logits = empty
                y = idx = torch.zeros(0, dtype=torch.long, device=fmap.device)
            rows = {"cam": cam, "logits": logits, "y": y, "idx": idx}
            if store:
                rows.update(fmap16=fmap.to(torch.float16), pooled=fmap.mean(dim=(2, 3)))
        with timer.measure("write"):  # (under torchrun: gathering to rank 0, then writing)
            gathered = {name: distributed.gather_parts(t) for name, t in rows.items()}
            if gathered["cam"] is None:  # not rank 0: its rows were sent
                continue
            for r in range(len(gathered["cam"])):
                part = {name: parts[r] for name, parts in gathered.items()}
                if scores is not None:
                    scores.update(part["logits"], part["y"])
                if stats is not None:
                    stats.update(part["cam"], part["y"])
                if writer is not None:
                    _write_rows(writer, view, part["fmap16"].cpu(), part["cam"].to(torch.float16).cpu(),
                                part["pooled"].cpu(), part["y"].cpu(), part["idx"].cpu())


@torch.no_grad()
def extract_test_pooled(model: LTModel, loader, writer: FeatureStoreWriter | None, *, feature_dim: int,
                        accel: Accel = NO_ACCEL, rounds: int | None = None) -> None:
    """Pooled features of the (un-augmented) test images into the store; interleaved and gathered to
    rank 0 as :func:`extract_view` does (``writer`` is None on the other ranks)."""
    batches = iter(loader)
    with eval_mode(model):
        for _ in progress(range(len(loader) if rounds is None else rounds), "phase II test features"):
            item = next(batches, None)
            if item is not None:
                x, y, idx = item
                with accel.autocast():
                    pooled = model.pool(model.features(accel.inputs(x))).float()
            else:
                pooled = torch.zeros(0, feature_dim, device=loader.device)
                y = idx = torch.zeros(0, dtype=torch.long, device=loader.device)
            parts = [distributed.gather_parts(t) for t in (pooled, y, idx)]
            if parts[0] is None:
                continue
            for p_pooled, p_y, p_idx in zip(*parts):
                if len(p_idx):
                    writer.write_test(int(p_idx[0]), p_pooled.cpu(), p_y.cpu())


# ------------------------------------------------------------------------------------------------
# The phase II run
# ------------------------------------------------------------------------------------------------
def _none_if_nan(values: list[float]) -> list[float | None]:
    return [None if (v is None or math.isnan(v)) else float(v) for v in values]


def _check_not_finished(features_dir: Path, overwrite: bool, config: str, note: str) -> None:
    results = read_results(features_dir / "results.json")
    if results and results.get("finished") and not overwrite:
        raise UserError(
            f"Finished phase II outputs already exist in {features_dir}. They are not overwritten silently: "
            f"pass --overwrite to replace them ({phase_ii_command(config, note, overwrite=True)}), or --note "
            f"NAME for a separate experiment (which needs a phase I run with that note)."
        )


def run(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, PHASE, args.opts)
    name = config_name(args.config)
    note = args.note
    root = Path(".")
    paths = RunPaths(PHASE, name, note, root)
    features_dir = paths.features_dir
    device = distributed.setup_device(args.device)
    lock_run(paths)
    overwrite = bool(getattr(args, "overwrite", False))
    _check_not_finished(features_dir, overwrite, name, note)

    accel = Accel.from_config(cfg["accel"], device)
    ctx = distributed.context()
    seed_everything(cfg["seed"])
    p1 = open_phase_i_run(name, note, root)
    bundle = p1.bundle
    num_classes = bundle.num_classes
    nf = cfg["confusion"]["nf"]
    if nf >= num_classes:
        raise UserError(
            f"confusion.nf = {nf} must be smaller than the number of classes ({num_classes}, dataset "
            f"'{bundle.name}'): a class has only {num_classes - 1} other classes to be confused with. "
            f"Set e.g. --opts confusion.nf={max(1, min(3, num_classes - 1))}."
        )
    checkpoint = Path(args.checkpoint) if getattr(args, "checkpoint", None) else p1.paths.best
    model, _payload = load_phase_i_model(checkpoint, p1.cfg, bundle, device, phase_i_command(name, note))
    model.eval()
    accel.prepare_model(model)
    layer, method = resolve_cam_method(model, cfg["gradcam"]["layer"], cfg["gradcam"]["method"])

    train_set = bundle.train.with_augment(False)
    n = len(train_set)
    bs = cfg["gradcam"]["batch_size"]
    probe_x, probe_y, _ = next(iter(BatchLoader(train_set, [[0]], device)))
    with torch.no_grad(), eval_mode(model):
        fmap_shape = tuple(model.features(probe_x).shape[1:])
    probe = batch_features_cams(model, probe_x, probe_y, layer, method)  # fails early on a bad layer/head
    empty = tuple(t[:0].float() for t in probe)  # what a rank whose batches ran out contributes

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

    # Every input checked: now replace any previous (unfinished, or --overwrite) output (rank 0).
    if ctx.is_main:
        remove_run_folder(features_dir, paths)
        features_dir.mkdir(parents=True)
        dump_config(cfg, features_dir / "config.yaml")
    logger = setup_logger(features_dir) if ctx.is_main else silent_logger()
    logger.info(f"phase II for config '{name}' note '{note}' on {device} ({ctx.world_size} process(es)): checkpoint "
                f"{checkpoint}, dataset {bundle.name} ({n} train / {len(bundle.test)} test images, {num_classes} "
                f"classes); {accel.describe()}")
    logger.info(f"Grad-CAM: layer {layer} ({method}), CAM-layer maps {list(fmap_shape)}, batch size {bs}")
    if not getattr(args, "checkpoint", None) and not is_finished(p1.paths):
        logger.info(f"warning: the phase I run in {p1.paths.checkpoint_dir} has not finished; using its best_model.pt "
                    f"so far (finish it with: {phase_i_command(name, note)} --resume)")

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
    # batch b of a single process is batch b of this rank's interleaved share (utils.distributed)
    batches, numbers = distributed.interleaved_batches(n, bs)
    common = {"layer": layer, "method": method, "timer": timer, "accel": accel, "empty": empty,
              "rounds": distributed.interleaved_rounds(n, bs), "store": store_cfg["enabled"]}
    workers = store_cfg["num_workers"]
    try:
        loader = BatchLoader(train_set, batches, device, num_workers=workers)
        extract_view(model, loader, view=0, writer=writer, scores=scores, stats=stats, desc="phase II (view 0)", **common)
        if store_cfg["enabled"]:
            augmented = bundle.train.with_augment(True)
            for view in range(1, views):
                view_seed = derived_seed(cfg["seed"], view)
                # one seed per batch number (per row for file datasets), so the views depend neither on the
                # process count nor on num_workers
                loader = BatchLoader(augmented, batches, device, num_workers=workers,
                                     batch_seeds=[derived_seed(view_seed, b) for b in numbers])
                extract_view(model, loader, view=view, writer=writer, desc=f"phase II (view {view})", **common)
            t0 = time.perf_counter()
            test_batches, _ = distributed.interleaved_batches(len(bundle.test), bs)
            test_loader = BatchLoader(bundle.test.with_augment(False), test_batches, device, num_workers=workers)
            extract_test_pooled(model, test_loader, writer, feature_dim=model.feature_dim, accel=accel,
                                rounds=distributed.interleaved_rounds(len(bundle.test), bs))
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
    hr = cfg["split"]["hr"]
    head, tail = head_tail_split(counts, hr)
    confusing = confusing_classes(matrix, tail, nf)
    names = bundle.class_names
    torch.save(matrix, features_dir / "score_matrix.pt")
    write_json_atomic(features_dir / "confusion.json", {
        "nf": nf,
        "rows": "true class (S[t, j] = mean softmax score of class j over the training samples of class t)",
        "tail": tail,
        "confusing": {str(t): c for t, c in confusing.items()},
        "confusing_names": {names[t]: [names[j] for j in c] for t, c in confusing.items()},
        "score_matrix": [[float(v) for v in row] for row in matrix.tolist()],
        "class_names": names,
    })
    write_json_atomic(features_dir / "split.json", {
        "hr": hr, "head": head, "tail": tail, "train_counts": list(counts), "class_names": names,
    })
    st = stats.result()
    specific = _none_if_nan(st["specific"].cpu().tolist())
    generic = _none_if_nan(st["generic"].cpu().tolist())
    count = [int(c) for c in st["count"].cpu().tolist()]
    total = max(sum(count), 1)
    write_json_atomic(features_dir / "split_statistics.json", {
        "ts": ts, "tg": tg, "cam_layer": layer, "cam_method": method, "cam_shape": list(fmap_shape[1:]),
        "specific": specific, "generic": generic, "count": count,
        "mean_specific": sum((s or 0.0) * c for s, c in zip(specific, count)) / total,
        "mean_generic": sum((g or 0.0) * c for g, c in zip(generic, count)) / total,
        "per_class": {names[i]: {"class": i, "specific": specific[i], "generic": generic[i], "count": count[i]}
                      for i in range(num_classes)},
        "class_names": names,
    })
    for t, c in confusing.items():
        logger.info(f"tail class {t} ({names[t]}, {counts[t]} images): confusing {[names[j] for j in c]}")
    if not tail:
        logger.info(f"no tail class: with split.hr={hr} every class is head; phase III has nothing to augment")
    logger.info(f"split ts={ts} tg={tg}: mean class-specific share {sum((s or 0) for s in specific) / num_classes:.3f}, "
                f"class-generic share {sum((g or 0) for g in generic) / num_classes:.3f}")

    write_provenance(features_dir, make_provenance(
        config=name, note=note, checkpoint_path=checkpoint, phase_i_config_path=p1.config_path,
        phase_ii_config=cfg, features_dir=features_dir))
    total_s = time.perf_counter() - started
    results = {
        "finished": True,
        "phase": PHASE,
        "config": name,
        "note": note,
        "checkpoint": str(checkpoint),
        "phase_i_checkpoint_selection": selection_of(checkpoint, p1.paths),
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
    }
    write_json_atomic(features_dir / "results.json", results)
    logger.info(f"phase II finished in {total_s:.1f}s (forward+CAM {timer.compute_s:.1f}s, store writes "
                f"{timer.write_s:.1f}s) -> {features_dir}")
    return results


def load_confusion(features_dir: Path) -> dict[int, list[int]]:
    """``{tail class: [confusing classes]}`` from ``confusion.json`` (keys back to ints)."""
    data = json.loads((Path(features_dir) / "confusion.json").read_text())
    return {int(k): [int(c) for c in v] for k, v in data["confusing"].items()}
