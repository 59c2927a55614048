"""Phase III decoupled methods (kind ``decoupled`` of the method table): a re-balanced classifier on
the frozen phase I backbone (Kang et al., "Decoupling representation and classifier", ICLR 2020;
Menon et al., "Long-tail learning via logit adjustment", ICLR 2021).

la_posthoc  post-hoc logit adjustment: logits - tau * log(prior), i.e. the phase I classifier with
            its bias lowered by tau * log(n_c / N). No training.
tau_norm    tau-normalisation: rows W_c / ||W_c||^tau, no bias. No training.
lws         learnable weight scaling: logits s_c * (W_c z + b_c), only the C scales s are trained,
            on class-balanced batches.
crt         classifier re-training: the linear classifier re-initialised and trained on
            class-balanced batches.

All four read phase II's store for the pooled features of the test images; the validation split's
features come from a forward pass; la_posthoc / tau_norm choose tau on them and the stored pooled
features of the un-augmented training images.

lws / crt default to the classifier-balancing release (github.com/facebookresearch/classifier-balancing,
``config/ImageNet_LT/cls_crt.yaml`` / ``cls_lws.yaml``, ``run_networks.py``, ``data/ClassAwareSampler.py``):

- SGD lr ``decoupled.lr`` 0.2, momentum / weight decay from ``finetune`` (0.9 / 5e-4 as the release),
  batch ``decoupled.batch_size`` 512, ``decoupled.epochs`` null = the release's per method (crt 10,
  lws 5: the method's ``release_epochs``, engine/methods/decoupled.py).
- ``decoupled.schedule: cosine``: the release's ``CosineAnnealingLR(T_max=epochs, eta_min=0)``, stepped
  once at the start of every epoch before its batches, so epoch e (0-based) trains at
  ``0.5 * lr * (1 + cos(pi * (e + 1) / epochs))`` and the last epoch at 0 (:func:`epoch_lr`).
  ``constant``: lr throughout.
- ``decoupled.sampler: class_aware``: the release's ClassAwareSampler (``num_samples_cls: 4``): visits
  classes in cycles of random order, ``samples_per_class`` consecutive rows per visit, each class's own
  sample list reshuffled when exhausted (``datasets.loader.fresh_class_aware_indices``); an epoch is
  ``len(train) // batch_size`` full batches (the release's ``epoch_steps``; one batch of every
  training row when the set is smaller than a batch). ``independent``: every row a uniform class then a
  uniform sample of it, as many rows as the training set, the last batch short (the earlier variant).
  A fresh sampler every epoch, seeded by (seed, epoch): resume-safe (the release keeps its sampler's
  state across epochs; the difference is where a cycle starts).
- ``decoupled.features: augmented``: every epoch, the epoch's rows (a sample drawn twice: two images)
  are freshly augmented (the dataset's training augmentation) and pushed through the frozen backbone in
  eval mode, one forward pass per row as in the release, but all before the epoch's steps
  (``engine.phase_iii_features.pooled_features``, TailCalibX's pass) and in batches of
  ``eval.batch_size``: the same images and features as pushing each training batch through, since an
  eval-mode backbone treats every image alone. Phase II's stored augmented views are not used: with
  ``store.views`` V (0 by default) an epoch could only reuse V fixed views per image, where the release
  draws a new augmentation for every row. ``stored``: phase II's pooled features of the un-augmented
  images (the earlier variant: seconds, no backbone pass).
- Deviation kept: the release calls ``model.train()`` on every network, the frozen backbone included,
  so its BatchNorm layers normalise with batch statistics and re-estimate their running statistics on
  the class-balanced batches (the test-time backbone changes too); here the backbone stays in eval mode
  with phase I's statistics: a frozen representation, batch-independent features, one backbone for
  every phase III method.

tau (la_posthoc, tau_norm) is chosen on the validation split -- the grid value with the best mean
class accuracy, the first on ties -- when the run has one (``dataset.val``); without one nothing is
chosen and the fixed ``decoupled.tau`` is used (1.0: for la_posthoc the balanced-error Bayes rule
under the training prior, Menon et al.; for tau_norm the full normalisation). lws / crt select their
epoch like every run (best validation mean class accuracy, else the final epoch).

Every method writes a standard backbone + classifier checkpoint: the phase I model with its `fc`
replaced by the folded classifier (lws: s_c W_c, s_c b_c; tau_norm: bias 0), so ``phase: test``,
visualize and any later stage load it as they load a phase I model.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
from torch import nn

from datasets.loader import class_balanced_indices, fresh_class_aware_indices
from engine.artifacts import checkpoint_payload
from engine.loops import fit
from engine.methods.decoupled import DecoupledMethod, PostHocMethod, RetrainMethod
from engine.optim import build_optimizer
from engine.workload import epoch_rows
from engine.phase_iii import PhaseIIIInputs
from engine.phase_iii_features import ClassifierTraining, FeatureSource, evaluate_features, pooled_features
from models import CosineClassifier, fresh_like
from utils.checkpoint import apply_weights
from utils.errors import UserError
from utils.json_files import read_results
from utils.seeding import seed_everything, stream_seed


def log_prior(train_counts: list[int]) -> torch.Tensor:
    counts = torch.tensor(train_counts, dtype=torch.float64).clamp_min(1)
    return (counts / counts.sum()).log().float()


def adjusted_bias(fc: nn.Linear, train_counts: list[int], tau: float) -> torch.Tensor:
    """Post-hoc logit adjustment folded into the bias: b - tau * log(prior)."""
    return fc.bias.detach() - tau * log_prior(train_counts).to(fc.bias.device)


def tau_normalized_weight(fc: nn.Linear, tau: float) -> torch.Tensor:
    """tau-normalisation: each class row divided by its L2 norm to the power tau."""
    weight = fc.weight.detach()
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau)


def logit_adjusted(fc: nn.Module, train_counts: list[int], tau: float) -> nn.Module:
    """la_posthoc's classifier at `tau`: the phase I classifier (linear or cosine) with its bias lowered."""
    out = copy.deepcopy(fc)
    out.bias.data.copy_(adjusted_bias(fc, train_counts, tau))
    return out


def tau_normalized(fc: nn.Module, train_counts: list[int], tau: float) -> nn.Module:
    """tau_norm's classifier at `tau`: tau-normalised rows, no bias."""
    out = copy.deepcopy(fc)
    out.weight.data.copy_(tau_normalized_weight(fc, tau))
    out.bias.data.zero_()
    return out


class ScaledClassifier(nn.Module):
    """LWS: a frozen linear classifier whose logits are scaled per class by learned `scales` (init 1)."""

    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.weight = fc.weight.detach().clone()
        self.bias = fc.bias.detach().clone()
        self.scales = nn.Parameter(torch.ones(fc.out_features, device=fc.weight.device))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scales * torch.nn.functional.linear(z, self.weight, self.bias)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the equivalent linear classifier."""
        scales = self.scales.detach()
        return scales[:, None] * self.weight, scales * self.bias


def epoch_lr(d: dict, epoch: int, epochs: int) -> float:
    """The learning rate of (0-based) epoch `epoch` of `epochs` under ``decoupled.schedule``.

    cosine: the release builds ``CosineAnnealingLR(optimizer, num_epochs, eta_min=endlr)`` (endlr 0) and
    calls its ``step()`` at the start of each epoch 1..num_epochs, before the epoch's batches
    (run_networks.py ``init_optimizers`` / ``train``): epoch k (1-based) runs at the cosine's value
    after k steps, ``0.5 * lr * (1 + cos(pi * k / num_epochs))``; its last epoch at 0."""
    if d["schedule"] == "constant":
        return float(d["lr"])
    return 0.5 * float(d["lr"]) * (1 + math.cos(math.pi * (epoch + 1) / epochs))


class BalancedTraining(ClassifierTraining):
    """lws / crt: the epoch's class-balanced rows (``decoupled.sampler``, stream `shuffle_stream`) in
    batches of ``decoupled.batch_size`` at the epoch's ``decoupled.schedule`` learning rate.

    `data` is the fixed feature table the rows index (``decoupled.features: stored``), or None with
    `augmented(epoch, rows) -> (features, labels)` of those rows' freshly augmented images."""

    divergence_settings = "decoupled.lr / decoupled.schedule and finetune.momentum"

    def __init__(self, classifier: nn.Module, data: tuple[torch.Tensor, torch.Tensor] | None,
                 test: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None, *,
                 d: dict, labels: torch.Tensor, train_counts: list[int], hr: float, seed: int, epochs: int,
                 progress: dict, augmented: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 shuffle_stream: str = "decoupled.sample"):
        if (data is None) == (augmented is None):
            raise ValueError("BalancedTraining needs either stored features or an augmented-features function")
        super().__init__(classifier, data, test, val, train_counts=train_counts, hr=hr, seed=seed, epochs=epochs,
                         batch_size=d["batch_size"], lr=d["lr"], progress=progress, shuffle_stream=shuffle_stream)
        self.d, self.labels, self.augmented = d, labels.cpu(), augmented
        self.rows = epoch_rows(len(self.labels), d["batch_size"], d["sampler"])
        self.order = torch.empty(0, dtype=torch.long)
        self.features_s = 0.0

    def picks(self, unit: int) -> torch.Tensor:
        """The training indices of epoch `unit`, in batch order (a function of (seed, unit))."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.shuffle_stream, unit))
        if self.d["sampler"] == "class_aware":
            return fresh_class_aware_indices(self.labels, self.rows, self.d["samples_per_class"], generator)
        return class_balanced_indices(self.labels, len(self.train_counts), self.rows, generator)

    def begin(self, unit: int) -> None:
        t0 = time.perf_counter()
        picks = self.picks(unit)
        if self.augmented is not None:
            X, y = self.augmented(unit, picks)
            self.data = (X.clone(), y.clone())  # out of inference mode: the steps keep them for backward
            self.order = torch.arange(len(picks), device=X.device)
        else:
            self.order = picks.to(self.data[0].device)
        self.features_s = time.perf_counter() - t0
        super().begin(unit)

    def batches(self, unit: int) -> list[torch.Tensor]:
        return list(self.order.split(self.batch_size))

    def lr(self, unit: int, batch: int, batches: int) -> float:
        return epoch_lr(self.d, unit, self.total)

    def unit_stats(self, unit: int, seconds: float) -> dict:
        self.progress["total_steps"] += -(-len(self.order) // self.batch_size)
        return {"lr": epoch_lr(self.d, unit, self.total), "iteration": self.progress["total_steps"],
                "features_s": self.features_s}


class FreshHead:
    """crt's head: a re-initialised classifier of the backbone's kind; every parameter trains."""

    text = "re-initialised classifier"

    def __init__(self, fc: nn.Module):
        self.module = fresh_like(fc)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())

    def fold_into(self, fc: nn.Module) -> None:
        fc.load_state_dict(self.module.state_dict())

    def state(self) -> dict:
        return {}

    def restore(self, state: dict, fc: nn.Module) -> None:
        self.module.load_state_dict(fc.state_dict())


class ScaledHead:
    """lws's head: the phase I classifier with a learned scale per class; only the scales train."""

    text = "phase I classifier with learned class scales"

    def __init__(self, fc: nn.Module):
        self.module = ScaledClassifier(fc)

    def parameters(self) -> list[nn.Parameter]:
        return [self.module.scales]

    def fold_into(self, fc: nn.Module) -> None:
        weight, bias = self.module.folded()
        fc.weight.data.copy_(weight.detach())
        fc.bias.data.copy_(bias.detach())

    def state(self) -> dict:
        return {"scales": self.module.scales.detach().cpu().clone()}  # a folded fc cannot be unfolded on --resume

    def restore(self, state: dict, fc: nn.Module) -> None:
        self.module.scales.data.copy_(state["scales"].to(self.module.scales.device))


HEADS = {"fresh": FreshHead, "scaled": ScaledHead}  # engine.methods.decoupled.RetrainMethod.head


def _check_backbone(inputs: PhaseIIIInputs, method: DecoupledMethod) -> None:
    """Refuse a backbone whose classifier lacks what `method` needs (``method.needs``)."""
    fc, backbone = inputs.model.fc, inputs.arm.backbone.label
    if "linear_rows" in method.needs and isinstance(fc, CosineClassifier):
        raise UserError(f"{method.label} rescales the rows of a linear classifier, but the {backbone} backbone's "
                        f"classifier is a cosine one, whose rows are normalised in every forward pass (a row's norm "
                        f"or scale changes nothing there). Use la_posthoc or crt on this backbone.")
    if "bias" in method.needs and getattr(fc, "bias", None) is None:
        raise UserError(f"{method.label} folds its adjustment into the classifier's bias, but the {backbone} backbone's "
                        f"classifier has none (the LDAM-DRW release's NormedLinear, whose margins a bias could undo). "
                        f"Use crt on this backbone, or compare with the {backbone} row itself, which is already "
                        f"trained for the class prior.")


def _open(inputs: PhaseIIIInputs, method: DecoupledMethod) -> tuple | dict:
    """The frozen backbone checked; ``phase: test`` evaluated, a finished run's results read back (a dict);
    else ``(logger, feature source, start time)`` of a run to make."""
    cfg, model, paths = inputs.cfg, inputs.model, inputs.paths
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _check_backbone(inputs, method)
    if cfg["phase"] == "test":
        return inputs.test_model_checkpoint()
    run_mode, logger = inputs.open_run()
    if run_mode == "finished":
        return read_results(paths.results) or {}
    started = time.perf_counter()
    source = FeatureSource("offline", model, inputs.bundle, inputs.store, inputs.device, cfg["eval"]["batch_size"],
                           cfg["finetune"]["num_workers"], inputs.accel)
    return run_mode, logger, source, started


def run_retrain(inputs: PhaseIIIInputs, method: RetrainMethod) -> dict:
    """Train retrained method `method`'s head on class-balanced batches (or, with ``phase: test``, evaluate a
    checkpoint)."""
    opened = _open(inputs, method)
    if isinstance(opened, dict):
        return opened
    run_mode, logger, source, started = opened
    cfg, model, bundle, paths = inputs.cfg, inputs.model, inputs.bundle, inputs.paths
    d = cfg["decoupled"]
    epochs, seed = method.epochs(cfg), cfg["seed"]
    seed_everything(seed)
    head = HEADS[method.head](model.fc)  # drawn after seeding: a fresh head's weights are a function of the seed
    optimizer = build_optimizer(head.parameters(), {**cfg["finetune"], "lr": d["lr"]})
    progress = {"total_steps": 0}

    def payload(**extra) -> dict:
        head.fold_into(model.fc)  # the checkpoint's model is the phase I model with the trained head folded in
        return checkpoint_payload(model, cfg, bundle, paths.run_name, **{**progress, **head.state(), **extra})

    def restore(state: dict, path) -> None:
        apply_weights(model, state, path)
        head.restore(state, model.fc)
        progress["total_steps"] = state.get("total_steps", 0)

    start, recorder = inputs.start_recording(run_mode, logger, payload, restore=restore, optimizer=optimizer,
                                             step_name="epoch", total_steps=epochs)
    augmented = None
    if d["features"] == "augmented":
        train_set = bundle.train.with_augment(True)  # the dataset's training augmentation, as phase III online

        def augmented(epoch: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Pooled features of the epoch's rows, each its own augmented image (eval-mode backbone)."""
            return pooled_features(model, train_set.subset(rows), cfg["eval"]["batch_size"], inputs.device,
                                   # the epoch's augmentation: position 1 below its sampling seed
                                   seed=stream_seed(seed, "decoupled.sample", epoch, 1),
                                   num_workers=cfg["finetune"]["num_workers"], accel=inputs.accel)

    task = BalancedTraining(head.module, source.train(seed, 0) if augmented is None else None, source.test, source.val,
                            d=d, labels=bundle.train.targets, train_counts=list(bundle.train_counts), hr=inputs.hr,
                            seed=seed, epochs=epochs, progress=progress, augmented=augmented)
    f = cfg["finetune"]
    per_visit = f" ({d['samples_per_class']} rows per class visit)" if d["sampler"] == "class_aware" else ""
    logger.info(f"{method.label}: frozen {model.arch} backbone (eval mode), {head.text}; "
                f"{'pooled features of freshly augmented images every epoch' if augmented else 'stored pooled features of the un-augmented images'}; "
                f"{d['sampler']} batches of {d['batch_size']}{per_visit}, "
                f"{task.rows} rows an epoch; {f['optimizer']} lr {d['lr']} {d['schedule']}, momentum {f['momentum']}, "
                f"weight decay {f['weight_decay']}; {epochs} epochs; device {inputs.device}")
    if d["schedule"] == "cosine" and epochs == 1:
        logger.warning(f"{method.label}: one epoch of the release's cosine schedule runs at lr 0 (its scheduler "
                       f"steps before the epoch): the classifier does not train. Set decoupled.epochs > 1 or "
                       f"decoupled.schedule=constant.")
    fit(task, optimizer, recorder, start=start, started=started)
    return recorder.finish(**inputs.records(), epochs=epochs, iterations=progress["total_steps"],
                           batch_size=d["batch_size"], train_samples=len(bundle.train),
                           samples_seen=epochs * task.rows, lr=d["lr"], schedule=d["schedule"],
                           sampler=d["sampler"], features=d["features"])


def run_post_hoc(inputs: PhaseIIIInputs, method: PostHocMethod) -> dict:
    """Post-hoc method `method`: tau from the validation split (or the fixed decoupled.tau), one booking (or,
    with ``phase: test``, evaluate a checkpoint)."""
    opened = _open(inputs, method)
    if isinstance(opened, dict):
        return opened
    _, logger, source, started = opened
    cfg, model, bundle, paths = inputs.cfg, inputs.model, inputs.bundle, inputs.paths
    d, train_counts = cfg["decoupled"], list(bundle.train_counts)
    fc = model.fc
    def classifier(tau: float) -> nn.Module:
        return method.adjusted(fc, train_counts, tau)

    if source.val is not None:
        scores = {tau: evaluate_features(classifier(tau), *source.val, train_counts, inputs.hr)["mean_class_acc"]
                  for tau in d["tau_grid"]}
        tau = max(scores, key=lambda t: scores[t])  # first of the best: the grid's order breaks ties
        chosen = "validation"
    else:
        scores, tau, chosen = {}, d["tau"], "fixed (no validation split)"
    chosen_fc = classifier(tau)
    model.fc.load_state_dict(chosen_fc.state_dict())
    report = evaluate_features(chosen_fc, *source.test, train_counts, inputs.hr)
    val_report = None if source.val is None else evaluate_features(chosen_fc, *source.val, train_counts, inputs.hr)
    _, recorder = inputs.start_recording("new", logger,
                                         lambda **extra: checkpoint_payload(model, cfg, bundle, paths.run_name, tau=tau,
                                                                            **extra),
                                         restore=lambda state, path: None, optimizer=None, step_name="epoch",
                                         total_steps=1)
    logger.info(f"{method.label}: tau {tau} ({chosen}); validation mean class accuracy per tau: "
                + (", ".join(f"{t:g}: {s:.2f}" for t, s in scores.items()) or "-"))
    recorder.record(1, {"tau": float(tau)}, report, time.perf_counter() - started, val_report=val_report)
    return recorder.finish(**inputs.records(), tau=float(tau), tau_chosen_by=chosen,
                           tau_val_mean_class_acc={f"{t:g}": s for t, s in scores.items()}, epochs=0, iterations=0,
                           train_samples=len(bundle.train), samples_seen=0)
