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
classifier sees them, towards real per-class statistics (:func:`engine.map_statistics.real_statistics`).
Every run records per-class statistics of the pooled real and generated rows it trained on
(:class:`engine.map_statistics.RowStatistics`), and refuses, before touching its run folder, a batch too
large for the device's memory (:func:`engine.batch_memory.check_batch_memory`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from datasets import DatasetBundle
from datasets.loader import BatchLoader
from engine.accel import NO_ACCEL, Accel
from engine.artifacts import checkpoint_payload
from engine.batch_memory import check_batch_memory
from engine.loops import EvalSets, StepResult, TrainingTask, fit, ordered_map
from engine.map_statistics import RowStatistics, real_statistics
from engine.methods.maps import MapMethod
from engine.metrics import classification_report
from engine.optim import build_optimizer, lr_at
from engine.phase_iii import PhaseIIIInputs
from fsa.batch_composition import BatchPlan, TailHeadComposer, batch_size
from fsa.feature_store import FeatureStore
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


class MapTraining(TrainingTask):
    """A map method's side of the loop: one batch per iteration, evaluated (and booked) every
    ``finetune.eval_every`` iterations, iteration 0 = the phase I model itself (with ``finetune.init:
    reinit``, its backbone and the fresh classifier); the lr of each iteration is :func:`finetune_lr`'s."""

    step_name = "iteration"
    divergence_settings = "finetune.lr and finetune.momentum"
    evaluate_first = True
    progress_over_units = True

    def __init__(self, inputs: PhaseIIIInputs, generator: MapGenerator, composer: TailHeadComposer, unfreeze: bool,
                 start: int, stats: RowStatistics | None = None):
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
