"""Phase I: train the backbone + classifier on the long-tailed set (or test a checkpoint).

The config's ``train.loss``, ``train.reweight``, ``model.classifier`` and ``distill.enabled`` select
the phase I method of the method table (``engine.methods``), whose run folder the run writes:
``phase_i`` (CE), ``phase_i-<method id>`` otherwise. A distilled run (CBD) first opens its teachers,
the finished runs ``<note>-teacher<k>`` of the teacher method (``fsa.distillation``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from datasets import DatasetBundle, build_datasets
from datasets.loader import BatchLoader, EpochBatches
from engine.accel import Accel
from engine.artifacts import build_phase_i_model, checkpoint_payload, load_backbone, open_phase_i_run
from engine.methods import METHODS, TEACHER_SEED_STEP, PhaseIMethod
from engine.loops import EvalSets, StepResult, TrainingTask, evaluate, fit
from engine.losses import build_loss
from engine.metrics import summary_line
from engine.optim import build_optimizer, lr_at
from engine.recorder import open_run, start_recording, write_test_results
from engine.reweighting import build_reweighting
from fsa.distillation import DistillStudent, TeacherEnsemble, cbd_loss
from models import LTModel, check_arch
from utils.checkpoint import apply_weights
from utils.cli import RunSpec
from utils.cli import script_command
from utils.config import config_name, load_config
from utils import distributed
from utils.errors import UserError
from utils.logging import setup_logger, silent_logger
from utils.json_files import read_results
from utils.layout import RunPaths
from utils.run_dir import is_finished
from utils.run_lock import lock_run
from utils.seeding import seed_everything, stream_seed

PHASE = "phase_i"


def run(spec: RunSpec) -> dict:
    cfg = load_config(spec.config, PHASE, list(spec.opts))
    check_arch(cfg["model"]["arch"])
    # the run folder of the config's phase I method: phase_i (ce), phase_i-focal, ...
    method = METHODS.phase_i(cfg)
    paths = RunPaths(method.folder, config_name(spec.config), spec.note)
    device = distributed.setup_device(spec.device)
    lock_run(paths)
    accel = Accel.from_config(cfg["accel"], device)
    if cfg["phase"] == "test":
        return _test(cfg, paths, device, accel, spec.checkpoint, method.command(paths.config, paths.note))
    teachers = load_teachers(cfg, paths, method, device) if method.teacher else None
    command = method.command(paths.config, paths.note, *spec.opts_args)
    return _train(cfg, paths, device, accel, method, teachers, command, resume=spec.resume, overwrite=spec.overwrite)


def teacher_seed(seed: int, k: int) -> int:
    """The seed of teacher ``k`` (1..K) of a distilled run with seed ``seed``: each student seed has
    its own teachers, so seeds stay independent."""
    return seed + TEACHER_SEED_STEP * k


def teacher_command(config: str, note: str, method: PhaseIMethod, seed: int, k: int) -> str:
    """The phase I command that trains teacher ``k`` of the run (config, note) of distilled ``method``."""
    teacher = METHODS.get(method.teacher)
    return script_command("phase_i_train_or_test.py", config, f"{note}-teacher{k}", "--opts",
                          *teacher.selecting_opts(), f"seed={teacher_seed(seed, k)}")


def load_teachers(cfg: dict, paths: RunPaths, method: PhaseIMethod, device: torch.device) -> TeacherEnsemble:
    """The finished teacher runs of a distilled run, checked (same dataset, the teacher seeds), frozen;
    a UserError with the commands of the missing ones."""
    k_total, seed = cfg["distill"]["teachers"], cfg["seed"]
    teachers, missing = [], []
    for k in range(1, k_total + 1):
        note = f"{paths.note}-teacher{k}"
        teacher_paths = RunPaths(METHODS.get(method.teacher).folder, paths.config, note)
        if not is_finished(teacher_paths):
            missing.append(teacher_command(paths.config, paths.note, method, seed, k))
            continue
        run = open_phase_i_run(paths.config, note, backbone=method.teacher, needed_by=method.label, need_checkpoint=True)
        wrong = [what for what, ok in (("dataset", run.cfg["dataset"] == cfg["dataset"]),
                                       ("seed", run.cfg["seed"] == teacher_seed(seed, k))) if not ok]
        if wrong:
            raise UserError(f"{method.label}: teacher {k} ({teacher_paths.checkpoint_dir}) has another {' and '.join(wrong)} "
                            f"than this run expects (the same dataset section, seed {teacher_seed(seed, k)}). Train it "
                            f"again: {teacher_command(paths.config, paths.note, method, seed, k)} --overwrite")
        teachers.append(run.load_model(device))
    if missing:
        raise UserError(f"{method.label} distils from {k_total} {METHODS.get(method.teacher).label} teacher run(s) "
                        f"(distill.teachers), of which {len(missing)} are not finished. Train them first (pipeline.py "
                        f"--suite tailcalibx does): " + "; ".join(missing))
    return TeacherEnsemble(teachers, batch_statistics=cfg["distill"]["teacher_bn"] == "batch").to(device)


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
    divergence_settings = "train.lr, train.momentum, train.warmup_epochs and the loss's own settings"

    def __init__(self, cfg: dict, bundle: DatasetBundle, model: LTModel, train_model: torch.nn.Module,
                 device: torch.device, accel: Accel, teachers: TeacherEnsemble | None = None):
        t = cfg["train"]
        ctx = distributed.context()
        self.cfg, self.t, self.bundle, self.model, self.train_model, self.accel = cfg, t, bundle, model, train_model, accel
        self.total, self.eval_every, self.save_every = t["epochs"], t["eval_every"], t["save_every"]
        self.rank = ctx.rank
        self.teachers = teachers  # CBD: train_model is then a DistillStudent returning (logits, student feature)
        self.device = device
        self.criterion = build_loss(t["loss"], bundle.train_counts, **t, scale=cfg["model"]["scale"]).to(device)
        self.reweighting = build_reweighting(t["reweight"], bundle.train_counts, **t)
        train_set = bundle.train.with_augment(cfg["dataset"]["augment"])
        d = cfg["distill"]
        # CBD's batches: the release's class-aware sampler, or the `mixed` variant; every other method: shuffled
        sampling = {} if teachers is None else (
            {"samples_per_class": d["samples_per_class"]} if d["sampler"] == "class_aware"
            else {"balanced_share": d["class_balanced_share"]})
        self.sampler = EpochBatches(len(train_set), t["batch_size"], cfg["seed"], ctx.rank, ctx.world_size,
                                    labels=train_set.targets, **sampling)
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
        weights = self.reweighting(unit)  # train.reweight's weights of this epoch (DRW: none, then class-balanced)
        self.criterion.set_class_weights(None if weights is None else weights.to(self.device))
        self.train_model.train()

    def batches(self, unit: int) -> BatchLoader:
        return self.loader

    def lr(self, unit: int, batch: int, batches: int) -> float:
        return lr_at(unit + batch / batches, self.t)

    def step(self, batch) -> StepResult:
        x, y, _ = batch
        x = self.accel.inputs(x)
        with self.accel.autocast():
            if self.teachers is None:
                logits = self.train_model(x)
                loss = self.criterion(logits.float(), y)
            else:
                logits, student = self.train_model(x)
                d = self.cfg["distill"]
                loss = cbd_loss(logits, y, student, self.teachers(x), alpha=d["alpha"], beta=d["beta"])
        return StepResult(loss, len(y), logits, y)

    def unit_stats(self, unit: int, seconds: float) -> dict:
        return {"lr": lr_at(unit, self.t), "train_s": seconds,
                "images_per_s": self.sampler.samples_per_epoch() / max(seconds, 1e-9)}

    def evaluate(self) -> tuple[dict, dict | None]:
        distributed.sync_buffers(self.model)  # every rank evaluates the model rank 0 saves
        return self.eval_sets.evaluate(self.model, self.bundle.train_counts, self.cfg["eval"]["hr"], accel=self.accel)


def _train(cfg: dict, paths: RunPaths, device: torch.device, accel: Accel, method: PhaseIMethod,
           teachers: TeacherEnsemble | None, command: str, *, resume: bool, overwrite: bool) -> dict:
    """Train (or resume) the run; `command` is its command line, for the messages that suggest one."""
    mode, logger = open_run(paths, cfg, resume=resume, overwrite=overwrite, command=command)
    if mode == "finished":
        return read_results(paths.results) or {}
    ctx = distributed.context()
    seed_everything(cfg["seed"])
    with distributed.main_first():  # rank 0 writes train_subset.json (or downloads); the others read it
        bundle = build_datasets(cfg["dataset"], paths.checkpoint_dir)
    t = cfg["train"]
    model = accel.prepare_model(build_phase_i_model(cfg, bundle, device))
    # what the loop trains: the model, or (CBD) the model and, with more than one teacher, its projection to the
    # teachers' features (the release's ecbd_converter)
    trained: torch.nn.Module = model if teachers is None else DistillStudent(
        model, teachers.feature_dim, project=len(teachers.teachers) > 1).to(device)
    optimizer = build_optimizer(trained.parameters(), t)
    scaler = accel.grad_scaler()
    scaler = scaler if scaler.is_enabled() else None
    logger.info(f"dataset {bundle.name}: {len(bundle.train)} train / {len(bundle.test)} test images, "
                f"{bundle.num_classes} classes, train counts {bundle.train_counts}; device {device}, "
                f"{ctx.world_size} process(es), global batch {t['batch_size']}; {accel.describe()}")

    def payload(**extra) -> dict:
        projection = {} if teachers is None or trained.projection is None else {
            "projection": trained.projection.state_dict()}
        return checkpoint_payload(model, cfg, bundle, paths.run_name, **projection, **extra)

    def restore(state: dict, path: Path) -> None:
        apply_weights(model, state, path)
        if teachers is not None and trained.projection is not None:
            trained.projection.load_state_dict(state["projection"])

    start, recorder = start_recording(paths, mode, logger, payload, restore=restore, optimizer=optimizer, scaler=scaler, step_name="epoch", total_steps=t["epochs"],
                                      command=command, select_on_val=bundle.val is not None)
    # `model` stays the plain module (checkpoints, evaluation); `train_model` is what the loop calls
    train_model: torch.nn.Module = trained
    if ctx.enabled:
        train_model = DistributedDataParallel(trained, device_ids=[device] if device.type == "cuda" else None)
    task = BackboneTraining(cfg, bundle, model, accel.compiled(train_model), device, accel, teachers)
    fit(task, optimizer, recorder, start=start, scaler=scaler)
    distilled = {} if teachers is None else {"teachers": [str(RunPaths(METHODS.get(method.teacher).folder, paths.config,
                                                                        f"{paths.note}-teacher{k}").best)
                                                         for k in range(1, cfg["distill"]["teachers"] + 1)]}
    return recorder.finish(method=method.id, loss=t["loss"], reweight=t["reweight"],
                           classifier=cfg["model"]["classifier"], **distilled, epochs=t["epochs"],
                           processes=ctx.world_size, train_samples=len(bundle.train),
                           samples_seen=t["epochs"] * task.sampler.samples_per_epoch(), **bundle.split_sizes())
