"""Phase I: train the backbone + classifier on the long-tailed set (or test a checkpoint)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from datasets import DatasetBundle, build_datasets
from datasets.loader import BatchLoader, sequential_batches, shuffled_batches
from engine.loops import evaluate, train_one_epoch
from engine.losses import build_loss
from engine.metrics import summary_line
from engine.optim import build_optimizer, lr_at
from engine.recorder import open_run, start_recording, write_test_results
from models import LTModel, build_model, check_arch
from utils.checkpoint import apply_weights, load_checkpoint
from utils.cli import script_command
from utils.config import config_name, load_config
from utils.device import resolve_device
from utils.errors import UserError
from utils.logging import setup_logger
from utils.run_dir import RunPaths, read_results
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
    device = resolve_device(args.device)
    if cfg["phase"] == "test":
        return _test(cfg, paths, device, getattr(args, "checkpoint", None))
    return _train(cfg, paths, device, resume=args.resume, overwrite=args.overwrite)


def _test(cfg: dict, paths: RunPaths, device: torch.device, checkpoint: str | None) -> dict:
    ckpt_path = Path(checkpoint) if checkpoint else paths.best
    paths.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    logger = setup_logger(paths.checkpoint_dir)
    bundle = build_datasets(cfg["dataset"], None)
    model, payload = load_phase_i_model(ckpt_path, cfg, bundle, device, phase_i_command(paths.config, paths.note))
    train_counts = payload.get("train_counts", bundle.train_counts)
    test_loader = BatchLoader(bundle.test.with_augment(False), sequential_batches(len(bundle.test), cfg["eval"]["batch_size"]), device)
    report = evaluate(model, test_loader, train_counts, cfg["eval"]["hr"])
    logger.info(f"test {ckpt_path}: {summary_line(report)}")
    return write_test_results(paths, ckpt_path, report)


def _train(cfg: dict, paths: RunPaths, device: torch.device, *, resume: bool, overwrite: bool) -> dict:
    command = phase_i_command(paths.config, paths.note)
    mode, logger = open_run(paths, cfg, resume=resume, overwrite=overwrite, command=command)
    if mode == "finished":
        return read_results(paths.results) or {}
    seed_everything(cfg["seed"])
    bundle = build_datasets(cfg["dataset"], paths.checkpoint_dir)
    t = cfg["train"]
    model = model_for(cfg, bundle, device)
    criterion = build_loss(t["loss"], bundle.train_counts, focal_gamma=t["focal_gamma"], cb_beta=t["cb_beta"]).to(device)
    optimizer = build_optimizer(model.parameters(), t)
    logger.info(f"dataset {bundle.name}: {len(bundle.train)} train / {len(bundle.test)} test images, "
                f"{bundle.num_classes} classes, train counts {bundle.train_counts}; device {device}")

    start_epoch, recorder = start_recording(paths, mode, model, optimizer, logger,
                                            lambda **extra: checkpoint_payload(model, cfg, bundle, **extra),
                                            step_name="epoch", total_steps=t["epochs"], command=command)

    train_set = bundle.train.with_augment(cfg["dataset"]["augment"])
    test_loader = BatchLoader(bundle.test.with_augment(False), sequential_batches(len(bundle.test), cfg["eval"]["batch_size"]), device)
    for epoch in range(start_epoch, t["epochs"]):
        started = time.perf_counter()
        # every random draw of this epoch derives from (seed, epoch): a resumed run replays it exactly
        epoch_seed = derived_seed(cfg["seed"], epoch)
        seed_everything(epoch_seed)
        generator = torch.Generator().manual_seed(epoch_seed)
        loader = BatchLoader(train_set, shuffled_batches(len(train_set), t["batch_size"], generator), device,
                             num_workers=t["num_workers"], generator=generator)
        steps = max(len(loader), 1)
        stats = train_one_epoch(model, loader, criterion, optimizer, lambda i: lr_at(epoch + i / steps, t),
                                desc=f"epoch {epoch + 1}/{t['epochs']}")
        stats["lr"] = lr_at(epoch, t)
        done = epoch + 1
        report = None
        if done % t["eval_every"] == 0 or done == t["epochs"]:
            report = evaluate(model, test_loader, bundle.train_counts, cfg["eval"]["hr"])
        recorder.record(done, stats, report, optimizer, time.perf_counter() - started,
                        periodic=bool(t["save_every"]) and done % t["save_every"] == 0)
    return recorder.finish(epochs=t["epochs"])
