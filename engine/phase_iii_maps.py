"""Phase III map methods (kind ``maps`` of the method table, e.g. FSA and its cRT control):
fine-tune the classifier (optionally the last stage) with generated tail rows on CAM-layer maps.

online  -- every iteration recomputes feature maps and CAMs of the sampled images with the current
           network (input augmentation on, CAMs in eval mode), then generates and steps.
offline -- feature maps and CAMs come from phase II's store; training never touches an image.

The method's generator (a :class:`fsa.generators.MapGenerator`, its table entry's
``implementation``) names the extra samples it needs and turns their maps into the batch's
generated rows. The backbone stays in eval mode throughout (BatchNorm statistics frozen, CAMs as in
phase II); only `fc` -- and with `finetune.unfreeze` (online) the last stage -- receives gradients.

Under torchrun every rank draws the same batch plan (a pure function of seed and iteration) and
takes every W-th of its tail and head rows; the trainable part is wrapped in
DistributedDataParallel and the loss is scaled so that the averaged gradient is that of the whole
batch. `finetune.nt` / `na` therefore describe the global batch, whatever the number of processes.

The classifier starts from phase I's ``fc`` or, with ``finetune.init: reinit``, from a fresh one of the
backbone's kind (:func:`fresh_classifier`); its learning rate is ``finetune.lr`` throughout or, with
``finetune.schedule: cosine``, :func:`finetune_lr`'s cosine to 0 over the iterations. With ``fusion.match``
the generated rows pass through the generator's ``match`` (:func:`fsa.fusion.match_statistics`) before the
classifier sees them, towards real per-class statistics from :func:`real_statistics`. Every run records
per-class statistics of the pooled real and generated rows it trained on (:class:`RowStatistics`).

Before training, :func:`check_batch_memory` compares a conservative estimate of one batch's memory
(:func:`batch_bytes`) with what the device has available (:func:`available_memory`), so that a batch
too large for the machine is refused with the settings to lower instead of growing until it is killed.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from datasets import DatasetBundle
from datasets.loader import BatchLoader
from engine.accel import NO_ACCEL, Accel
from engine.artifacts import checkpoint_payload
from engine.loops import EvalSets, StepResult, TrainingTask, fit, ordered_map
from engine.methods.maps import MapMethod
from engine.metrics import classification_report
from engine.optim import build_optimizer, lr_at
from engine.phase_iii import PhaseIIIInputs
from engine.phase_iii_features import pooled_features
from fsa.batch_composition import BatchPlan, TailHeadComposer, batch_size
from fsa.feature_store import FeatureStore, format_bytes
from fsa.fusion import ClassStatistics, PooledMoments, class_statistics
from fsa.generators import GeneratorContext, MapGenerator
from fsa.gradcam import CamExtractor
from models import LTModel, fresh_like
from models.base import eval_mode
from utils.checkpoint import apply_weights
from utils.errors import UserError
from utils import distributed
from utils.json_files import read_results
from utils.seeding import seed_everything, stream_seed


def run(inputs: PhaseIIIInputs, method: MapMethod) -> dict:
    """Train (or, with ``phase: test``, evaluate) map method `method` on `inputs`."""
    cfg, f, model, bundle = inputs.cfg, inputs.cfg["finetune"], inputs.model, inputs.bundle
    ctx = distributed.context()
    if ctx.world_size > f["nt"]:
        raise UserError(f"finetune.nt={f['nt']} tail samples per iteration cannot be shared by {ctx.world_size} processes "
                        f"(each needs at least one): raise finetune.nt to >= {ctx.world_size} or use fewer processes.")
    if cfg["phase"] == "test":
        return inputs.test_model_checkpoint()

    p2 = inputs.p2
    composer = TailHeadComposer(bundle.train.targets, p2.tail, p2.head, f["nt"], f["na"], cfg["seed"])
    generator = method.generator_class()(GeneratorContext(
        labels=bundle.train.targets, confusing=p2.confusing, composer=composer, na=f["na"], ts=p2.ts, tg=p2.tg,
        match=cfg["fusion"]["match"], options=method.options(cfg)))
    if generator.matches and type(model).pool is not LTModel.pool:
        raise UserError(f"fusion.match={cfg['fusion']['match']} rescales feature maps so that their spatial mean takes "
                        f"the real statistics, but {type(model).__name__} pools otherwise: use fusion.match=none.")
    # offline maps come from the store, so the last stage could not learn anything there
    unfreeze = f["unfreeze"] and method.mode == "online"
    check_batch_memory(inputs, unfreeze)  # before the run folder is touched
    run_mode, logger = inputs.open_run()
    if run_mode == "finished":
        return read_results(inputs.paths.results) or {}

    # before a resume restores last.pt: the fresh classifier is replaced by the saved one like any weights,
    # and the real statistics are those of the phase I backbone
    if f["init"] == "reinit":
        model.fc = fresh_classifier(model, cfg["seed"])
    if generator.matches:
        generator.ctx.targets = real_statistics(inputs)
    stats = RowStatistics(bundle.num_classes, model.feature_dim, inputs.device, generator.matches)
    trainable = _set_trainable(model, unfreeze)
    optimizer = build_optimizer(trainable, f)
    # fp16 autocast gradients reach the unfrozen last stage through the online maps: scale them
    scaler = inputs.accel.grad_scaler() if unfreeze else None
    scaler = scaler if scaler is not None and scaler.is_enabled() else None

    def payload(**extra) -> dict:
        if "optimizer" in extra:  # last.pt, which --resume continues from: the statistics booked so far too
            extra["feature_statistics"] = stats.state()
        return checkpoint_payload(model, cfg, bundle, inputs.paths.run_name, **extra)

    def restore(state: dict, path: Path) -> None:
        apply_weights(model, state, path)
        stats.load(state.get("feature_statistics"), state.get("iteration", 0))

    start, recorder = inputs.start_recording(
        run_mode, logger, payload, restore=restore, optimizer=optimizer, scaler=scaler,
        step_name="iteration", total_steps=f["iterations"])
    logger.info(f"{method.mode} fine-tuning, {method.label} (generator {method.generator}), tail classes {p2.tail}, "
                f"head classes {p2.head}, batch {2 * f['nt'] * (1 + f['na'])} (nt {f['nt']}, na {f['na']}), trainable "
                f"{sum(p.numel() for p in trainable)} parameters, device {inputs.device}, {ctx.world_size} process(es); "
                f"classifier {f['init']}, lr {f['lr']:g} {f['schedule']}, fusion.match {cfg['fusion']['match']}"
                f"{'' if generator.matches or cfg['fusion']['match'] == 'none' else ' (not applied: real rows)'}; "
                f"{inputs.accel.describe()}")
    task = MapTraining(inputs, generator, composer, unfreeze, start, stats)
    fit(task, optimizer, recorder, start=start, scaler=scaler)
    return recorder.finish(**inputs.records(), iterations=f["iterations"], train_samples=len(bundle.train),
                           samples_seen=f["iterations"] * batch_size(f["nt"], f["na"]),
                           finetune={"init": f["init"], "schedule": f["schedule"], "lr": f["lr"]},
                           fusion={"match": cfg["fusion"]["match"], "applied": generator.matches},
                           feature_statistics=stats.summary(f["iterations"], generator.ctx.targets))


def finetune_lr(iteration: int, f: dict) -> float:
    """The learning rate of iteration ``iteration`` (0-based) of a map method, for the ``finetune`` section
    ``f``: ``lr`` throughout (``schedule: constant``) or ``lr * (1 + cos(pi * iteration / iterations)) / 2``
    (``cosine``: lr at 0, lr / 2 halfway, 0 at ``iterations``) -- :func:`engine.optim.lr_at`'s cosine with the
    iteration as its epoch and no warm-up. A pure function of the iteration, so a resumed run continues it."""
    return lr_at(float(iteration), {"lr": f["lr"], "schedule": f["schedule"], "warmup_epochs": 0,
                                    "epochs": f["iterations"]})


def fresh_classifier(model: LTModel, seed: int) -> torch.nn.Module:
    """``finetune.init: reinit``: a newly initialised classifier of the backbone's kind and shape
    (:func:`models.fresh_like`), drawn from torch's CPU generator seeded with ``seed`` inside a forked RNG
    state (the run's other draws are untouched), so that fsa and its control none start from the same one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fresh_like(model.fc)


def real_statistics(inputs: PhaseIIIInputs) -> ClassStatistics:
    """The real per-class statistics ``fusion.match`` rescales generated rows to, on the run's device: those
    of the pooled features of the phase I backbone (eval mode) on the training images, computed once before
    training (deterministic; a resumed run computes the same).

    offline -- phase II's store: the stored pooled features of every stored view (view 0 = the un-augmented
               image, views 1.. its augmented draws): exactly the rows offline training draws its real maps from.
    online  -- one forward pass over the un-augmented training images (what the store's view 0 holds). Online
               training sees augmented images, whose population has no finite list; the un-augmented images
               are its deterministic centre. With finetune.unfreeze the targets stay those of phase I's last stage."""
    model, bundle, num_classes = inputs.model, inputs.bundle, inputs.bundle.num_classes
    if inputs.method.mode == "offline":
        moments = PooledMoments(num_classes, model.feature_dim)
        for view in range(inputs.store.views):
            moments.add(inputs.store.pooled(view), inputs.store.labels)
        return moments.statistics().to(inputs.device)
    with eval_mode(model):
        pooled, labels = pooled_features(model, bundle.train.with_augment(False), inputs.cfg["eval"]["batch_size"],
                                         inputs.device, accel=inputs.accel)
    return class_statistics(pooled, labels, num_classes)


class RowStatistics:
    """Per-class statistics of the pooled features (``model.pool``) of the rows every phase III map run trains
    on, accumulated on the device over its iterations (:class:`fsa.fusion.PooledMoments`, no per-sample loop):
    ``real`` = the batch's real tail and head rows; ``generated`` = the generator's rows as the classifier sees
    them (for the control none: its extra real tail rows); with fusion.match also ``generated_before_match``.

    Each process adds its own rows; at every booking (:meth:`book`) the processes' sums are added up into the
    booked totals, which ``last.pt`` carries (:meth:`state` / :meth:`load`), so a resumed run's statistics
    cover its whole training as a straight run's do. Memory: ``K x (2 + 2D)`` float64 per group on the device
    and as much on the host (ImageNet-LT, 1000 classes x 512: 8 MB; iNaturalist x ResNet-50: 267 MB)."""

    def __init__(self, num_classes: int, dim: int, device: torch.device, matching: bool):
        groups = ("real", "generated", *(("generated_before_match",) if matching else ()))
        self.local = {g: PooledMoments(num_classes, dim, device) for g in groups}
        self.booked = {g: torch.zeros_like(m.sums, device="cpu") for g, m in self.local.items()}  # (host memory)
        self.first = 0  # the first iteration the booked sums cover

    def add(self, group: str, pooled: torch.Tensor, labels: torch.Tensor) -> None:
        if group in self.local:
            self.local[group].add(pooled, labels)

    def book(self) -> None:
        """Add every process's sums since the last booking to the booked totals (one all-reduce per group)."""
        for group, moments in self.local.items():
            self.booked[group] += distributed.all_reduce_sum(moments.sums).cpu()
            moments.sums.zero_()

    def state(self) -> dict:
        return {group: sums.clone() for group, sums in self.booked.items()}

    def load(self, state: dict | None, iteration: int) -> None:
        """The booked sums of a ``last.pt`` of iteration ``iteration``; one saved without them (before this
        record existed) leaves the statistics to cover the iterations from ``iteration`` on."""
        if not state or any(g not in state or state[g].shape != s.shape for g, s in self.booked.items()):
            self.first = int(iteration)
            return
        for group, sums in self.booked.items():
            sums.copy_(state[group].to(sums.device, sums.dtype))

    def summary(self, iterations: int, targets: ClassStatistics | None) -> dict:
        """results.json's ``feature_statistics``: per group and class ``rows``, ``norm`` (mean L2 norm) and
        ``std`` (mean over dimensions of the per-dimension std); null where a class has no row."""
        out: dict = {"iterations": [self.first, int(iterations)]}
        for group, sums in self.booked.items():
            moments = PooledMoments(sums.shape[0], (sums.shape[1] - 2) // 2, sums.device)
            moments.sums = sums
            out[group] = moments.statistics().summary()
        if targets is not None:
            out["match_targets"] = targets.summary()
        return out


def batch_bytes(rows: int, fmap_shape: Sequence[int], *, image_shape: Sequence[int] | None = None,
                forward_bytes: int = 0, queued_batches: int = 0) -> int:
    """A conservative estimate of the bytes one phase III batch of ``rows`` rows (2*nt*(1+na), or one
    process's share of them) holds at its peak, for feature maps ``fmap_shape`` = (C, H, W).

    Per row, in float32: 4 feature maps (the fetched one; the generated one, counted for every row though
    only nt*na of 2*nt*(1+na) rows are generated; the concatenated batch the classifier reads; and one
    working copy: the store's float16 reads offline, the generator's gathered positions) and 2 CAMs (the
    fetched one, the generator's masks). Online (``image_shape`` = (channels, size, size)) also 2 images
    (decoded and augmented), the backbone's forward working set ``forward_bytes`` (see
    :func:`forward_footprint`), and the images of ``queued_batches`` batches that DataLoader workers
    load ahead."""
    c, h, w = (int(v) for v in fmap_shape)
    per_row = 4 * (4 * c * h * w + 2 * h * w)
    if image_shape is not None:
        image = 4 * math.prod(int(v) for v in image_shape)
        per_row += 2 * image + int(forward_bytes) + queued_batches * image
    return int(rows) * per_row


@torch.no_grad()
def forward_footprint(model: LTModel, image_shape: Sequence[int], device: torch.device,
                      with_grad: bool) -> tuple[tuple[int, ...], int]:
    """``(feature map shape (C, H, W), bytes the backbone's forward pass holds per image)`` from one blank
    image, the bytes from the outputs of its leaf modules: without gradients a residual block holds its
    input, up to two intermediates and its output at once (4x the largest output); with ``with_grad`` (the
    last stage unfrozen) the last stage's outputs are kept for the backward pass, which makes their
    gradients there (2x their sum on top)."""
    sizes: dict[str, int] = {}

    def record(name: str):
        def hook(module: torch.nn.Module, args: tuple, out: object) -> None:
            sizes[name] = 4 * out.numel() if isinstance(out, torch.Tensor) else 0
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in model.named_modules()
             if not any(module.children())]
    try:
        with eval_mode(model):  # as phase III runs it (BatchNorm frozen)
            fmap = model.features(torch.zeros(1, *image_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    total = 4 * max(sizes.values(), default=0)
    if with_grad:
        total += 2 * sum(size for name, size in sizes.items() if name.startswith(f"{model.cam_layer}."))
    return tuple(fmap.shape[1:]), total


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``: the free GPU memory, or the host's MemAvailable
    (/proc/meminfo), capped by a cgroup v2 memory limit (containers); None where unknown."""
    if device.type == "cuda":  # what the driver has free, plus what torch's cache holds unused
        free = torch.cuda.mem_get_info(device)[0]
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def check_batch_memory(inputs: PhaseIIIInputs, unfreeze: bool) -> None:
    """UserError naming finetune.nt / finetune.na when one batch (:func:`batch_bytes`) would need more
    memory than the device has available. Under torchrun each process holds its share of the rows; on the
    CPU the processes of one host share its memory."""
    f, bundle, device = inputs.cfg["finetune"], inputs.bundle, inputs.device
    available = available_memory(device)
    if available is None:
        return
    world = distributed.context().world_size
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    per_batch = batch_size(f["nt"], f["na"])
    rows = -(-per_batch // world)  # this process's share
    if inputs.method.mode == "online":
        image_shape = (bundle.in_channels, bundle.train.image_size, bundle.train.image_size)
        fmap_shape, forward = forward_footprint(inputs.model, image_shape, device, unfreeze)
        queued = 0 if hasattr(bundle.train, "get_batch") else 2 * f["num_workers"]  # DataLoader prefetch_factor 2
        sizes = dict(image_shape=image_shape, forward_bytes=forward, queued_batches=queued)
    else:
        fmap_shape, sizes = inputs.store.fmap_shape, {}
    per_row = sharing * batch_bytes(1, fmap_shape, **sizes)
    needed = rows * per_row
    if needed <= available:
        return
    fitting_nt = (available // per_row) * world // (2 * (1 + f["na"]))
    fix = (f"Lower finetune.nt (at most {fitting_nt} fits with finetune.na={f['na']}: --opts finetune.nt={fitting_nt}) "
           f"or finetune.na." if fitting_nt >= 1 else "Even finetune.nt=1 does not fit: free memory, or use a device "
           f"with more.")
    what = f"{'x'.join(map(str, fmap_shape))} feature maps" + (" and their images" if sizes else "")
    shared = f" (by the {sharing} processes of this host)" if sharing > 1 else ""
    raise UserError(
        f"phase III batches of finetune.nt={f['nt']}, finetune.na={f['na']} ({per_batch} rows of {what}) need about "
        f"{format_bytes(needed)} of memory at once{shared}, but {device} has {format_bytes(available)} available. {fix}"
    )


class MapTraining(TrainingTask):
    """A map method's side of the loop: one batch per iteration, evaluated (and booked) every
    ``finetune.eval_every`` iterations, iteration 0 = the phase I model itself (with ``finetune.init:
    reinit``, its backbone and the fresh classifier); the lr of each iteration is :func:`finetune_lr`'s."""

    step_name = "iteration"
    divergence_settings = "finetune.lr and finetune.momentum"
    evaluate_first = True
    progress_over_units = True

    def __init__(self, inputs: PhaseIIIInputs, generator: MapGenerator, composer: TailHeadComposer, unfreeze: bool,
                 start: int, stats: "RowStatistics | None" = None):
        f, ctx = inputs.cfg["finetune"], distributed.context()
        self.inputs, self.generator, self.seed, self.finetune = inputs, generator, inputs.cfg["seed"], f
        self.stats = stats
        self.total, self.eval_every, self.record_every = f["iterations"], f["eval_every"], f["eval_every"]
        self.global_rows, self.world_size = batch_size(f["nt"], f["na"]), ctx.world_size
        model = inputs.model
        self.head: torch.nn.Module = _Head(model)
        if ctx.enabled:
            self.head = DistributedDataParallel(self.head, device_ids=[inputs.device] if inputs.device.type == "cuda" else None,
                                                broadcast_buffers=False)
        self.draws = IterationDraws(composer, generator, self.seed, ctx.rank, ctx.world_size)
        if inputs.method.mode == "online":
            self.fetch = _OnlineMaps(model, inputs.bundle, inputs.device, unfreeze, inputs.accel)
            if not self.fetch.in_memory:  # file datasets: DataLoader workers load the next iterations' images ahead
                self.fetch.prefetch(self.draws, start, f["iterations"], f["num_workers"])
        else:
            self.fetch = _OfflineMaps(inputs.store, inputs.device)
        # classifier-only runs evaluate the trained fc on the frozen backbone's features, computed once
        self.evaluator = inputs.eval_sets if unfreeze else FrozenBackboneEval(model, inputs.eval_sets, inputs.accel)

    def begin(self, unit: int) -> None:
        seed_everything(stream_seed(self.seed, unit))

    def batches(self, unit: int) -> list:
        return [self.draws(unit)]

    def step(self, batch) -> StepResult:
        plan, rng, extra = batch
        loss, logits, targets = batch_loss(self.inputs.model, self.generator, plan, rng, self.fetch, extra=extra,
                                           head=self.head, global_rows=self.global_rows, world_size=self.world_size,
                                           stats=self.stats)
        return StepResult(loss, 1, logits, targets)  # every rank's scaled loss sums to the global batch's

    def lr(self, unit: int, batch: int, batches: int) -> float:
        return finetune_lr(unit, self.finetune)

    def unit_stats(self, unit: int, seconds: float) -> dict:
        done = unit + 1
        if self.stats is not None and (done % self.record_every == 0 or done == self.total):
            self.stats.book()  # fit books this iteration: last.pt gets the statistics up to it
        return {"lr": finetune_lr(unit, self.finetune)}

    def evaluate(self) -> tuple[dict, dict | None]:
        inp = self.inputs
        return self.evaluator.evaluate(inp.model, inp.bundle.train_counts, inp.hr, accel=inp.accel)


class FrozenBackboneEval:
    """:meth:`EvalSets.evaluate` for a run that trains the classifier only: the frozen (eval-mode)
    backbone's pooled features of the test and validation images are computed once, and every
    evaluation applies the current ``fc`` to them. The logits are those of ``model(x)``, bit for bit
    (same batches, same autocast: ``forward`` is ``fc(pool(features(x)))``); the cost of an evaluation
    drops from a forward pass over the images to one matrix product (a 600-iteration run evaluated every
    100 iterations made 7 passes)."""

    def __init__(self, model: LTModel, sets: EvalSets, accel: Accel):
        def pooled(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> dict:
            with accel.autocast():  # kept in the dtype the head receives in model(x)
                return {"pooled": model.pool(model.features(accel.inputs(x))), "label": y, "index": idx}

        def features(dataset) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad(), eval_mode(model):
                rows = ordered_map(pooled, dataset.with_augment(False), sets.batch_size, sets.device, desc="eval features")
            return rows["pooled"], rows["label"]

        self.test = features(sets.test)
        self.val = None if sets.val is None else features(sets.val)

    def evaluate(self, model: LTModel, train_counts: list[int], hr: float, *,
                 accel: Accel = NO_ACCEL) -> tuple[dict, dict | None]:
        def report(rows: tuple[torch.Tensor, torch.Tensor]) -> dict:
            pooled, labels = rows
            with torch.no_grad(), eval_mode(model), accel.autocast():
                logits = model.fc(pooled)
            return classification_report(logits.float().argmax(1).cpu(), labels.cpu(), train_counts, hr)

        return report(self.test), None if self.val is None else report(self.val)


def _set_trainable(model: LTModel, unfreeze: bool) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    modules = [model.fc, model.last_stage] if unfreeze else [model.fc]
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    model.eval()  # BatchNorm frozen; see the module docstring
    return params


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
            rng = torch.Generator().manual_seed(stream_seed(self.seed, iteration, 1 + self.rank))
        extra = self.generator.extra_indices(self.generator.ctx.labels[plan.tail], rng)
        return plan, rng, extra

    def images(self, iteration: int) -> list[int]:
        """Every training index whose image iteration `iteration` fetches, in `batch_loss`'s order."""
        plan, _, extra = self(iteration)
        return torch.cat([plan.tail, extra, plan.head]).tolist()

    def image_seed(self, iteration: int) -> int:
        """The seed of this rank's file-dataset augmentation at iteration `iteration` (each image's seed
        derives from it; in-memory datasets augment with `rng` instead). A stream apart from `rng`'s."""
        return stream_seed(self.seed, iteration, 1 + self.rank, "phase_iii.images")


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
        # closed form on a linear head, autograd on any other (a cosine head: CosineCE, LDAM-DRW, CBD)
        self.cams = CamExtractor(model)
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
            fmaps, cams, _ = self.cams(self.accel.inputs(x), y, with_grad=self.with_grad)
        return fmaps.float(), cams.float(), y


class _OfflineMaps:
    """Feature maps + CAMs from phase II's store; each row reads a random stored view."""

    def __init__(self, store: FeatureStore, device: torch.device):
        self.store, self.device = store, device

    def __call__(self, indices: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        views = torch.randint(self.store.views, (len(indices),), generator=rng)
        fmaps, cams, labels = self.store.get(indices, views)
        return fmaps.to(self.device), cams.to(self.device), labels.to(self.device)


def batch_loss(model: LTModel, generator: MapGenerator, plan, rng: torch.Generator, fetch, *,
               extra: torch.Tensor | None = None, head: torch.nn.Module | None = None, global_rows: int | None = None,
               world_size: int = 1, stats: RowStatistics | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(loss, logits, targets)` of one batch: real tail, generated (after the generator's `match`), real head
    rows; cross-entropy on the classifier head. `stats` (optional) receives the rows' pooled features.

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
    generated_y = generated_y.to(tail_y.device)
    if getattr(generator, "matches", False):  # (duck-typed generators without `match` add their rows as they are)
        if stats is not None:
            with torch.no_grad():
                stats.add("generated_before_match", model.pool(generated.detach()), generated_y)
        generated = generator.match(generated, generated_y)
    rows = torch.cat([tail_maps, generated.to(tail_maps.dtype), head_maps])
    logits = (head or model.head)(rows)
    targets = torch.cat([tail_y, generated_y, head_y])
    if stats is not None:
        with torch.no_grad():
            pooled, end = model.pool(rows.detach()), nt + len(generated)  # slices: no device sync
            stats.add("generated", pooled[nt:end], targets[nt:end])
            stats.add("real", torch.cat([pooled[:nt], pooled[end:]]), torch.cat([targets[:nt], targets[end:]]))
    if world_size > 1:
        loss = F.cross_entropy(logits, targets, reduction="sum") * (world_size / global_rows)
    else:
        loss = F.cross_entropy(logits, targets)
    return loss, logits, targets
