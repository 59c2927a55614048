"""Phase II: batched Grad-CAM over the long-tailed training set, the class-specific / class-generic
split statistics, the confusing classes of every tail class, and the offline feature store. This module
runs it (inputs, passes, outputs); the passes over a dataset are ``engine.phase_ii_extraction``'s.

Every file is written through ``engine.phase_ii_outputs`` (which later phases read it with). Inputs: the
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
    provenance.json         sha256 of the phase I checkpoint and config.yaml (engine/phase_ii_outputs.py)
    config.yaml, log.txt, results.json {finished, timings, num_samples, store_bytes, ...}

CAMs come from :class:`fsa.gradcam.CamExtractor`: one forward pass per batch for the CAM layer of a
GAP + linear head (closed form, no backward); ``gradcam.method: autograd`` differentiates the head
with autograd on the same forward; a non-CAM ``gradcam.layer`` costs a forward + backward plus a
no-grad forward for the CAM-layer maps, and its CAMs are resized to the CAM-layer resolution.
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from datasets import DatasetBundle
from datasets.base import LTDataset
from datasets.loader import BatchLoader
from engine.accel import Accel
from engine.artifacts import PhaseIRun, open_phase_i_run
from engine.phase_ii_extraction import ExtractionTimer, extract_test_pooled, extract_view
from engine.phase_ii_outputs import (STORE_DIR, make_provenance, phase_ii_command, phase_ii_paths, write_phase_ii,
                                     write_provenance)
from fsa.class_split import head_tail_split
from fsa.confusion import ScoreAccumulator, confusing_classes
from fsa.decomposition import SplitStatistics
from fsa.feature_store import FeatureStoreWriter, format_bytes, store_nbytes
from fsa.gradcam import CamExtractor
from models.base import LTModel, eval_mode
from utils.cli import RunSpec
from utils.config import config_name, dump_config, load_config
from utils import distributed
from utils.errors import UserError
from utils.json_files import read_results, write_json_atomic
from utils.layout import RunPaths, output_root
from utils.logging import setup_logger, silent_logger
from utils.provenance import begin_run, collect
from utils.run_dir import is_finished, open_pending, recover_replaced, run_started
from utils.run_lock import lock_run
from utils.seeding import seed_everything, stream_seed

PHASE = "phase_ii"

__all__ = ["PHASE", "run"]


@dataclass
class _Inputs:
    """What a phase II run works from, every part resolved and checked before any output is touched."""

    spec: RunSpec
    cfg: dict
    name: str
    paths: RunPaths
    device: torch.device
    accel: Accel
    p1: PhaseIRun
    checkpoint: Path
    model: LTModel
    extractor: CamExtractor
    train_set: LTDataset  # un-augmented: view 0 and the statistics
    fmap_shape: tuple[int, ...]

    @property
    def features_dir(self) -> Path:
        return self.paths.features_dir

    @property
    def bundle(self) -> DatasetBundle:
        return self.p1.bundle

    @property
    def views(self) -> int:
        """View 0 (un-augmented) and the configured augmented ones."""
        return 1 + self.cfg["store"]["views"]

    @property
    def store_bytes(self) -> int:
        """The feature store's size (0 without one)."""
        if not self.cfg["store"]["enabled"]:
            return 0
        return store_nbytes(self.views, len(self.train_set), self.fmap_shape, len(self.bundle.test))


@dataclass
class _Extraction:
    """The accumulated statistics of the passes, and what was stored."""

    timer: ExtractionTimer
    scores: ScoreAccumulator
    stats: SplitStatistics
    store_meta: dict | None  # what the store writer's close returned; None where this rank wrote no store
    test_s: float


def _check_not_finished(features_dir: Path, overwrite: bool, config: str, note: str, backbone: str,
                        opts: tuple[str, ...]) -> None:
    results = read_results(features_dir / "results.json")
    if results and results.get("finished") and not overwrite:
        raise UserError(
            f"Finished phase II outputs already exist in {features_dir}. They are not overwritten silently: "
            f"pass --overwrite to replace them ({phase_ii_command(config, note, overwrite=True, backbone=backbone, opts=opts)}), or --note "
            f"NAME for a separate experiment (which needs a phase I run with that note)."
        )


def _claim_run_folder(spec: RunSpec, name: str, backbone: str, root: Path) -> tuple[RunPaths, torch.device]:
    """The run's folders, locked (after joining the process group), with any output an interrupted
    --overwrite moved aside restored, and refused when a finished run is there without --overwrite."""
    paths = phase_ii_paths(name, spec.note, backbone, root)
    device = distributed.setup_device(spec.device)
    lock_run(paths)
    if distributed.context().is_main and recover_replaced(paths):
        print(f"note: restored the phase II outputs in {paths.features_dir} that an interrupted --overwrite had "
              f"moved aside.", file=sys.stderr)
    # the user's --opts without backbone=, which phase_ii_command states itself
    user_opts = tuple(o for o in spec.opts if not o.startswith("backbone="))
    _check_not_finished(paths.features_dir, spec.overwrite, name, spec.note, backbone, user_opts)
    return paths, device


def _check_nf(nf: int, bundle: DatasetBundle) -> None:
    """A tail class needs `nf` other classes to be confused with."""
    num_classes = bundle.num_classes
    if nf >= num_classes:
        raise UserError(
            f"confusion.nf = {nf} must be smaller than the number of classes ({num_classes}, dataset "
            f"'{bundle.name}'): a class has only {num_classes - 1} other classes to be confused with. "
            f"Set e.g. --opts confusion.nf={max(1, min(3, num_classes - 1))}."
        )


def _probe_fmap_shape(model: LTModel, extractor: CamExtractor, train_set: LTDataset,
                      device: torch.device) -> tuple[int, ...]:
    """The CAM-layer map shape ``(C, H, W)``, from the first training image; its CAM fails early on a bad
    layer / head."""
    probe_x, probe_y, _ = next(iter(BatchLoader(train_set, [[0]], device)))
    with torch.no_grad(), eval_mode(model):
        fmap_shape = tuple(model.features(probe_x).shape[1:])
    extractor(probe_x, probe_y)
    return fmap_shape


def _check_store_fits(store_bytes: int, features_dir: Path, root: Path) -> None:
    free = shutil.disk_usage(features_dir.parent if features_dir.parent.exists() else root).free
    if store_bytes > free:
        raise UserError(
            f"the feature store needs {format_bytes(store_bytes)} but only {format_bytes(free)} are free "
            f"on the disk of {features_dir}. Free space, lower store.views, or set store.enabled=false "
            f"(phase III offline needs the store)."
        )


def _resolve_inputs(spec: RunSpec) -> _Inputs:
    """Config, run folder, phase I run, model and Grad-CAM, each checked (seeded as the config says)."""
    cfg = load_config(spec.config, PHASE, list(spec.opts))
    name = config_name(spec.config)
    root = output_root()
    paths, device = _claim_run_folder(spec, name, cfg["backbone"], root)
    accel = Accel.from_config(cfg["accel"], device)
    begin_run(cfg)  # determinism, and the start time that provenance records
    seed_everything(cfg["seed"])
    p1 = open_phase_i_run(name, spec.note, root, backbone=cfg["backbone"])
    _check_nf(cfg["confusion"]["nf"], p1.bundle)
    checkpoint = Path(spec.checkpoint) if spec.checkpoint else p1.paths.best
    model = p1.load_model(device, checkpoint)
    model.eval()
    accel.prepare_model(model)
    extractor = CamExtractor(model, cfg["gradcam"]["layer"], cfg["gradcam"]["method"])
    train_set = p1.bundle.train.with_augment(False)
    fmap_shape = _probe_fmap_shape(model, extractor, train_set, device)
    inputs = _Inputs(spec, cfg, name, paths, device, accel, p1, checkpoint, model, extractor, train_set, fmap_shape)
    if inputs.store_bytes:
        _check_store_fits(inputs.store_bytes, paths.features_dir, root)
    return inputs


def _start_outputs(inputs: _Inputs) -> logging.Logger:
    """Every input checked: move any previous (unfinished, or --overwrite) output aside (rank 0); it goes for
    good once these outputs are complete, and comes back if this run fails before (utils.run_dir). Returns
    the run's logger (silent off rank 0), which has logged what the run works from."""
    ctx = distributed.context()
    features_dir, bundle = inputs.features_dir, inputs.bundle
    if ctx.is_main:
        open_pending(inputs.paths, replace=True)
        features_dir.mkdir(parents=True)
        dump_config(inputs.cfg, features_dir / "config.yaml")
    logger = setup_logger(features_dir) if ctx.is_main else silent_logger()
    logger.info(f"phase II for config '{inputs.name}' note '{inputs.spec.note}' on {inputs.device} ({ctx.world_size} "
                f"process(es)): checkpoint {inputs.checkpoint}, dataset {bundle.name} ({len(inputs.train_set)} train / "
                f"{len(bundle.test)} test images, {bundle.num_classes} classes); {inputs.accel.describe()}")
    logger.info(f"Grad-CAM: layer {inputs.extractor.layer} ({inputs.extractor.method}), CAM-layer maps "
                f"{list(inputs.fmap_shape)}, batch size {inputs.cfg['gradcam']['batch_size']}")
    if not inputs.spec.checkpoint and not is_finished(inputs.p1.paths):
        logger.info(f"warning: the phase I run in {inputs.p1.paths.checkpoint_dir} has not finished; using its "
                    f"best_model.pt so far (finish it with: {inputs.p1.command('--resume')})")
    return logger


def _open_store_writer(inputs: _Inputs, logger: logging.Logger) -> FeatureStoreWriter | None:
    """The feature store's writer on rank 0 when the store is enabled, else None."""
    if not (inputs.cfg["store"]["enabled"] and distributed.context().is_main):
        return None
    store_dir = inputs.features_dir / STORE_DIR
    n = len(inputs.train_set)
    writer = FeatureStoreWriter(store_dir, num_samples=n, fmap_shape=inputs.fmap_shape, views=inputs.views,
                                num_test=len(inputs.bundle.test))
    logger.info(f"feature store: {inputs.views} view(s) x {n} samples x {list(inputs.fmap_shape)} float16 -> "
                f"{format_bytes(inputs.store_bytes)} in {store_dir}")
    return writer


def _extract_augmented_views_and_test(inputs: _Inputs, writer: FeatureStoreWriter | None,
                                        pass_settings: dict) -> float:
    """The augmented views of the training set, then the test set's pooled features; returns the seconds
    the test features took."""
    bs, seed = inputs.cfg["gradcam"]["batch_size"], inputs.cfg["seed"]
    augmented = inputs.bundle.train.with_augment(True)
    for view in range(1, inputs.views):
        # one seed per batch number (per row for file datasets), so the views depend neither on the
        # process count nor on num_workers
        extract_view(inputs.extractor, augmented, bs, inputs.device, view=view, seed=stream_seed(seed, view),
                     desc=f"phase II (view {view})", **pass_settings)
    started = time.perf_counter()
    extract_test_pooled(inputs.model, inputs.bundle.test, bs, inputs.device, writer, accel=inputs.accel,
                        num_workers=inputs.cfg["store"]["num_workers"])
    return time.perf_counter() - started


def _extract(inputs: _Inputs, logger: logging.Logger) -> _Extraction:
    """CAMs, score and split statistics of the un-augmented training set (view 0) and, with the store, its
    rows, the augmented views and the test set's pooled features. An unfinished store is removed."""
    num_classes = inputs.bundle.num_classes
    store_cfg = inputs.cfg["store"]
    timer = ExtractionTimer(inputs.device)
    scores = ScoreAccumulator(num_classes, inputs.device)
    stats = SplitStatistics(num_classes, inputs.cfg["split"]["ts"], inputs.cfg["split"]["tg"], inputs.device)
    writer = _open_store_writer(inputs, logger)
    pass_settings = {"timer": timer, "accel": inputs.accel, "store": store_cfg["enabled"], "writer": writer,
                     "num_workers": store_cfg["num_workers"]}
    test_s, store_meta = 0.0, None
    try:
        extract_view(inputs.extractor, inputs.train_set, inputs.cfg["gradcam"]["batch_size"], inputs.device, view=0,
                     scores=scores, stats=stats, desc="phase II (view 0)", **pass_settings)
        if store_cfg["enabled"]:
            test_s = _extract_augmented_views_and_test(inputs, writer, pass_settings)
        if writer is not None:
            store_meta = writer.close({"cam_layer": inputs.extractor.layer, "cam_method": inputs.extractor.method,
                                       "arch": inputs.model.arch, "dataset": inputs.bundle.name,
                                       "class_names": inputs.bundle.class_names})
            logger.info(f"feature store written: {format_bytes(store_meta['bytes'])} in "
                        f"{inputs.features_dir / STORE_DIR}")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return _Extraction(timer, scores, stats, store_meta, test_s)


def _write_class_statistics(inputs: _Inputs, extraction: _Extraction,
                            logger: logging.Logger) -> tuple[list[int], list[int], dict[int, list[int]]]:
    """Head / tail split, confusing classes and split statistics into their files (rank 0), logged;
    returns ``(head, tail, confusing)``."""
    bundle, cfg = inputs.bundle, inputs.cfg
    matrix = extraction.scores.matrix().cpu()
    counts, names = bundle.train_counts, bundle.class_names
    hr = inputs.p1.hr  # one head / tail share for every phase: phase I's eval.hr
    nf, ts, tg = cfg["confusion"]["nf"], cfg["split"]["ts"], cfg["split"]["tg"]
    head, tail = head_tail_split(counts, hr)
    confusing = confusing_classes(matrix, tail, nf)
    statistics = extraction.stats.result()
    write_phase_ii(inputs.features_dir, matrix=matrix, nf=nf, hr=hr, head=head, tail=tail, confusing=confusing,
                   counts=counts, names=names, statistics=statistics, ts=ts, tg=tg,
                   cam={"layer": inputs.extractor.layer, "method": inputs.extractor.method,
                        "shape": inputs.fmap_shape[1:]})
    for t, c in confusing.items():
        logger.info(f"tail class {t} ({names[t]}, {counts[t]} images): confusing {[names[j] for j in c]}")
    if not tail:
        logger.info(f"no tail class: with phase I's eval.hr={hr} every class is head; phase III has nothing to augment")
    specific = [v for v in statistics["specific"].cpu().tolist() if v == v]  # v == v: not NaN (a class with no sample)
    generic = [v for v in statistics["generic"].cpu().tolist() if v == v]
    logger.info(f"split ts={ts} tg={tg}: mean class-specific share {sum(specific) / bundle.num_classes:.3f}, "
                f"class-generic share {sum(generic) / bundle.num_classes:.3f}")
    return head, tail, confusing


def _results(inputs: _Inputs, extraction: _Extraction, head: list[int], tail: list[int],
             confusing: dict[int, list[int]], total_s: float) -> dict:
    """results.json of a finished run."""
    stored = extraction.store_meta is not None
    timer = extraction.timer
    return {
        "finished": True,
        "phase": PHASE,
        "config": inputs.name,
        "note": inputs.spec.note,
        "backbone": inputs.cfg["backbone"],
        "checkpoint": str(inputs.checkpoint),
        "phase_i_checkpoint_selection": inputs.p1.selection_of(inputs.checkpoint),
        "device": str(inputs.device),
        "processes": distributed.context().world_size,
        "accel": inputs.accel.describe(),
        "num_samples": len(inputs.train_set),
        "num_test": len(inputs.bundle.test),
        "num_classes": inputs.bundle.num_classes,
        "cam_layer": inputs.extractor.layer,
        "cam_method": inputs.extractor.method,
        "fmap_shape": list(inputs.fmap_shape),
        "views": inputs.views if stored else 0,
        "store_enabled": stored,
        "store_dir": STORE_DIR if stored else None,
        "store_bytes": extraction.store_meta["bytes"] if stored else 0,
        "timings": {
            "forward_cam_s": round(timer.compute_s, 4),
            "store_write_s": round(timer.write_s, 4),
            "test_features_s": round(extraction.test_s, 4),
            "total_s": round(total_s, 4),
        },
        "head": head,
        "tail": tail,
        "confusing": {str(t): c for t, c in confusing.items()},
        "provenance": collect(),
    }


def run(spec: RunSpec) -> dict:
    """Phase II of ``spec`` (see the module docstring): checks every input, extracts, and on rank 0 writes
    the outputs and returns results.json's content ({} on the other ranks of a torchrun job)."""
    inputs = _resolve_inputs(spec)
    logger = _start_outputs(inputs)
    started = time.perf_counter()
    extraction = _extract(inputs, logger)
    if not distributed.context().is_main:  # rank 0 holds the gathered statistics and writes every output
        return {}
    head, tail, confusing = _write_class_statistics(inputs, extraction, logger)
    write_provenance(inputs.features_dir, make_provenance(
        config=inputs.name, note=spec.note, checkpoint_path=inputs.checkpoint,
        phase_i_config_path=inputs.p1.config_path, phase_ii_config=inputs.cfg, features_dir=inputs.features_dir,
        backbone=inputs.cfg["backbone"]))
    total_s = time.perf_counter() - started
    results = _results(inputs, extraction, head, tail, confusing, total_s)
    write_json_atomic(inputs.features_dir / "results.json", results)
    run_started(inputs.paths)
    timer = extraction.timer
    logger.info(f"phase II finished in {total_s:.1f}s (forward+CAM {timer.compute_s:.1f}s, statistics + store "
                f"writes {timer.write_s:.1f}s) -> {inputs.features_dir}")
    return results
