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

All four read phase II's store: the pooled features of the un-augmented training images (view 0)
and of the test images; the validation split's features come from a forward pass. (cRT and LWS
therefore train on un-augmented features: seconds instead of a pass over the images per epoch.)
Class-balanced batches: every row draws a class uniformly, then one of its training samples
uniformly; an epoch has as many rows as the training set; every draw is a function of (seed, epoch).

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
import time

import torch
from torch import nn

from datasets.loader import class_balanced_indices
from engine.artifacts import checkpoint_payload
from engine.loops import fit
from engine.methods import Method
from engine.optim import build_optimizer
from engine.phase_iii import PhaseIIIInputs
from engine.phase_iii_features import ClassifierTraining, FeatureSource, evaluate_features
from models import CosineClassifier, fresh_like
from utils.checkpoint import apply_weights
from utils.errors import UserError
from utils.run_dir import read_results
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


class BalancedTraining(ClassifierTraining):
    """lws / crt: class-balanced batches (drawn from stream `shuffle_stream`) instead of a permutation."""

    divergence_settings = "decoupled.lr and finetune.momentum"

    def batches(self, unit: int) -> list[torch.Tensor]:
        X, y = self.data
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.shuffle_stream, unit))
        picks = class_balanced_indices(y, len(self.train_counts), X.shape[0], generator).to(X.device)
        return list(picks.split(self.batch_size))


def run(inputs: PhaseIIIInputs, method: Method) -> dict:
    """Choose / train decoupled method `method`'s classifier (or, with ``phase: test``, evaluate a checkpoint)."""
    cfg, model, bundle, paths = inputs.cfg, inputs.model, inputs.bundle, inputs.paths
    d = cfg["decoupled"]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if method.id in ("tau_norm", "lws") and isinstance(model.fc, CosineClassifier):
        raise UserError(f"{method.label} rescales the rows of a linear classifier, but the {inputs.arm.backbone.label} "
                        f"backbone's classifier is a cosine one, whose rows are normalised in every forward pass "
                        f"({'tau-normalisation would change nothing' if method.id == 'tau_norm' else 'scales cannot be folded into it'}). "
                        f"Use la_posthoc or crt on this backbone.")
    if cfg["phase"] == "test":
        return inputs.test_model_checkpoint()
    run_mode, logger = inputs.open_run()
    if run_mode == "finished":
        return read_results(paths.results) or {}
    started = time.perf_counter()
    source = FeatureSource("offline", model, bundle, inputs.store, inputs.device, cfg["eval"]["batch_size"],
                           cfg["finetune"]["num_workers"], inputs.accel)
    train_counts = list(bundle.train_counts)
    if method.id in ("la_posthoc", "tau_norm"):
        return _choose_tau(inputs, method, source, logger, started)

    seed_everything(cfg["seed"])
    if method.id == "crt":
        classifier: nn.Module = fresh_like(model.fc)  # re-initialised, of the backbone's kind
        params = list(classifier.parameters())
    else:
        classifier = ScaledClassifier(model.fc)
        params = [classifier.scales]
    optimizer = build_optimizer(params, {**cfg["finetune"], "lr": d["lr"]})
    progress = {"total_steps": 0}

    def sync_fc() -> None:
        """The model's fc = the classifier being trained (folded), for the checkpoints."""
        if method.id == "crt":
            model.fc.load_state_dict(classifier.state_dict())
            return
        weight, bias = classifier.folded()
        model.fc.weight.data.copy_(weight.detach())
        model.fc.bias.data.copy_(bias.detach())

    def payload(**extra) -> dict:
        sync_fc()
        # lws also keeps its scales: a folded fc cannot be unfolded on --resume
        scales = {"scales": classifier.scales.detach().cpu().clone()} if method.id == "lws" else {}
        return checkpoint_payload(model, cfg, bundle, paths.phase, **{**progress, **scales, **extra})

    def restore(state: dict, path) -> None:
        apply_weights(model, state, path)
        if method.id == "crt":
            classifier.load_state_dict(model.fc.state_dict())
        else:
            classifier.scales.data.copy_(state["scales"].to(classifier.scales.device))
        progress["total_steps"] = state.get("total_steps", 0)

    start, recorder = inputs.start_recording(run_mode, logger, payload, restore=restore, optimizer=optimizer,
                                             step_name="epoch", total_steps=d["epochs"])
    logger.info(f"{method.label}: frozen {model.arch} backbone, pooled features of phase II's store, "
                f"{'re-initialised classifier' if method.id == 'crt' else 'phase I classifier with learned class scales'}, "
                f"class-balanced batches of {d['batch_size']}, {cfg['finetune']['optimizer']} lr {d['lr']}, "
                f"{d['epochs']} epochs; device {inputs.device}")
    task = BalancedTraining(classifier, source.train(cfg["seed"], 0), source.test, source.val,
                            train_counts=train_counts, hr=inputs.hr, seed=cfg["seed"], epochs=d["epochs"],
                            batch_size=d["batch_size"], lr=d["lr"], progress=progress, shuffle_stream="decoupled.sample")
    fit(task, optimizer, recorder, start=start, started=started)
    return recorder.finish(**inputs.records(), epochs=d["epochs"], iterations=progress["total_steps"],
                           batch_size=d["batch_size"], train_samples=len(bundle.train),
                           samples_seen=d["epochs"] * len(bundle.train))


def _choose_tau(inputs: PhaseIIIInputs, method: Method, source: FeatureSource, logger, started: float) -> dict:
    """la_posthoc / tau_norm: tau from the validation split (or the fixed decoupled.tau), one booking."""
    cfg, model, bundle, paths = inputs.cfg, inputs.model, inputs.bundle, inputs.paths
    d, train_counts = cfg["decoupled"], list(bundle.train_counts)
    fc = model.fc

    def classifier(tau: float) -> nn.Module:
        out = copy.deepcopy(fc)  # the phase I classifier, linear or cosine
        if method.id == "la_posthoc":
            out.bias.data.copy_(adjusted_bias(fc, train_counts, tau))
        else:
            out.weight.data.copy_(tau_normalized_weight(fc, tau))
            out.bias.data.zero_()
        return out

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
                                         lambda **extra: checkpoint_payload(model, cfg, bundle, paths.phase, tau=tau,
                                                                            **extra),
                                         restore=lambda state, path: None, optimizer=None, step_name="epoch",
                                         total_steps=1)
    logger.info(f"{method.label}: tau {tau} ({chosen}); validation mean class accuracy per tau: "
                + (", ".join(f"{t:g}: {s:.2f}" for t, s in scores.items()) or "-"))
    recorder.record(1, {"tau": float(tau)}, report, time.perf_counter() - started, val_report=val_report)
    return recorder.finish(**inputs.records(), tau=float(tau), tau_chosen_by=chosen,
                           tau_val_mean_class_acc={f"{t:g}": s for t, s in scores.items()}, epochs=0, iterations=0,
                           train_samples=len(bundle.train), samples_seen=0)
