"""What each pipeline step is expected to cost, printed before the chain starts and before each step.

A step's cost is counted in images through the backbone (:class:`Work`): ``trained`` images go
forward and backward, ``forwarded`` ones forward only (evaluation, feature extraction, online maps).
Classifier-only training on cached features and report bookkeeping are counted as free: on every
recipe measured they take seconds. A short probe (:func:`probe_rates`) times a few real batches of the
phase I model on the run's device, with the run's accel settings and the training set's own loading
and augmentation, so that seconds = trained x (s per trained image) + forwarded x (s per forwarded
image). Once a step has run in the pipeline, the same step of a later note is expected to take what
it took (``engine.pipeline.StepCosts``).

The estimate is an order of magnitude for planning (measured on the main job: docs/RESULTS.md), not a
promise: evaluation of small sets, checkpoint writes and the Python between batches are not counted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fsa.batch_composition import auto_iterations, batch_size

PROBE_BATCHES = 2  # timed batches per kind, after one warm-up batch


@dataclass(frozen=True)
class Sizes:
    """Images per split of the chain's data (``val`` 0 without a validation split)."""

    train: int
    val: int
    test: int

    @classmethod
    def of(cls, bundle) -> "Sizes":
        return cls(len(bundle.train), 0 if bundle.val is None else len(bundle.val), len(bundle.test))

    @property
    def evaluated(self) -> int:
        """Images of one evaluation (validation split and test set)."""
        return self.val + self.test


@dataclass(frozen=True)
class Work:
    """Images through the backbone: ``trained`` forward + backward, ``forwarded`` forward only."""

    trained: int = 0
    forwarded: int = 0
    what: str = ""

    def seconds(self, rates: "Rates") -> float:
        return self.trained * rates.trained + self.forwarded * rates.forwarded


@dataclass(frozen=True)
class Rates:
    """Seconds per image through the backbone on this device (one process's share under torchrun)."""

    trained: float
    forwarded: float
    probe_s: float = 0.0


def _evaluations(units: int, every: int) -> int:
    """Evaluations of a loop of ``units`` evaluated every ``every`` units and at its end (engine.loops.fit)."""
    return units // every + (units % every != 0)


def phase_i_work(cfg: dict, sizes: Sizes) -> Work:
    t = cfg["train"]
    epochs = t["epochs"]
    teachers = cfg["distill"]["teachers"] if cfg["distill"]["enabled"] else 0
    forwarded = _evaluations(epochs, t["eval_every"]) * sizes.evaluated + teachers * epochs * sizes.train
    what = f"{epochs} epochs x {sizes.train:,} images" + (f", {teachers} teachers' forward passes" if teachers else "")
    return Work(trained=epochs * sizes.train, forwarded=forwarded, what=what)


def phase_ii_work(cfg: dict, sizes: Sizes) -> Work:
    views = 1 + cfg["store"]["views"] if cfg["store"]["enabled"] else 1
    trained = sizes.train if cfg["gradcam"]["method"] == "autograd" else 0  # Grad-CAM's backward pass
    forwarded = views * sizes.train + (sizes.test if cfg["store"]["enabled"] else 0)
    return Work(trained=trained, forwarded=forwarded, what=f"Grad-CAM over {sizes.train:,} images, {views} view(s)")


def phase_iii_work(method, cfg: dict, sizes: Sizes) -> Work:
    """A phase III method's work (``method``: an :class:`engine.methods.Method`) under its config."""
    f = cfg["finetune"]
    if method.kind == "maps":
        iterations = f["iterations"] or auto_iterations(sizes.train, f["nt"], f["na"])
        what = f"{iterations:,} iterations of {batch_size(f['nt'], f['na'])} rows"
        if method.mode == "offline":  # maps from phase II's store; evaluations on cached pooled features
            return Work(forwarded=sizes.evaluated, what=what + " from the store")
        images = iterations * batch_size(f["nt"], f["na"])
        if f["unfreeze"]:  # the last stage trains: every evaluation runs the backbone again
            return Work(trained=images, forwarded=_evaluations(iterations, f["eval_every"]) * sizes.evaluated, what=what)
        return Work(forwarded=images + sizes.evaluated, what=what + " of online maps")
    if method.kind == "features":
        epochs = cfg["tailcalib"]["epochs"]
        if method.mode == "offline":
            return Work(forwarded=sizes.val, what=f"{epochs} epochs on stored features")
        return Work(forwarded=epochs * sizes.train + sizes.evaluated, what=f"{epochs} epochs of online features")
    return _decoupled_work(method, cfg["decoupled"], sizes)


def _decoupled_work(method, d: dict, sizes: Sizes) -> Work:
    """Decoupled methods read phase II's pooled store and forward the validation images; the trained ones
    (cRT, LWS; ``decoupled.features: augmented``) forward every epoch's rows as fresh augmented images."""
    from engine.phase_iii_decoupled import RELEASE_EPOCHS, decoupled_epochs, epoch_rows

    if method.id not in RELEASE_EPOCHS:  # chosen on stored features, nothing trained
        return Work(forwarded=sizes.val, what="chosen on stored features")
    epochs = decoupled_epochs(d, method.id)
    if d["features"] != "augmented":
        return Work(forwarded=sizes.val, what=f"{epochs} epochs on stored features")
    rows = epoch_rows(sizes.train, d["batch_size"], d["sampler"])
    return Work(forwarded=epochs * rows + sizes.val, what=f"{epochs} epochs of {rows:,} augmented rows")


def step_work(step, cfg: dict | None, sizes: Sizes) -> Work:
    """The work of a pipeline step (:class:`engine.pipeline.Step`) under the config it runs with
    (visualize: None, a few images)."""
    if step.kind == "phase_i":
        return phase_i_work(cfg, sizes)
    if step.kind == "phase_ii":
        return phase_ii_work(cfg, sizes)
    if step.kind == "phase_iii":
        return phase_iii_work(step.method, cfg, sizes)
    return Work(what="a few images")


def probe_rates(phase_i_cfg: dict, bundle, device: torch.device, world_size: int = 1) -> Rates:
    """Time :data:`PROBE_BATCHES` training batches (loading + augmentation, forward, backward, SGD step)
    and as many evaluation batches of the phase I model, after a warm-up batch of each. The model is
    fresh and thrown away; nothing is written."""
    from datasets.loader import BatchLoader
    from engine.accel import Accel
    from engine.artifacts import build_phase_i_model

    started = time.perf_counter()
    accel = Accel.from_config(phase_i_cfg["accel"], device)
    model = accel.prepare_model(build_phase_i_model(phase_i_cfg, bundle, device))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def timed(dataset, batch: int, step) -> float:
        batch = max(1, min(batch, len(dataset)))
        order = torch.randperm(len(dataset), generator=generator).tolist()
        batches = [[order[(i * batch + j) % len(order)] for j in range(batch)] for i in range(PROBE_BATCHES + 1)]
        seconds, images = 0.0, 0
        for k, (x, y, _) in enumerate(BatchLoader(dataset, batches, device, generator=generator)):
            t0 = time.perf_counter()
            step(accel.inputs(x), y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if k:  # the first batch warms up (allocations, cuDNN's algorithm search)
                seconds, images = seconds + time.perf_counter() - t0, images + len(y)
        return seconds / max(images, 1)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with accel.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward_step(x: torch.Tensor, _y: torch.Tensor) -> None:
        with torch.no_grad(), accel.autocast():
            model(x)

    model.train()
    trained = timed(bundle.train, phase_i_cfg["train"]["batch_size"], train_step)
    model.eval()
    forwarded = timed(bundle.train.with_augment(False), phase_i_cfg["eval"]["batch_size"], forward_step)
    return Rates(trained / world_size, forwarded / world_size, time.perf_counter() - started)


def approx_seconds(seconds: float) -> str:
    """``<1 s``, ``~42 s``, ``~3.5 min``, ``~2.1 h``."""
    if seconds < 1:
        return "<1 s"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.1f} min"
    return f"~{seconds / 3600:.1f} h"
