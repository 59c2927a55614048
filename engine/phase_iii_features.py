"""Phase III with a feature-level generator: TailCalib (offline) and TailCalibX (online).

DESIGN.md section 3.  Unlike `fsa` / `none`, which fine-tune the phase I model on CAM-layer feature
maps, these generators work on the **pooled** features of the frozen phase I backbone and train a
linear classifier on *transformed* features:

    z = tukey(l2_normalize(pool(features(x))), lambda)        (fsa.generators.tailcalib)
    logits = W z + b

tailcalib  (phase_iii_offline_train_or_test.py) -- the training features are phase II's stored
           pooled features of the un-augmented images (`FeatureStore.pooled(0)`); the class
           statistics are fitted and the calibrated samples drawn **once**; every class is filled
           up to the head (largest) class count; the classifier then trains `tailcalib.epochs`
           epochs of seeded shuffled minibatches over real + generated features.
tailcalibx (phase_iii_online_train_or_test.py) -- every epoch recomputes the pooled features of
           freshly augmented training images with the frozen backbone (batched forward, eval mode),
           refits the statistics, regenerates, then trains that epoch.  Test features are computed
           once from the un-augmented test images.

Both evaluate after every epoch on the test set's pooled features (offline: phase II's
`test_pooled`; online: computed once) **with the same transform**, through
`engine.metrics.classification_report` (top1, many/medium/few, head/tail with phase II's split.hr),
so their rows compare with every other phase III run.

Choices (where the release or DESIGN leave room):
- classifier: a **fresh** `nn.Linear(feature_dim, num_classes)` seeded by `seed` (`tailcalib.init:
  fresh`, the default).  The phase I fc was trained on raw pooled features; after L2-normalisation
  and Tukey's transform its inputs live elsewhere (different scale, and for lambda != 1 a different
  geometry), so it is not a natural starting point.  `tailcalib.init: phase_i` copies it anyway
  (useful as an ablation; the authors' release re-loads its cosine classifier, whose scale
  invariance makes that copy meaningful there).
- calibration neighbours: the `k` class means nearest to a real sample among **all** classes
  (`tailcalib.neighbours: all`, the default), as the authors' release does (its own class mean is
  usually one of them); `others` excludes the sample's own class (the library's default).  On the
  smoke and Fashion-MNIST-LT stores `all` gave +2..5 top1 and steadier epochs: with `others` and
  few classes, 3 of the 4 averaged vectors of a calibrated mean belong to other classes.
- optimiser: `finetune.optimizer/momentum/nesterov/weight_decay`, constant lr `tailcalib.lr`
  (null = `finetune.lr`); the release uses SGD lr 0.01 without a schedule.
- seeds: generation, augmentation and shuffling of epoch `e` derive from `(seed, e)`, so a run
  resumed from `last.pt` (epoch granularity) replays exactly what a straight run does.
- `best_model.pt` is the selected epoch (as every run here): the best validation mean class accuracy
  with a validation split, else the final epoch; `results.json`'s top-level metrics are the test
  numbers of that epoch.  `history` starts at epoch 1 (a fresh classifier
  has nothing to evaluate at epoch 0); the phase I classifier on the same test features is in
  `phase_i_reference`.  Also recorded: `generated_per_class` (list by class), `generated_total`,
  `balanced_to` (the head count), `iterations` (SGD steps), `selected_iteration`, `lr`,
  `classifier_init`, `neighbours`, `feature_transform`.  Per epoch, `generate_s` is the time to
  (online: extract features and) generate.

**Checkpoints are not drop-in backbone + fc models.**  `last.pt` / `best_model.pt` hold no `model`
state dict; they hold `fc` (`weight [C, D]`, `bias [C]`), `feature_transform` (what to apply to the
backbone's pooled features before `fc`: `normalize`, `tukey`, `eps`) and `backbone_checkpoint` (the
phase I checkpoint whose frozen backbone produces those features).  Use :func:`feature_logits` (or
`fsa.generators.tailcalib.tukey_transform(pooled, tukey, eps=eps, normalize=normalize)` then
`F.linear`) to predict.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from datasets import DatasetBundle
from datasets.loader import BatchLoader
from engine.accel import NO_ACCEL, Accel
from engine.metrics import SCALAR_KEYS, classification_report
from engine.optim import build_optimizer
from engine.phase_i import selection_of
from engine.phase_iii_runs import phase_iii_command
from engine.recorder import RunRecorder, open_run, write_test_results
from fsa.feature_store import FeatureStore
from fsa.generators.tailcalib import TailCalibGenerator, tukey_transform
from models import LTModel
from utils import distributed
from utils.checkpoint import check_compatible, load_checkpoint
from utils.errors import UserError
from utils.run_dir import RunPaths, read_results
from utils.seeding import derived_seed, seed_everything

# generator name -> the only phase III mode it runs in
FEATURE_GENERATORS = {"tailcalib": "offline", "tailcalibx": "online"}
CHECKPOINT_KIND = "feature-classifier"
TUKEY_EPS = 1e-6  # fsa.generators.tailcalib's default; stored in every checkpoint

_STREAM_GENERATE, _STREAM_AUGMENT, _STREAM_SHUFFLE = 1, 2, 3


def check_generator_mode(generator: str, mode: str, config: str, note: str) -> None:
    """tailcalib is offline-only, tailcalibx online-only; the wrong script is a UserError naming the right one."""
    wanted = FEATURE_GENERATORS.get(generator)
    if wanted is None or wanted == mode:
        return

    other = next(g for g, m in FEATURE_GENERATORS.items() if m == mode)
    what = ("trains once on phase II's stored pooled features" if wanted == "offline"
            else "recomputes features of augmented images every epoch")
    raise UserError(
        f"finetune.generator={generator} {what}, so it runs in phase III {wanted} mode only: "
        f"{phase_iii_command(wanted, config, note, generator)}. "
        f"(The {mode} script's TailCalib variant is finetune.generator={other}.)"
    )


def _seed(seed: int, stream: int, epoch: int) -> int:
    return derived_seed(derived_seed(seed, stream), epoch)


def _transform_spec(tukey: float) -> dict:
    return {
        "input": "pooled features of the frozen phase I backbone: model.pool(model.features(x))",
        "normalize": True,
        "tukey": float(tukey),
        "eps": TUKEY_EPS,
        "apply": "z = tukey_transform(pooled, tukey, eps=eps, normalize=normalize); logits = fc(z)",
    }


def apply_feature_transform(pooled: torch.Tensor, transform: dict) -> torch.Tensor:
    """The transform a feature classifier's checkpoint expects on the backbone's pooled features."""
    return tukey_transform(pooled, transform["tukey"], eps=transform["eps"], normalize=transform["normalize"])


def feature_logits(payload: dict, pooled: torch.Tensor) -> torch.Tensor:
    """Logits of a tailcalib / tailcalibx checkpoint payload for pooled backbone features [N, D]."""
    z = apply_feature_transform(pooled, payload["feature_transform"])
    fc = payload["fc"]
    return F.linear(z, fc["weight"].to(z), fc["bias"].to(z))


def write_sources(paths: RunPaths, p2, mode: str) -> None:
    """`sources.yaml`: the phase I checkpoint and phase II outputs a phase III run was built from (rank 0)."""
    if distributed.context().is_main:
        (paths.checkpoint_dir / "sources.yaml").write_text(yaml.safe_dump({
            "phase_i_checkpoint": str(p2.checkpoint), "phase_ii_features": str(paths.features_dir), "mode": mode}))


@torch.inference_mode()
def pooled_features(model: LTModel, dataset, batch_size: int, device: torch.device, *, seed: int | None = None,
                    num_workers: int = 0, accel: Accel = NO_ACCEL) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features float32 [N, D] on `device`, labels [N]) of every item of `dataset`, in order.

    Batched forward passes of the (frozen, eval-mode) backbone; `dataset.augment` decides whether the
    images are augmented, and batch b of an in-memory dataset is augmented with the seed (seed, b).
    Under torchrun each rank computes the interleaved batches r, r+W, ... and every rank receives all
    rows, so the result does not depend on the number of processes."""
    batches, numbers = distributed.interleaved_batches(len(dataset), batch_size)
    seeds = [derived_seed(seed, b) for b in numbers] if seed is not None else None
    loader = BatchLoader(dataset, batches, device, num_workers=num_workers, batch_seeds=seeds)
    feats = [torch.zeros(0, model.feature_dim, device=device)]
    labels, indices = [torch.zeros(0, dtype=torch.long, device=device)], [torch.zeros(0, dtype=torch.long, device=device)]
    for x, y, idx in loader:
        with accel.autocast():
            feats.append(model.pool(model.features(accel.inputs(x))).float())
        labels.append(y)
        indices.append(idx)
    feats_t, labels_t, indices_t = (distributed.all_gather_rows(torch.cat(t)) for t in (feats, labels, indices))
    order = torch.argsort(indices_t)
    return feats_t[order], labels_t[order].to(device)


class _FeatureSource:
    """Training features of an epoch and the (fixed) test features, offline or online; the validation
    features (runs with a validation split) always come from a forward pass over its images."""

    def __init__(self, mode: str, model: LTModel, bundle: DatasetBundle, store: FeatureStore | None, device: torch.device,
                 batch_size: int, num_workers: int, accel: Accel = NO_ACCEL):
        self.mode, self.model, self.bundle, self.device = mode, model, bundle, device
        self.batch_size, self.num_workers, self.accel = batch_size, num_workers, accel
        if mode == "offline":
            assert store is not None
            labels = store.labels
            if len(labels) != len(bundle.train) or not torch.equal(labels, bundle.train.targets.cpu()) \
                    or not torch.equal(store.indices, torch.arange(len(labels))):
                raise UserError(f"The feature store {store.folder} does not hold the training set of this phase I run "
                                f"(labels / indices differ). Rerun phase II with --overwrite.")
            self._train = (store.pooled(0).to(device), labels.to(device))
            self.test = (store.test_pooled().to(device), store.test_labels().to(device))
            if self.test[0].shape[0] != len(bundle.test):
                raise UserError(f"The feature store {store.folder} holds {self.test[0].shape[0]} test features, the test "
                                f"set has {len(bundle.test)} images. Rerun phase II with --overwrite.")
        else:
            self.test = pooled_features(model, bundle.test.with_augment(False), batch_size, device, num_workers=num_workers,
                                        accel=accel)
        self.val = None if bundle.val is None else pooled_features(
            model, bundle.val.with_augment(False), batch_size, device, num_workers=num_workers, accel=accel)

    def train(self, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "offline":
            return self._train
        return pooled_features(self.model, self.bundle.train.with_augment(True), self.batch_size, self.device,
                               seed=_seed(seed, _STREAM_AUGMENT, epoch), num_workers=self.num_workers, accel=self.accel)


def _generate(feats: torch.Tensor, labels: torch.Tensor, tc: dict, seed: int, num_classes: int, device: torch.device):
    """Transformed real + generated features (float32 on `device`), labels, generated count per class."""
    gen = TailCalibGenerator(tukey=tc["tukey"], alpha=tc["alpha"], k=tc["k"], seed=seed, eps=TUKEY_EPS,
                             neighbours=tc["neighbours"])
    X, y, per_class = gen.fit(feats.cpu(), labels.cpu()).generate(shuffle=False)
    generated = [int(per_class.get(c, 0)) for c in range(num_classes)]
    return X.to(device=device, dtype=torch.float32), y.to(device), generated


def _evaluate(fc: nn.Linear, test_z: torch.Tensor, test_y: torch.Tensor, train_counts: list[int], hr: float) -> dict:
    with torch.no_grad():
        preds = fc(test_z).argmax(1)
    return classification_report(preds, test_y, train_counts, hr)


def _train_epoch(fc: nn.Linear, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, batch_size: int,
                 shuffle_seed: int) -> dict:
    order = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(shuffle_seed)).to(X.device)
    total_loss = torch.zeros((), device=X.device)
    correct = torch.zeros((), dtype=torch.long, device=X.device)
    fc.train()
    for start in range(0, X.shape[0], batch_size):
        idx = order[start:start + batch_size]
        xb, yb = X[idx], y[idx]
        logits = fc(xb)
        loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == yb).sum()
    n = max(X.shape[0], 1)
    return {"loss": float(total_loss) / n, "train_acc": float(correct) / n * 100, "steps": -(-X.shape[0] // batch_size)}


def _check_values(tc: dict) -> None:
    if tc["epochs"] < 1:
        raise UserError(f"tailcalib.epochs must be >= 1, got {tc['epochs']}.")
    if tc["batch_size"] < 1:
        raise UserError(f"tailcalib.batch_size must be >= 1, got {tc['batch_size']}.")
    if tc["alpha"] < 0:
        raise UserError(f"tailcalib.alpha must be >= 0 (it is added to every covariance entry), got {tc['alpha']}.")
    if tc["lr"] is not None and tc["lr"] <= 0:
        raise UserError(f"tailcalib.lr must be > 0 (or null for finetune.lr), got {tc['lr']}.")


def run_feature_generator(args: argparse.Namespace, mode: str, cfg: dict, paths: RunPaths, *, bundle: DatasetBundle,
                          model: LTModel, p2, store: FeatureStore | None, device: torch.device, hr: float,
                          command: str, accel: Accel = NO_ACCEL) -> dict:
    """Phase III for `finetune.generator` in FEATURE_GENERATORS (called by engine.phase_iii.run).

    `p2` is engine.phase_iii.PhaseIIOutputs; `store` phase II's FeatureStore (offline) or None.
    Under torchrun the ranks share the backbone forward passes (online) and then all hold the same
    features; generation and the linear classifier's training are repeated identically on every
    rank (deterministic, and small next to the forward passes), and rank 0 writes."""
    f, tc = cfg["finetune"], cfg["tailcalib"]
    name = f["generator"]
    check_generator_mode(name, mode, paths.config, paths.note)
    _check_values(tc)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    eval_batch = cfg["eval"]["batch_size"]

    if cfg["phase"] == "test":
        return _test(args, paths, model, bundle, store, device, hr, command, mode, eval_batch, f["num_workers"], accel)

    run_mode, logger = open_run(paths, cfg, resume=args.resume, overwrite=args.overwrite, command=command)
    if run_mode == "finished":
        return read_results(paths.results) or {}
    write_sources(paths, p2, mode)

    seed = cfg["seed"]
    lr = tc["lr"] if tc["lr"] is not None else f["lr"]
    num_classes, train_counts = bundle.num_classes, list(bundle.train_counts)
    transform = _transform_spec(tc["tukey"])

    seed_everything(seed)
    fc = nn.Linear(model.feature_dim, num_classes).to(device)
    if tc["init"] == "phase_i":
        fc.load_state_dict(model.fc.state_dict())
    optimizer = build_optimizer(fc.parameters(), {**f, "lr": lr})

    start, state = 0, None
    if run_mode == "resume":
        state = load_checkpoint(paths.last, produced_by=command)
        if state.get("kind") != CHECKPOINT_KIND:
            raise UserError(f"{paths.last} is not a {name} checkpoint. Start again with --overwrite: {command}")
        fc.load_state_dict(state["fc"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
        logger.info(f"resumed after epoch {start}")

    balanced_to = max(train_counts)
    expected = [balanced_to - n for n in train_counts]  # what the library adds per class (extra = 0)
    meta = {"phase": paths.phase, "kind": CHECKPOINT_KIND, "generator": name, "mode": mode,
            "arch": model.arch, "num_classes": num_classes, "in_channels": model.in_channels,
            "feature_dim": model.feature_dim, "dataset": bundle.name, "train_counts": train_counts,
            "backbone_checkpoint": str(p2.checkpoint), "feature_transform": transform, "config": cfg}
    progress = {"total_steps": (state or {}).get("total_steps", 0)}

    def payload(**extra) -> dict:
        return {**meta, "fc": {k: v.detach().cpu().clone() for k, v in fc.state_dict().items()}, **progress, **extra}

    recorder = RunRecorder(paths, logger, payload, step_name="epoch", total_steps=tc["epochs"],
                           select_on_val=bundle.val is not None, resumed_state=state)
    logger.info(f"{mode} {name}: frozen {model.arch} backbone, pooled features (D={model.feature_dim}) -> "
                f"L2-normalise -> Tukey lambda {tc['tukey']}; calibration k {tc['k']} ({tc['neighbours']} class means), "
                f"alpha {tc['alpha']}; every class filled to the head count {balanced_to} (generated per class "
                f"{expected}); {tc['init']} linear classifier, {f['optimizer']} lr {lr} momentum {f['momentum']} weight "
                f"decay {f['weight_decay']}, {tc['epochs']} epochs of batch {tc['batch_size']}; device {device}. "
                f"finetune.iterations/nt/na/eval_every/unfreeze do not apply to {name}.")

    started = time.perf_counter()
    source = _FeatureSource(mode, model, bundle, store, device, eval_batch, f["num_workers"], accel)
    test_raw, test_y = source.test
    with torch.no_grad():
        reference = classification_report(model.fc(test_raw).argmax(1), test_y, train_counts, hr)
    phase_i_ref = {k: reference[k] for k in SCALAR_KEYS}
    logger.info("phase I model on the same test features: " + " | ".join(
        f"{k} {'absent' if v is None else f'{v:.2f}'}" for k, v in phase_i_ref.items()))
    test_z = apply_feature_transform(test_raw, transform)
    val = None if source.val is None else (apply_feature_transform(source.val[0], transform), source.val[1])

    data = None
    setup_s = time.perf_counter() - started
    for epoch in range(start, tc["epochs"]):
        t0 = time.perf_counter()
        if data is None or mode == "online":
            feats, labels = source.train(seed, epoch)
            gen_seed = _seed(seed, _STREAM_GENERATE, 0 if mode == "offline" else epoch)
            X, y, generated = _generate(feats, labels, tc, gen_seed, num_classes, device)
            if generated != expected:  # the library balances to the head count of the same labels
                raise RuntimeError(f"TailCalib generated {generated} per class, expected {expected}")
            data = (X, y)
        t_gen = time.perf_counter() - t0
        stats = _train_epoch(fc, optimizer, *data, tc["batch_size"], _seed(seed, _STREAM_SHUFFLE, epoch))
        progress["total_steps"] += stats.pop("steps")
        report = _evaluate(fc, test_z, test_y, train_counts, hr)
        val_report = None if val is None else _evaluate(fc, *val, train_counts, hr)
        stats.update({"lr": lr, "generate_s": t_gen, "iteration": progress["total_steps"],
                      "train_features": int(data[0].shape[0])})
        recorder.record(epoch + 1, stats, report, optimizer, time.perf_counter() - t0 + setup_s, val_report=val_report)
        setup_s = 0.0

    steps_per_epoch = -(-balanced_to * num_classes // tc["batch_size"])
    selected_epoch = recorder.selection()["epoch"]  # None on the ranks that do not record
    return recorder.finish(
        mode=mode, generator=name, epochs=tc["epochs"], iterations=progress["total_steps"],
        selected_iteration=None if selected_epoch is None else selected_epoch * steps_per_epoch,
        train_samples=len(bundle.train), generated_per_class=expected, generated_total=sum(expected),
        balanced_to=balanced_to, classifier_init=tc["init"], neighbours=tc["neighbours"], lr=lr,
        feature_transform=transform, phase_i_reference=phase_i_ref, tail_classes=p2.tail, head_classes=p2.head,
        processes=distributed.context().world_size, phase_i_checkpoint=str(p2.checkpoint),
        phase_i_checkpoint_selection=selection_of(p2.checkpoint, paths.sibling("phase_i")), **bundle.split_sizes())


def _test(args, paths: RunPaths, model: LTModel, bundle: DatasetBundle, store, device, hr, command, mode, batch_size,
          num_workers, accel: Accel = NO_ACCEL) -> dict:
    """`phase: test`: evaluate a feature-classifier checkpoint (default: this run's best_model.pt)."""
    ckpt = Path(args.checkpoint) if getattr(args, "checkpoint", None) else paths.best
    payload = load_checkpoint(ckpt, produced_by=command)
    if payload.get("kind") != CHECKPOINT_KIND or "feature_transform" not in payload:
        raise UserError(f"{ckpt} is not a TailCalib feature-classifier checkpoint (no feature_transform); it cannot be "
                        f"evaluated by finetune.generator={paths.phase.split('-')[-1]}.")
    check_compatible(payload, ckpt, arch=model.arch, num_classes=model.num_classes, in_channels=model.in_channels)
    source = _FeatureSource(mode, model, bundle, store, device, batch_size, num_workers, accel)
    test_raw, test_y = source.test
    preds = feature_logits(payload, test_raw).argmax(1)
    return write_test_results(paths, ckpt, classification_report(preds, test_y, bundle.train_counts, hr))
