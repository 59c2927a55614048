"""Phase I: train the backbone + classifier on the long-tailed set (or test a checkpoint)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from datasets import DatasetBundle, build_datasets
from datasets.loader import BatchLoader, EpochBatches
from engine.accel import Accel
from engine.artifacts import build_phase_i_model, checkpoint_payload, load_backbone
from engine.methods import METHODS, Method
from engine.loops import EvalSets, StepResult, TrainingTask, evaluate, fit
from engine.losses import build_loss
from engine.metrics import summary_line
from engine.optim import build_optimizer, lr_at
from engine.recorder import open_run, start_recording, write_test_results
from models import LTModel, check_arch
from utils.checkpoint import apply_weights
from utils.cli import RunSpec
from utils.config import config_name, load_config
from utils import distributed
from utils.logging import setup_logger, silent_logger
from utils.run_dir import RunPaths, lock_run, read_results
from utils.seeding import seed_everything, stream_seed

PHASE = "phase_i"


def run(spec: RunSpec) -> dict:
    cfg = load_config(spec.config, PHASE, list(spec.opts))
    check_arch(cfg["model"]["arch"])
    # the run folder of the loss's phase I method: phase_i (ce), phase_i-focal, ...
    method = METHODS.phase_i(cfg["train"]["loss"])
    paths = RunPaths(method.folder, config_name(spec.config), spec.note)
    device = distributed.setup_device(spec.device)
    lock_run(paths)
    accel = Accel.from_config(cfg["accel"], device)
    if cfg["phase"] == "test":
        return _test(cfg, paths, device, accel, spec.checkpoint, method.command(paths.config, paths.note))
    return _train(cfg, paths, device, accel, method, resume=spec.resume, overwrite=spec.overwrite)


def _test(cfg: dict, paths: RunPaths, device: torch.device, accel: Accel, checkpoint: str | None, command: str) -> dict:
    ckpt_path = Path(checkpoint) if checkpoint else paths.best
    main = distributed.context().is_main
    if main:
        paths.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    logger = setup_logger(paths.checkpoint_dir) if main else silent_logger()
    bundle = build_datasets(cfg["dataset"], None)
    model = load_backbone(ckpt_path, cfg, bundle, device, command)
    accel.prepare_model(model)
    report = evaluate(model, bundle.test, cfg["eval"]["batch_size"], device, bundle.train_counts, cfg["eval"]["hr"],
                      accel=accel)
    logger.info(f"test {ckpt_path}: {summary_line(report)}")
    return write_test_results(paths, ckpt_path, report)


class BackboneTraining(TrainingTask):
    """Phase I's side of the loop: epochs of seeded batches, the configured loss, lr per batch."""

    step_name = "epoch"

    def __init__(self, cfg: dict, bundle: DatasetBundle, model: LTModel, train_model: torch.nn.Module,
                 device: torch.device, accel: Accel):
        t = cfg["train"]
        ctx = distributed.context()
        self.cfg, self.t, self.bundle, self.model, self.train_model, self.accel = cfg, t, bundle, model, train_model, accel
        self.total, self.eval_every, self.save_every = t["epochs"], t["eval_every"], t["save_every"]
        self.rank = ctx.rank
        self.criterion = build_loss(t["loss"], bundle.train_counts, focal_gamma=t["focal_gamma"],
                                    cb_beta=t["cb_beta"], la_tau=t["la_tau"]).to(device)
        train_set = bundle.train.with_augment(cfg["dataset"]["augment"])
        self.sampler = EpochBatches(len(train_set), t["batch_size"], cfg["seed"], ctx.rank, ctx.world_size)
        self.augment_rng = torch.Generator()
        # one loader for the whole run, so DataLoader workers persist; set_epoch picks each epoch's batches
        self.loader = BatchLoader(train_set, self.sampler, device, num_workers=t["num_workers"],
                                  generator=self.augment_rng)
        self.eval_sets = EvalSets.of(bundle, cfg["eval"]["batch_size"], device)

    def begin(self, unit: int) -> None:
        # every random draw of this epoch derives from (seed, epoch, rank): a resumed run replays it exactly
        rank_seed = stream_seed(self.cfg["seed"], unit, 1 + self.rank)
        seed_everything(rank_seed)
        self.augment_rng.manual_seed(rank_seed)
        self.sampler.set_epoch(unit)
        self.train_model.train()

    def batches(self, unit: int) -> BatchLoader:
        return self.loader

    def lr(self, unit: int, batch: int, batches: int) -> float:
        return lr_at(unit + batch / batches, self.t)

    def step(self, batch) -> StepResult:
        x, y, _ = batch
        with self.accel.autocast():
            logits = self.train_model(self.accel.inputs(x))
            loss = self.criterion(logits.float(), y)
        return StepResult(loss, len(y), logits, y)

    def unit_stats(self, unit: int, seconds: float) -> dict:
        return {"lr": lr_at(unit, self.t), "train_s": seconds,
                "images_per_s": self.sampler.samples_per_epoch() / max(seconds, 1e-9)}

    def evaluate(self) -> tuple[dict, dict | None]:
        distributed.sync_buffers(self.model)  # every rank evaluates the model rank 0 saves
        return self.eval_sets.evaluate(self.model, self.bundle.train_counts, self.cfg["eval"]["hr"], accel=self.accel)


def _train(cfg: dict, paths: RunPaths, device: torch.device, accel: Accel, method: Method, *, resume: bool,
           overwrite: bool) -> dict:
    command = method.command(paths.config, paths.note)
    mode, logger = open_run(paths, cfg, resume=resume, overwrite=overwrite, command=command)
    if mode == "finished":
        return read_results(paths.results) or {}
    ctx = distributed.context()
    seed_everything(cfg["seed"])
    with distributed.main_first():  # rank 0 writes train_subset.json (or downloads); the others read it
        bundle = build_datasets(cfg["dataset"], paths.checkpoint_dir)
    t = cfg["train"]
    model = accel.prepare_model(build_phase_i_model(cfg, bundle, device))
    optimizer = build_optimizer(model.parameters(), t)
    scaler = accel.grad_scaler()
    scaler = scaler if scaler.is_enabled() else None
    logger.info(f"dataset {bundle.name}: {len(bundle.train)} train / {len(bundle.test)} test images, "
                f"{bundle.num_classes} classes, train counts {bundle.train_counts}; device {device}, "
                f"{ctx.world_size} process(es), global batch {t['batch_size']}; {accel.describe()}")
    start, recorder = start_recording(paths, mode, logger, lambda **extra: checkpoint_payload(model, cfg, bundle, paths.phase, **extra),
                                      restore=lambda state, path: apply_weights(model, state, path),
                                      optimizer=optimizer, scaler=scaler, step_name="epoch", total_steps=t["epochs"],
                                      command=command, select_on_val=bundle.val is not None)
    # `model` stays the plain module (checkpoints, evaluation); `train_model` is what the loop calls
    train_model: torch.nn.Module = model
    if ctx.enabled:
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    task = BackboneTraining(cfg, bundle, model, accel.compiled(train_model), device, accel)
    fit(task, optimizer, recorder, start=start, scaler=scaler)
    return recorder.finish(method=method.id, loss=t["loss"], epochs=t["epochs"], processes=ctx.world_size, train_samples=len(bundle.train),
                           samples_seen=t["epochs"] * task.sampler.samples_per_epoch(),
                           **bundle.split_sizes())
