"""Phase I: train the backbone + classifier on the long-tailed set (or test a checkpoint)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from datasets import DatasetBundle, build_datasets
from datasets.loader import BatchLoader, EpochBatches
from engine.accel import Accel
from engine.loops import EvalSets, eval_loader, evaluate, train_one_epoch
from engine.losses import build_loss
from engine.metrics import summary_line
from engine.optim import build_optimizer, lr_at
from engine.recorder import open_run, start_recording, write_test_results
from models import LTModel, build_model, check_arch
from utils.checkpoint import apply_weights, load_checkpoint
from utils.cli import script_command
from utils.config import config_name, load_config
from utils import distributed
from utils.errors import UserError
from utils.logging import setup_logger, silent_logger
from utils.run_dir import RunPaths, lock_run, read_results
from utils.seeding import derived_seed, seed_everything

PHASE = "phase_i"


def phase_i_command(config: str, note: str) -> str:
    return script_command("phase_i_train_or_test.py", config, note)


def model_for(cfg: dict, bundle: DatasetBundle, device: torch.device) -> LTModel:
    return build_model(cfg["model"]["arch"], bundle.num_classes, bundle.in_channels).to(device)


def checkpoint_payload(model: LTModel, cfg: dict, bundle: DatasetBundle, phase: str = PHASE, **extra) -> dict:
    """Everything a later phase needs to rebuild and check the model; tensors and plain values only."""
    return {
        "phase": phase,
        "model": model.state_dict(),
        "arch": model.arch,
        "num_classes": model.num_classes,
        "in_channels": model.in_channels,
        "dataset": bundle.name,
        "train_counts": list(bundle.train_counts),
        "config": cfg,
        **extra,
    }


def selection_of(checkpoint: Path, phase_i: RunPaths) -> dict | None:
    """How the phase I model at `checkpoint` was chosen (its run's `checkpoint_selection`), for the
    records of the phases that start from it; None for a file other than the run's best_model.pt."""
    results = read_results(phase_i.results)
    if results is None or Path(checkpoint).resolve() != phase_i.best.resolve():
        return None
    return results.get("checkpoint_selection")


def load_phase_i_model(path: Path, cfg: dict, bundle: DatasetBundle, device: torch.device, produced_by: str) -> tuple[LTModel, dict]:
    """Build the model of `cfg` and load the phase I checkpoint at `path` into it, checking it fits."""
    payload = load_checkpoint(path, produced_by=produced_by)
    if payload.get("dataset") not in (None, bundle.name):
        raise UserError(
            f"Checkpoint {path} was trained on dataset '{payload.get('dataset')}', but this run uses "
            f"'{bundle.name}'. Use the checkpoint of the matching config."
        )
    model = model_for(cfg, bundle, device)
    apply_weights(model, payload, path)
    return model, payload


def run(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, PHASE, args.opts)
    check_arch(cfg["model"]["arch"])
    paths = RunPaths(PHASE, config_name(args.config), args.note)
    device = distributed.setup_device(args.device)
    lock_run(paths)
    accel = Accel.from_config(cfg["accel"], device)
    if cfg["phase"] == "test":
        return _test(cfg, paths, device, accel, getattr(args, "checkpoint", None))
    return _train(cfg, paths, device, accel, resume=args.resume, overwrite=args.overwrite)


def _test(cfg: dict, paths: RunPaths, device: torch.device, accel: Accel, checkpoint: str | None) -> dict:
    ckpt_path = Path(checkpoint) if checkpoint else paths.best
    main = distributed.context().is_main
    if main:
        paths.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    logger = setup_logger(paths.checkpoint_dir) if main else silent_logger()
    bundle = build_datasets(cfg["dataset"], None)
    model, payload = load_phase_i_model(ckpt_path, cfg, bundle, device, phase_i_command(paths.config, paths.note))
    accel.prepare_model(model)
    train_counts = payload.get("train_counts", bundle.train_counts)
    test_loader = eval_loader(bundle.test, cfg["eval"]["batch_size"], device)
    report = evaluate(model, test_loader, train_counts, cfg["eval"]["hr"], accel=accel)
    logger.info(f"test {ckpt_path}: {summary_line(report)}")
    return write_test_results(paths, ckpt_path, report)


def _train(cfg: dict, paths: RunPaths, device: torch.device, accel: Accel, *, resume: bool, overwrite: bool) -> dict:
    command = phase_i_command(paths.config, paths.note)
    mode, logger = open_run(paths, cfg, resume=resume, overwrite=overwrite, command=command)
    if mode == "finished":
        return read_results(paths.results) or {}
    ctx = distributed.context()
    seed_everything(cfg["seed"])
    with distributed.main_first():  # rank 0 writes train_subset.json (or downloads); the others read it
        bundle = build_datasets(cfg["dataset"], paths.checkpoint_dir)
    t = cfg["train"]
    model = accel.prepare_model(model_for(cfg, bundle, device))
    criterion = build_loss(t["loss"], bundle.train_counts, focal_gamma=t["focal_gamma"], cb_beta=t["cb_beta"]).to(device)
    optimizer = build_optimizer(model.parameters(), t)
    logger.info(f"dataset {bundle.name}: {len(bundle.train)} train / {len(bundle.test)} test images, "
                f"{bundle.num_classes} classes, train counts {bundle.train_counts}; device {device}, "
                f"{ctx.world_size} process(es), global batch {t['batch_size']}; {accel.describe()}")

    start_epoch, recorder = start_recording(paths, mode, model, optimizer, logger,
                                            lambda **extra: checkpoint_payload(model, cfg, bundle, **extra),
                                            step_name="epoch", total_steps=t["epochs"], command=command,
                                            select_on_val=bundle.val is not None)
    # `model` stays the plain module (checkpoints, evaluation); `train_model` is what the loop calls
    train_model: torch.nn.Module = model
    if ctx.enabled:
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    train_model = accel.compiled(train_model)
    scaler = accel.grad_scaler()

    train_set = bundle.train.with_augment(cfg["dataset"]["augment"])
    sampler = EpochBatches(len(train_set), t["batch_size"], cfg["seed"], ctx.rank, ctx.world_size)
    augment_rng = torch.Generator()
    # one loader for the whole run, so DataLoader workers persist; set_epoch picks each epoch's batches
    loader = BatchLoader(train_set, sampler, device, num_workers=t["num_workers"], generator=augment_rng)
    eval_sets = EvalSets.of(bundle, cfg["eval"]["batch_size"], device)
    for epoch in range(start_epoch, t["epochs"]):
        started = time.perf_counter()
        # every random draw of this epoch derives from (seed, epoch, rank): a resumed run replays it exactly
        rank_seed = derived_seed(derived_seed(cfg["seed"], epoch), 1 + ctx.rank)
        seed_everything(rank_seed)
        augment_rng.manual_seed(rank_seed)
        sampler.set_epoch(epoch)
        steps = max(len(loader), 1)
        stats = train_one_epoch(train_model, loader, criterion, optimizer, lambda i: lr_at(epoch + i / steps, t),
                                accel=accel, scaler=scaler if scaler.is_enabled() else None,
                                desc=f"epoch {epoch + 1}/{t['epochs']}")
        train_s = time.perf_counter() - started
        stats.update(lr=lr_at(epoch, t), train_s=train_s, images_per_s=sampler.samples_per_epoch() / max(train_s, 1e-9))
        done = epoch + 1
        report = val_report = None
        if done % t["eval_every"] == 0 or done == t["epochs"]:
            distributed.sync_buffers(model)  # every rank evaluates the model rank 0 saves
            report, val_report = eval_sets.evaluate(model, bundle.train_counts, cfg["eval"]["hr"], accel=accel)
        recorder.record(done, stats, report, optimizer, time.perf_counter() - started,
                        periodic=bool(t["save_every"]) and done % t["save_every"] == 0, val_report=val_report)
    return recorder.finish(epochs=t["epochs"], processes=ctx.world_size, **bundle.split_sizes())
