"""Phase III: fine-tune the classifier (optionally the last stage) with generated tail samples.

online  -- every iteration recomputes feature maps and CAMs of the sampled images with the current
           network (input augmentation on, CAMs in eval mode), then generates and steps.
offline -- feature maps and CAMs come from phase II's store; training never touches an image.

The backbone stays in eval mode throughout (BatchNorm statistics frozen, CAMs as in phase II);
only `fc` -- and with `finetune.unfreeze` (online) the last stage -- receives gradients.

Under torchrun every rank draws the same batch plan (a pure function of seed and iteration) and
takes every W-th of its tail and head rows; the trainable part is wrapped in
DistributedDataParallel and the loss is scaled so that the averaged gradient is that of the whole
batch. `finetune.nt` / `na` therefore describe the global batch, whatever the number of processes.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from datasets import DatasetBundle, build_datasets
from datasets.loader import BatchLoader
from engine.accel import NO_ACCEL, Accel
from engine.loops import EvalSets, evaluate
from engine.optim import build_optimizer
from engine.phase_i import checkpoint_payload, load_phase_i_model, phase_i_command, selection_of
from engine.phase_iii_runs import phase_iii_command, phase_name
from engine.phase_iii_features import FEATURE_GENERATORS, check_generator_mode, run_feature_generator, write_sources
from engine.recorder import open_run, start_recording, write_test_results
from fsa.batch_composition import BatchPlan, TailHeadComposer, batch_size
from fsa.confusion import confusing_table
from fsa.feature_store import FeatureStore
from fsa.generators import GENERATORS, GeneratorContext, MapGenerator, build_generator
from fsa.gradcam import features_and_cams
from fsa.provenance import check_provenance, phase_ii_command, read_provenance
from models import LTModel
from utils.checkpoint import apply_weights, load_checkpoint
from utils.config import config_name, load_config
from utils import distributed
from utils.errors import UserError
from utils.run_dir import RunPaths, lock_run, read_results
from utils.seeding import derived_seed, seed_everything

MODES = ("online", "offline")


def available_generators() -> list[str]:
    """Every value `finetune.generator` accepts (map-level generators and feature-level ones)."""
    return list(GENERATORS) + list(FEATURE_GENERATORS)


@dataclass
class PhaseIIOutputs:
    """What phase III reads from `features/<config>/<note>/`."""

    folder: Path
    config: dict
    head: list[int]
    tail: list[int]
    confusing: torch.Tensor  # [C, nf], -1 where a class has no confusing classes
    checkpoint: Path


def read_phase_ii(folder: Path, phase_i: RunPaths, num_classes: int) -> PhaseIIOutputs:
    """Load phase II's split, confusing classes and config, after checking they match phase I."""
    prov = read_provenance(folder)
    checkpoint = Path(prov["phase_i_checkpoint"]["path"])
    if not checkpoint.is_file():
        checkpoint = phase_i.best
    check_provenance(folder, checkpoint, phase_i.checkpoint_dir / "config.yaml")
    cfg = load_config(str(folder / "config.yaml"), "phase_ii")
    split = json.loads((folder / "split.json").read_text())
    confusion = json.loads((folder / "confusion.json").read_text())
    table = confusing_table({int(k): v for k, v in confusion["confusing"].items()}, num_classes, confusion["nf"])
    return PhaseIIOutputs(folder, cfg, list(split["head"]), list(split["tail"]), table, checkpoint)


def run(args: argparse.Namespace, mode: str) -> dict:
    assert mode in MODES
    cfg = load_config(args.config, "phase_iii", args.opts)
    name = config_name(args.config)
    f = cfg["finetune"]
    if f["generator"] not in available_generators():
        raise UserError(f"Unknown finetune.generator '{f['generator']}'. Available: {', '.join(available_generators())}.")
    check_generator_mode(f["generator"], mode, name, args.note)  # tailcalib: offline only, tailcalibx: online only
    paths = RunPaths(phase_name(mode, f["generator"]), name, args.note)
    phase_i = paths.sibling("phase_i")
    if not (phase_i.checkpoint_dir / "config.yaml").is_file() or not phase_i.best.is_file():
        raise UserError(f"No phase I run for config '{name}', note '{args.note}' ({phase_i.checkpoint_dir}). "
                        f"Run phase I, then phase II, first: {phase_i_command(name, args.note)}")
    if not (paths.features_dir / "results.json").is_file():
        raise UserError(f"No phase II outputs in {paths.features_dir}. Run phase II first: {phase_ii_command(name, args.note)}")
    device = distributed.setup_device(args.device)
    lock_run(paths)
    accel = Accel.from_config(cfg["accel"], device)
    ctx = distributed.context()
    if ctx.world_size > f["nt"]:
        raise UserError(f"finetune.nt={f['nt']} tail samples per iteration cannot be shared by {ctx.world_size} processes "
                        f"(each needs at least one): raise finetune.nt to >= {ctx.world_size} or use fewer processes.")
    p1_cfg = load_config(str(phase_i.checkpoint_dir / "config.yaml"), "phase_i")
    bundle = build_datasets(p1_cfg["dataset"], phase_i.checkpoint_dir)
    p2 = read_phase_ii(paths.features_dir, phase_i, bundle.num_classes)
    store = _open_store(paths.features_dir, name, args.note) if mode == "offline" else None
    model, _ = load_phase_i_model(p2.checkpoint, p1_cfg, bundle, device, phase_i_command(name, args.note))
    accel.prepare_model(model)
    eval_sets = EvalSets.of(bundle, cfg["eval"]["batch_size"], device)
    hr = p2.config["split"]["hr"]
    command = phase_iii_command(mode, name, args.note, f["generator"])
    if f["generator"] in FEATURE_GENERATORS:  # TailCalib / TailCalibX: pooled features, own classifier and loop
        return run_feature_generator(args, mode, cfg, paths, bundle=bundle, model=model, p2=p2, store=store, device=device,
                                     hr=hr, command=command, accel=accel)

    if cfg["phase"] == "test":
        ckpt = Path(args.checkpoint) if getattr(args, "checkpoint", None) else paths.best
        apply_weights(model, load_checkpoint(ckpt, produced_by=command), ckpt)
        return write_test_results(paths, ckpt, evaluate(model, eval_sets.test, bundle.train_counts, hr, accel=accel))

    composer = TailHeadComposer(bundle.train.targets, p2.tail, p2.head, f["nt"], f["na"], cfg["seed"])
    generator = build_generator(f["generator"], GeneratorContext(
        labels=bundle.train.targets, confusing=p2.confusing, composer=composer, na=f["na"],
        ts=p2.config["split"]["ts"], tg=p2.config["split"]["tg"]))
    run_mode, logger = open_run(paths, cfg, resume=args.resume, overwrite=args.overwrite, command=command)
    if run_mode == "finished":
        return read_results(paths.results) or {}
    write_sources(paths, p2, mode)

    # offline maps come from the store, so the last stage could not learn anything there
    unfreeze = f["unfreeze"] and mode == "online"
    trainable = _set_trainable(model, unfreeze)
    optimizer = build_optimizer(trainable, f)
    start, recorder = start_recording(paths, run_mode, model, optimizer, logger,
                                      lambda **extra: checkpoint_payload(model, cfg, bundle, phase=paths.phase, **extra),
                                      step_name="iteration", total_steps=f["iterations"], command=command,
                                      select_on_val=bundle.val is not None)
    logger.info(f"{mode} fine-tuning, generator {f['generator']}, tail classes {p2.tail}, head classes {p2.head}, "
                f"batch {2 * f['nt'] * (1 + f['na'])} (nt {f['nt']}, na {f['na']}), trainable "
                f"{sum(p.numel() for p in trainable)} parameters, device {device}, {ctx.world_size} process(es); "
                f"{accel.describe()}")
    if start == 0:
        report, val_report = eval_sets.evaluate(model, bundle.train_counts, hr, accel=accel)
        recorder.record(0, {}, report, optimizer, 0.0, val_report=val_report)  # the phase I model itself

    head: torch.nn.Module = _Head(model)
    if ctx.enabled:
        head = DistributedDataParallel(head, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)
    draws = IterationDraws(composer, generator, cfg["seed"], ctx.rank, ctx.world_size)
    if mode == "online":
        fetch = _OnlineMaps(model, bundle, device, unfreeze, accel)
        if not fetch.in_memory:  # file datasets: DataLoader workers load the next iterations' images ahead
            fetch.prefetch(draws, start, f["iterations"], f["num_workers"])
    else:
        fetch = _OfflineMaps(store, device)
    train_set_size = len(bundle.train)
    window_loss, window_started = [], time.perf_counter()
    for iteration in range(start, f["iterations"]):
        seed_everything(cfg["seed"] * 7_919 + iteration)
        plan, rng, extra = draws(iteration)
        loss = _train_step(model, optimizer, generator, plan, rng, fetch, extra=extra, head=head,
                           global_rows=batch_size(f["nt"], f["na"]), world_size=ctx.world_size)
        window_loss.append(loss)
        done = iteration + 1
        if done % f["eval_every"] == 0 or done == f["iterations"]:
            report, val_report = eval_sets.evaluate(model, bundle.train_counts, hr, accel=accel)
            # every rank's scaled loss sums to the loss of the global batch
            loss_sum = distributed.all_reduce_sum(torch.stack(window_loss).mean().cpu().double())
            stats = {"loss": float(loss_sum) / ctx.world_size, "lr": f["lr"]}
            recorder.record(done, stats, report, optimizer, time.perf_counter() - window_started, val_report=val_report)
            window_loss, window_started = [], time.perf_counter()
    return recorder.finish(mode=mode, generator=f["generator"], iterations=f["iterations"], train_samples=train_set_size,
                           tail_classes=p2.tail, head_classes=p2.head, processes=ctx.world_size,
                           phase_i_checkpoint=str(p2.checkpoint),
                           phase_i_checkpoint_selection=selection_of(p2.checkpoint, phase_i), **bundle.split_sizes())


def _open_store(folder: Path, name: str, note: str) -> FeatureStore:
    store_dir = folder / "store"
    if not (store_dir / "meta.json").is_file():
        raise UserError(f"Phase II stored no feature maps in {store_dir} (store.enabled was false or it did not finish), "
                        f"so offline fine-tuning has nothing to read. Rerun phase II with the store on: "
                        f"{phase_ii_command(name, note, overwrite=True)} --opts store.enabled=true")
    return FeatureStore(store_dir)


def _set_trainable(model: LTModel, unfreeze: bool) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    modules = [model.fc, model.last_stage] if unfreeze else [model.fc]
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    model.eval()  # BatchNorm frozen; see the module docstring
    return params


_IMAGE_STREAM = 1  # IterationDraws.image_seed: derived_seed stream of the file-dataset augmentation


class IterationDraws:
    """This rank's sample draws of phase III iteration `i`: `(plan, rng, extra)` where `plan` holds the
    real tail / head indices (under torchrun: every W-th row of the global plan), `extra` the samples
    the generator needs (donors, or more tail samples for `none`) and `rng` the generator for the
    iteration's remaining draws. A pure function of (seed, i, rank): the training loop and the
    file-dataset prefetcher both call it and get the same indices."""

    def __init__(self, composer: TailHeadComposer, generator: MapGenerator, seed: int, rank: int = 0, world_size: int = 1):
        self.composer, self.generator, self.seed = composer, generator, seed
        self.rank, self.world_size = rank, world_size

    def __call__(self, iteration: int) -> tuple[BatchPlan, torch.Generator, torch.Tensor]:
        plan, rng = self.composer.plan(iteration)
        if self.world_size > 1:  # this rank's share of the global plan, and its own stream for the other draws
            plan = BatchPlan(tail=plan.tail[self.rank::self.world_size], head=plan.head[self.rank::self.world_size])
            rng = torch.Generator().manual_seed(derived_seed(derived_seed(self.seed, iteration), 1 + self.rank))
        extra = self.generator.extra_indices(self.generator.ctx.labels[plan.tail], rng)
        return plan, rng, extra

    def images(self, iteration: int) -> list[int]:
        """Every training index whose image iteration `iteration` fetches, in `_train_step`'s order."""
        plan, _, extra = self(iteration)
        return torch.cat([plan.tail, extra, plan.head]).tolist()

    def image_seed(self, iteration: int) -> int:
        """The seed of this rank's file-dataset augmentation at iteration `iteration` (each image's seed
        derives from it; in-memory datasets augment with `rng` instead). A stream apart from `rng`'s."""
        return derived_seed(derived_seed(derived_seed(self.seed, iteration), 1 + self.rank), _IMAGE_STREAM)


class _IterationBatches:
    """Batch sampler over iterations [start, stop): the image indices of each (for a DataLoader)."""

    def __init__(self, draws: IterationDraws, start: int, stop: int):
        self.draws, self.start, self.stop = draws, start, stop

    def __iter__(self):
        return (self.draws.images(i) for i in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start

    def seeds(self) -> list[int]:
        """Each iteration's image seed: the images of iteration i do not depend on where the run (re)started."""
        return [self.draws.image_seed(i) for i in range(self.start, self.stop)]


class _Head(torch.nn.Module):
    """`model.head` as a module of its own: what DistributedDataParallel wraps in phase III (the
    trainable `fc`, and with unfreeze the last stage, whose gradients flow through the maps)."""

    def __init__(self, model: LTModel):
        super().__init__()
        self.model = model

    def forward(self, fmaps: torch.Tensor) -> torch.Tensor:
        return self.model.head(fmaps)


class _OnlineMaps:
    """Feature maps + CAMs of training images, recomputed with the current network (augmented)."""

    def __init__(self, model: LTModel, bundle: DatasetBundle, device: torch.device, with_grad: bool,
                 accel: Accel = NO_ACCEL):
        self.model, self.device, self.with_grad, self.accel = model, device, with_grad, accel
        self.train = bundle.train.with_augment(True)
        self.labels = bundle.train.targets
        self.in_memory = hasattr(self.train, "get_batch")
        self._ahead = None

    def prefetch(self, draws: IterationDraws, start: int, stop: int, num_workers: int) -> None:
        """Load the images of iterations start..stop-1 through one persistent DataLoader (workers,
        pinned memory), in order; each call then takes the next batch and checks its indices."""
        batches = _IterationBatches(draws, start, stop)
        self._ahead = iter(BatchLoader(self.train, batches, self.device, num_workers=num_workers,
                                       batch_seeds=batches.seeds()))

    def _images(self, indices: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ahead is None:  # in-memory: gather + augment on the device now, with the iteration's rng
            x, y, _ = next(iter(BatchLoader(self.train, [indices.tolist()], self.device, generator=rng)))
            return x, y
        x, y, idx = next(self._ahead)
        if not torch.equal(idx.cpu(), indices.cpu()):
            raise RuntimeError("phase III prefetch is out of step with the training loop")
        return x, y

    def __call__(self, indices: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = self._images(indices, rng)
        with self.accel.autocast():
            fmaps, cams, _ = features_and_cams(self.model, self.accel.inputs(x), y, with_grad=self.with_grad)
        return fmaps.float(), cams.float(), y


class _OfflineMaps:
    """Feature maps + CAMs from phase II's store; each row reads a random stored view."""

    def __init__(self, store: FeatureStore, device: torch.device):
        self.store, self.device = store, device

    def __call__(self, indices: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        views = torch.randint(self.store.views, (len(indices),), generator=rng)
        fmaps, cams, labels = self.store.get(indices, views)
        return fmaps.to(self.device), cams.to(self.device), labels.to(self.device)


def _train_step(model: LTModel, optimizer: torch.optim.Optimizer, generator: MapGenerator, plan, rng: torch.Generator,
                fetch, *, extra: torch.Tensor | None = None, head: torch.nn.Module | None = None,
                global_rows: int | None = None, world_size: int = 1) -> torch.Tensor:
    """One batch: real tail, generated, real head rows; cross-entropy on the classifier head.

    `head` defaults to `model.head`; under torchrun it is the DDP-wrapped head, this rank holds a
    share of the `global_rows` rows, and its loss is the sum over its rows * world_size / global_rows,
    so the gradient DDP averages over the ranks is that of the mean over the whole batch."""
    nt = len(plan.tail)
    tail_labels = generator.ctx.labels[plan.tail]
    if extra is None:  # (IterationDraws draws it with the plan)
        extra = generator.extra_indices(tail_labels, rng)
    # one fetch (one forward pass online) for every real sample of the batch
    maps, cams, labels = fetch(torch.cat([plan.tail, extra, plan.head]), rng)
    n_extra = len(extra)
    tail_maps, extra_maps, head_maps = maps[:nt], maps[nt:nt + n_extra], maps[nt + n_extra:]
    tail_cams, extra_cams = cams[:nt], cams[nt:nt + n_extra]
    tail_y, extra_y, head_y = labels[:nt], labels[nt:nt + n_extra], labels[nt + n_extra:]
    generated, generated_y = generator.generate(tail_maps, tail_cams, tail_y, extra_maps, extra_cams, extra_y, rng)
    logits = (head or model.head)(torch.cat([tail_maps, generated.to(tail_maps.dtype), head_maps]))
    targets = torch.cat([tail_y, generated_y.to(tail_y.device), head_y])
    if world_size > 1:
        loss = F.cross_entropy(logits, targets, reduction="sum") * (world_size / global_rows)
    else:
        loss = F.cross_entropy(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
