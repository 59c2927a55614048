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
from engine.metrics import SCALAR_KEYS, summary_line
from engine.optim import build_optimizer, lr_at
from models import LTModel, build_model
from utils.checkpoint import check_compatible, load_checkpoint, load_model_state, save_checkpoint
from utils.config import config_differences, config_name, dump_config, load_config
from utils.device import resolve_device
from utils.errors import UserError
from utils.logging import log_scalars, open_summary_writer, setup_logger
from utils.run_dir import RunPaths, prepare_run, read_results, write_json_atomic
from utils.seeding import derived_seed, seed_everything

PHASE = "phase_i"


def phase_i_command(config: str, note: str) -> str:
    return f"python phase_i_train_or_test.py --config {config}" + ("" if note == "default" else f" --note {note}")


def model_for(cfg: dict, bundle: DatasetBundle, device: torch.device) -> LTModel:
    return build_model(cfg["model"]["arch"], bundle.num_classes, bundle.in_channels).to(device)


def checkpoint_payload(model: LTModel, cfg: dict, bundle: DatasetBundle, **extra) -> dict:
    """Everything a later phase needs to rebuild and check the model; tensors and plain values only."""
    return {
        "phase": PHASE,
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
    check_compatible(payload, path, arch=model.arch, num_classes=model.num_classes, in_channels=model.in_channels)
    load_model_state(model, payload["model"], path)
    return model, payload


def run(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, PHASE, args.opts)
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
    out = {"finished": True, "phase": PHASE, "mode": "test", "checkpoint": str(ckpt_path), **report}
    write_json_atomic(paths.checkpoint_dir / "test_results.json", out)
    return out


def _train(cfg: dict, paths: RunPaths, device: torch.device, *, resume: bool, overwrite: bool) -> dict:
    command = phase_i_command(paths.config, paths.note)
    mode = prepare_run(paths, resume=resume, overwrite=overwrite, command=command)
    if mode == "finished":
        print(f"{paths.checkpoint_dir} is already finished; nothing to resume.")
        return read_results(paths.results) or {}
    run_dir = paths.checkpoint_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if mode == "resume":
        saved = load_config(str(run_dir / "config.yaml"), PHASE)
        diffs = config_differences(saved, cfg)
        if diffs:
            raise UserError(
                f"--resume with a config that differs from the interrupted run's ({', '.join(diffs)}). "
                f"Resume with the same config and --opts, or start a new run with --note NAME."
            )
    else:
        dump_config(cfg, run_dir / "config.yaml")
    logger = setup_logger(run_dir)
    logger.info(f"phase I {mode} run in {run_dir} on {device}")

    seed_everything(cfg["seed"])
    bundle = build_datasets(cfg["dataset"], run_dir)
    t = cfg["train"]
    model = model_for(cfg, bundle, device)
    criterion = build_loss(t["loss"], bundle.train_counts, focal_gamma=t["focal_gamma"], cb_beta=t["cb_beta"]).to(device)
    optimizer = build_optimizer(model.parameters(), t)
    logger.info(f"dataset {bundle.name}: {len(bundle.train)} train / {len(bundle.test)} test images, "
                f"{bundle.num_classes} classes, train counts {bundle.train_counts}")

    start_epoch, best_top1, best_epoch, history, elapsed = 0, -1.0, -1, [], 0.0
    if mode == "resume":
        state = load_checkpoint(paths.last, produced_by=command)
        check_compatible(state, paths.last, arch=model.arch, num_classes=model.num_classes, in_channels=model.in_channels)
        load_model_state(model, state["model"], paths.last)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_top1, best_epoch = state["epoch"], state["best_top1"], state["best_epoch"]
        history, elapsed = state["history"], state["elapsed_s"]
        logger.info(f"resumed after epoch {start_epoch}")

    train_set = bundle.train.with_augment(cfg["dataset"]["augment"])
    test_loader = BatchLoader(bundle.test.with_augment(False), sequential_batches(len(bundle.test), cfg["eval"]["batch_size"]), device)
    writer = open_summary_writer(paths.summary_dir)
    report: dict = {}
    try:
        for epoch in range(start_epoch, t["epochs"]):
            started = time.perf_counter()
            # every random draw of this epoch derives from (seed, epoch): a resumed run replays it exactly
            epoch_seed = derived_seed(cfg["seed"], epoch)
            seed_everything(epoch_seed)
            generator = torch.Generator().manual_seed(epoch_seed)
            batches = shuffled_batches(len(train_set), t["batch_size"], generator)
            loader = BatchLoader(train_set, batches, device, num_workers=t["num_workers"], generator=generator)
            steps = max(len(loader), 1)
            stats = train_one_epoch(model, loader, criterion, optimizer, lambda i: lr_at(epoch + i / steps, t),
                                    desc=f"epoch {epoch + 1}/{t['epochs']}")
            stats["lr"] = lr_at(epoch, t)
            last_epoch = epoch + 1 == t["epochs"]
            if (epoch + 1) % t["eval_every"] == 0 or last_epoch:
                report = evaluate(model, test_loader, bundle.train_counts, cfg["eval"]["hr"])
                stats.update({k: report[k] for k in SCALAR_KEYS})
            elapsed += time.perf_counter() - started
            history.append({"epoch": epoch + 1, **stats})
            logger.info(f"epoch {epoch + 1}/{t['epochs']} loss {stats['loss']:.4f} lr {stats['lr']:.5f}"
                        + (f" | {summary_line(report)}" if "top1" in stats else ""))
            log_scalars(writer, "train", {"loss": stats["loss"], "acc": stats["train_acc"], "lr": stats["lr"]}, epoch + 1)
            log_scalars(writer, "test", {k: stats.get(k) for k in SCALAR_KEYS}, epoch + 1)

            common = dict(epoch=epoch + 1, history=history, elapsed_s=elapsed)
            if "top1" in stats and stats["top1"] > best_top1:
                best_top1, best_epoch = stats["top1"], epoch + 1
                save_checkpoint(paths.best, checkpoint_payload(model, cfg, bundle, top1=best_top1, **common))
            save_checkpoint(paths.last, checkpoint_payload(
                model, cfg, bundle, optimizer=optimizer.state_dict(), best_top1=best_top1, best_epoch=best_epoch, **common))
            if t["save_every"] and (epoch + 1) % t["save_every"] == 0:
                save_checkpoint(run_dir / f"model_epoch_{epoch + 1:04d}.pt", checkpoint_payload(model, cfg, bundle, **common))
            write_json_atomic(paths.results, {"finished": False, "phase": PHASE, "epoch": epoch + 1, "history": history})
    finally:
        writer.close()

    results = {
        "finished": True, "phase": PHASE, "config": paths.config, "note": paths.note,
        "evaluated": "final epoch (best_top1 is the best of the per-epoch evaluations on the same test set)",
        **report, "best_top1": best_top1, "best_epoch": best_epoch,
        "epochs": t["epochs"], "wall_time_s": elapsed, "history": history,
    }
    write_json_atomic(paths.results, results)
    logger.info(f"finished: {summary_line(report)} | best top1 {best_top1:.2f} (epoch {best_epoch}) | {elapsed:.1f}s")
    return results
