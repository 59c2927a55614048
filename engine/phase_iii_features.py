"""Phase III feature methods (kind ``features`` of the method table): TailCalib (offline) and
TailCalibX (online).

docs/METHOD.md section 3.  Unlike `fsa` / `none`, which fine-tune the phase I model on CAM-layer feature
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
`engine.metrics.classification_report` (top1, many/medium/few, head/tail with phase II's split, i.e. phase I's eval.hr),
so their rows compare with every other phase III run.

Choices (where the release or docs/METHOD.md leave room):
- classifier: a copy of the phase I classifier (`tailcalib.init: phase_i`, the default), as the
  release, which loads the CosineCE / CBD run's CosineDotProduct classifier (`pretrain: True`,
  experiments 1.2 / 2.2 / 2.4 of `libs/utils/experiments_maker.py`) and fine-tunes it; a cosine
  classifier is scale invariant, so the copy means the same on L2-normalised features.  On a CE
  backbone (an arm of this project, not of the release) the linear fc was trained on raw pooled
  features and now sees unit-norm (Tukey-transformed) ones: it is a start, not a good classifier.
  `tailcalib.init: fresh` (this project's earlier default) builds a new classifier of the backbone's
  kind seeded by `seed`: `nn.Linear` on CE, the cosine classifier (same scale) on CosineCE / CBD.
- as the release's training code: the calibrated covariance gets `tailcalib.ridge` (1e-4) on its
  diagonal, and real + generated rows (and test rows) are L2-normalised again after Tukey's
  transform (`tailcalib.renormalize: true`); both are options, false / 0 giving the earlier variant.
- calibration neighbours: the `k` class means nearest to a real sample among **all** classes
  (`tailcalib.neighbours: all`, the default), as the authors' release does (its own class mean is
  usually one of them); `others` excludes the sample's own class (the library's default).  On the
  smoke and Fashion-MNIST-LT stores `all` gave +2..5 top1 and steadier epochs: with `others` and
  few classes, 3 of the 4 averaged vectors of a calibrated mean belong to other classes.
- optimiser: `finetune.optimizer/nesterov/weight_decay`, momentum `tailcalib.momentum`, constant lr
  `tailcalib.lr` (null = `finetune.lr`); the release uses SGD lr 0.01, weight decay 5e-4, no
  schedule, and momentum 0.7 at imbalance 100 (0.0 at 50, 0.9 at 10: `run_all_CIFAR100-LT.sh` --cv3).
- seeds: generation, augmentation and shuffling of epoch `e` derive from `(seed, e)`, so a run
  resumed from `last.pt` (epoch granularity) replays exactly what a straight run does.
- `best_model.pt` is the selected epoch (as every run here): the best validation mean class accuracy
  with a validation split, else the final epoch; `results.json`'s top-level metrics are the test
  numbers of that epoch.  `history` starts at epoch 1; the phase I classifier on the same test
  features is in `phase_i_reference`.  Also recorded: `generated_per_class` (list by class), `generated_total`,
  `balanced_to` (the head count), `iterations` (SGD steps), `selected_iteration`, `lr`,
  `classifier_init`, `neighbours`, `feature_transform`.  Per epoch, `generate_s` is the time to
  (online: extract features and) generate.

**Checkpoints are not drop-in backbone + fc models.**  `last.pt` / `best_model.pt` hold no `model`
state dict; they hold `fc` (`weight [C, D]`, `bias [C]`), `feature_transform` (what to apply to the
backbone's pooled features before `fc`: `normalize`, `tukey`, `eps`) and `backbone_checkpoint` (the
phase I checkpoint whose frozen backbone produces those features).  Use :func:`feature_logits` (or
`fsa.generators.tailcalib_api.tukey_transform(pooled, tukey, eps=eps, normalize=normalize)` then
`F.linear`) to predict.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from datasets import DatasetBundle
from engine.accel import NO_ACCEL, Accel
from engine.artifacts import FEATURE_CLASSIFIER_KIND, read_feature_classifier_checkpoint
from engine.metrics import SCALAR_KEYS, classification_report
from engine.loops import StepResult, TrainingTask, fit, ordered_map
from engine.methods.features import TailCalibMethod
from engine.optim import build_optimizer
from engine.phase_iii import PhaseIIIInputs
from engine.recorder import write_test_results
from fsa.feature_store import FeatureStore
from fsa.generators.tailcalib_api import TailCalibGenerator, tukey_transform
from models import CosineClassifier, LTModel, build_classifier, fresh_like
from utils.checkpoint import check_compatible
from utils.errors import UserError
from utils.json_files import read_results
from utils.seeding import seed_everything, stream_seed

TUKEY_EPS = 1e-6  # fsa.generators.tailcalib_api's default; stored in every checkpoint


def _transform_spec(tc: dict) -> dict:
    return {
        "input": "pooled features of the frozen phase I backbone: model.pool(model.features(x))",
        "normalize": True,
        "tukey": float(tc["tukey"]),
        "eps": TUKEY_EPS,
        "renormalize": bool(tc["renormalize"]),
        "apply": "z = tukey_transform(pooled, tukey, eps=eps, normalize=normalize, renormalize=renormalize); "
                 "logits = fc(z)",
    }


def apply_feature_transform(pooled: torch.Tensor, transform: dict) -> torch.Tensor:
    """The transform a feature classifier's checkpoint expects on the backbone's pooled features."""
    return tukey_transform(pooled, transform["tukey"], eps=transform["eps"], normalize=transform["normalize"],
                           renormalize=transform.get("renormalize", False))


def classifier_spec(fc: nn.Module) -> dict:
    """What rebuilds a feature classifier: its kind (``linear`` | ``cosine`` | ``normed``) and, for the cosine
    forms, its scale."""
    if isinstance(fc, CosineClassifier):
        return {"kind": fc.kind, "scale": fc.scale_value(), "learn_scale": isinstance(fc.raw_scale, nn.Parameter)}
    return {"kind": "linear"}


def feature_logits(payload: dict, pooled: torch.Tensor) -> torch.Tensor:
    """Logits of a tailcalib / tailcalibx checkpoint payload for pooled backbone features [N, D]."""
    z = apply_feature_transform(pooled, payload["feature_transform"])
    spec = dict(payload.get("classifier", {"kind": "linear"}))
    weight = payload["fc"]["weight"]
    fc = build_classifier(spec.pop("kind"), weight.shape[1], weight.shape[0], **spec)
    fc.load_state_dict(payload["fc"])
    return fc.to(z)(z)


@torch.inference_mode()
def pooled_features(model: LTModel, dataset, batch_size: int, device: torch.device, *, seed: int | None = None,
                    num_workers: int = 0, accel: Accel = NO_ACCEL) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features float32 [N, D] on `device`, labels [N]) of every item of `dataset`, in order.

    Batched forward passes of the (frozen, eval-mode) backbone; `dataset.augment` decides whether the
    images are augmented, batch b augmented with the seed ``stream_seed(seed, b)``. Under torchrun the
    ranks share the batches and every rank receives all rows (:func:`engine.loops.ordered_map`), so
    the result does not depend on the number of processes."""
    def pooled(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> dict:
        with accel.autocast():
            return {"pooled": model.pool(model.features(accel.inputs(x))).float(), "label": y, "index": idx}

    rows = ordered_map(pooled, dataset, batch_size, device, seed=seed, num_workers=num_workers, desc="pooled features")
    return rows["pooled"], rows["label"].to(device)


class FeatureSource:
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
                               seed=stream_seed(seed, "tailcalib.augment", epoch), num_workers=self.num_workers, accel=self.accel)


def _generate(feats: torch.Tensor, labels: torch.Tensor, tc: dict, seed: int, num_classes: int, device: torch.device):
    """Transformed real + generated features (float32 on `device`), labels, generated count per class."""
    gen = TailCalibGenerator(tukey=tc["tukey"], alpha=tc["alpha"], k=tc["k"], seed=seed, eps=TUKEY_EPS,
                             neighbours=tc["neighbours"], ridge=tc["ridge"], renormalize=tc["renormalize"])
    X, y, per_class = gen.fit(feats.cpu(), labels.cpu()).generate(shuffle=False)
    generated = [int(per_class.get(c, 0)) for c in range(num_classes)]
    return X.to(device=device, dtype=torch.float32), y.to(device), generated


def evaluate_features(classifier: nn.Module, z: torch.Tensor, y: torch.Tensor, train_counts: list[int], hr: float) -> dict:
    """The classification report of `classifier` on feature rows `z` with labels `y`."""
    with torch.no_grad():
        preds = classifier(z).argmax(1)
    return classification_report(preds, y, train_counts, hr)


def _check_values(tc: dict) -> None:
    if tc["epochs"] < 1:
        raise UserError(f"tailcalib.epochs must be >= 1, got {tc['epochs']}.")
    if tc["batch_size"] < 1:
        raise UserError(f"tailcalib.batch_size must be >= 1, got {tc['batch_size']}.")
    if tc["alpha"] < 0:
        raise UserError(f"tailcalib.alpha must be >= 0 (it is added to every covariance entry), got {tc['alpha']}.")
    if tc["lr"] is not None and tc["lr"] <= 0:
        raise UserError(f"tailcalib.lr must be > 0 (or null for finetune.lr), got {tc['lr']}.")


def run(inputs: PhaseIIIInputs, method: TailCalibMethod) -> dict:
    """Train (or, with ``phase: test``, evaluate) feature method `method` on `inputs`.

    Under torchrun the ranks share the backbone forward passes (online) and then all hold the same
    features; generation and the linear classifier's training are repeated identically on every
    rank (deterministic, and small next to the forward passes), and rank 0 writes."""
    cfg, model, bundle, paths = inputs.cfg, inputs.model, inputs.bundle, inputs.paths
    f, tc = cfg["finetune"], cfg["tailcalib"]
    _check_values(tc)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    eval_batch = cfg["eval"]["batch_size"]

    if cfg["phase"] == "test":
        return _test(inputs, eval_batch, f["num_workers"])

    run_mode, logger = inputs.open_run()
    if run_mode == "finished":
        return read_results(paths.results) or {}

    seed = cfg["seed"]
    lr = tc["lr"] if tc["lr"] is not None else f["lr"]
    num_classes, train_counts = bundle.num_classes, list(bundle.train_counts)
    transform = _transform_spec(tc)

    seed_everything(seed)
    # the backbone's kind of classifier: linear on CE, cosine on CosineCE / CBD (the release's CosineDotProduct)
    fc = fresh_like(model.fc)
    if tc["init"] == "phase_i":
        fc.load_state_dict(model.fc.state_dict())
    optimizer = build_optimizer(fc.parameters(), {**f, "lr": lr, "momentum": tc["momentum"]})

    balanced_to = max(train_counts)
    expected = [balanced_to - n for n in train_counts]  # what the library adds per class (extra = 0)
    meta = {"phase": paths.run_name, "kind": FEATURE_CLASSIFIER_KIND, "generator": method.generator, "mode": method.mode,
            "arch": model.arch, "num_classes": num_classes, "in_channels": model.in_channels,
            "feature_dim": model.feature_dim, "dataset": bundle.name, "train_counts": train_counts,
            "backbone_checkpoint": str(inputs.p2.checkpoint), "feature_transform": transform,
            "classifier": classifier_spec(fc), "config": cfg}
    progress = {"total_steps": 0}

    def payload(**extra) -> dict:
        return {**meta, "fc": {k: v.detach().cpu().clone() for k, v in fc.state_dict().items()}, **progress, **extra}

    def restore(state: dict, path) -> None:
        if state.get("kind") != FEATURE_CLASSIFIER_KIND:
            raise UserError(f"{path} is not a {method.generator} checkpoint. Start again with --overwrite: "
                            f"{inputs.command} --overwrite")
        fc.load_state_dict(state["fc"])
        progress["total_steps"] = state.get("total_steps", 0)

    start, recorder = inputs.start_recording(run_mode, logger, payload, restore=restore, optimizer=optimizer,
                                             step_name="epoch", total_steps=tc["epochs"])
    logger.info(f"{method.mode} {method.generator}: frozen {model.arch} backbone, pooled features (D={model.feature_dim}) "
                f"-> L2-normalise -> Tukey lambda {tc['tukey']}; calibration k {tc['k']} ({tc['neighbours']} class means), "
                f"alpha {tc['alpha']}, covariance ridge {tc['ridge']}, re-normalised {tc['renormalize']}; every class filled to the head count {balanced_to} (generated per class "
                f"{expected}); {tc['init']} {classifier_spec(fc)['kind']} classifier, {f['optimizer']} lr {lr} momentum {tc['momentum']} weight "
                f"decay {f['weight_decay']}, {tc['epochs']} epochs of batch {tc['batch_size']}; device {inputs.device}. "
                f"finetune.iterations/nt/na/eval_every/unfreeze do not apply to {method.generator}.")

    started = time.perf_counter()
    source = FeatureSource(method.mode, model, bundle, inputs.store, inputs.device, eval_batch, f["num_workers"],
                            inputs.accel)
    test_raw, test_y = source.test
    with torch.no_grad():
        reference = classification_report(model.fc(test_raw).argmax(1), test_y, train_counts, inputs.hr)
    phase_i_ref = {k: reference[k] for k in SCALAR_KEYS}
    logger.info("phase I model on the same test features: " + " | ".join(
        f"{k} {'absent' if v is None else f'{v:.2f}'}" for k, v in phase_i_ref.items()))
    task = FeatureTraining(inputs, source, fc, transform, expected, lr, progress)
    fit(task, optimizer, recorder, start=start, started=started)

    steps_per_epoch = -(-balanced_to * num_classes // tc["batch_size"])
    selected_epoch = recorder.selection()["epoch"]  # None on the ranks that do not record
    return recorder.finish(
        **inputs.records(), epochs=tc["epochs"], iterations=progress["total_steps"],
        selected_iteration=None if selected_epoch is None else selected_epoch * steps_per_epoch,
        train_samples=len(bundle.train), samples_seen=tc["epochs"] * balanced_to * num_classes,
        generated_per_class=expected, generated_total=sum(expected),
        balanced_to=balanced_to, classifier_init=tc["init"], neighbours=tc["neighbours"], lr=lr, momentum=tc["momentum"],
        feature_transform=transform, phase_i_reference=phase_i_ref)


class ClassifierTraining(TrainingTask):
    """A classifier on rows of features (`classifier(z) -> logits`), trained by epochs of minibatches
    with cross-entropy and evaluated on fixed test (and validation) features: the loop side that every
    feature-level method shares. `batches` is a seeded permutation (stream `shuffle_stream`); a
    method overrides it to sample otherwise (class-balanced, engine.phase_iii_decoupled)."""

    step_name = "epoch"

    def __init__(self, classifier: nn.Module, data: tuple[torch.Tensor, torch.Tensor] | None,
                 test: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None, *,
                 train_counts: list[int], hr: float, seed: int, epochs: int, batch_size: int, lr: float,
                 progress: dict, shuffle_stream: str):
        self.classifier, self.data, self.test, self.val = classifier, data, test, val
        self.train_counts, self.hr, self.seed, self.total = train_counts, hr, seed, epochs
        self.batch_size, self.lr_value, self.progress, self.shuffle_stream = batch_size, lr, progress, shuffle_stream

    def begin(self, unit: int) -> None:
        self.classifier.train()

    def batches(self, unit: int) -> list[torch.Tensor]:
        X = self.data[0]
        shuffle = torch.Generator().manual_seed(stream_seed(self.seed, self.shuffle_stream, unit))
        return list(torch.randperm(X.shape[0], generator=shuffle).to(X.device).split(self.batch_size))

    def step(self, batch: torch.Tensor) -> StepResult:
        X, y = self.data
        xb, yb = X[batch], y[batch]
        logits = self.classifier(xb)
        return StepResult(F.cross_entropy(logits, yb), len(batch), logits, yb)

    def unit_stats(self, unit: int, seconds: float) -> dict:
        self.progress["total_steps"] += -(-self.data[0].shape[0] // self.batch_size)
        return {"lr": self.lr_value, "iteration": self.progress["total_steps"]}

    def evaluate(self) -> tuple[dict, dict | None]:
        report = evaluate_features(self.classifier, *self.test, self.train_counts, self.hr)
        return report, None if self.val is None else evaluate_features(self.classifier, *self.val, self.train_counts,
                                                                        self.hr)


class FeatureTraining(ClassifierTraining):
    """TailCalib's side of the loop: per epoch (re)generate (offline: once), then seeded shuffled
    minibatches of real + generated transformed features through the linear classifier."""

    divergence_settings = "tailcalib.lr (null: finetune.lr), tailcalib.momentum and tailcalib.alpha / tukey"

    def __init__(self, inputs: PhaseIIIInputs, source: FeatureSource, fc: nn.Linear, transform: dict,
                 expected: list[int], lr: float, progress: dict):
        tc = inputs.cfg["tailcalib"]
        val = None if source.val is None else (apply_feature_transform(source.val[0], transform), source.val[1])
        super().__init__(fc, None, (apply_feature_transform(source.test[0], transform), source.test[1]), val,
                         train_counts=list(inputs.bundle.train_counts), hr=inputs.hr, seed=inputs.cfg["seed"],
                         epochs=tc["epochs"], batch_size=tc["batch_size"], lr=lr, progress=progress,
                         shuffle_stream="tailcalib.shuffle")
        self.inputs, self.source, self.tc, self.expected = inputs, source, tc, expected
        self.generate_s = 0.0

    def begin(self, unit: int) -> None:
        t0 = time.perf_counter()
        if self.data is None or self.inputs.method.mode == "online":
            feats, labels = self.source.train(self.seed, unit)
            gen_seed = stream_seed(self.seed, "tailcalib.generate", 0 if self.inputs.method.mode == "offline" else unit)
            X, y, generated = _generate(feats, labels, self.tc, gen_seed, self.inputs.bundle.num_classes,
                                        self.inputs.device)
            if generated != self.expected:  # the library balances to the head count of the same labels
                raise RuntimeError(f"TailCalib generated {generated} per class, expected {self.expected}")
            self.data = (X, y)
        self.generate_s = time.perf_counter() - t0
        super().begin(unit)

    def unit_stats(self, unit: int, seconds: float) -> dict:
        stats = super().unit_stats(unit, seconds)
        return {"lr": stats["lr"], "generate_s": self.generate_s, "iteration": stats["iteration"],
                "train_features": int(self.data[0].shape[0])}


def _test(inputs: PhaseIIIInputs, batch_size: int, num_workers: int) -> dict:
    """`phase: test`: evaluate a feature-classifier checkpoint (default: this run's best_model.pt)."""
    paths, model = inputs.paths, inputs.model
    ckpt = inputs.test_checkpoint
    payload = read_feature_classifier_checkpoint(ckpt, inputs.command, inputs.method.generator)
    check_compatible(payload, ckpt, arch=model.arch, num_classes=model.num_classes, in_channels=model.in_channels)
    source = FeatureSource(inputs.method.mode, model, inputs.bundle, inputs.store, inputs.device, batch_size,
                            num_workers, inputs.accel)
    test_raw, test_y = source.test
    preds = feature_logits(payload, test_raw).argmax(1)
    return write_test_results(paths, ckpt, classification_report(preds, test_y, inputs.bundle.train_counts, inputs.hr))
