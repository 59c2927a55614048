"""What each pipeline step is expected to cost, printed before the chain starts and before each step.

A step's cost is counted in images through the backbone (:class:`Work`): ``trained`` images go
forward and backward, ``forwarded`` ones forward only (evaluation, feature extraction, online maps).
Classifier-only training on cached features and report bookkeeping are counted as free: on every
recipe measured they take seconds. A short probe (:func:`probe_rates`) times a few real batches of the
phase I model on the run's device, with the run's accel settings and the training set's own loading
and augmentation, so that seconds = trained x (s per trained image) + forwarded x (s per forwarded
image). Once a step has run in the pipeline, the same step of a later note is expected to take what
it took (``app.pipeline.StepCosts``).

The estimate is an order of magnitude for planning (measured on the main job: docs/RESULTS.md), not a
promise: evaluation of small sets, checkpoint writes and the Python between batches are not counted.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from engine.workload import Rates, Sizes, Work, phase_i_work, phase_ii_work

PROBE_BATCHES = 2  # timed batches per kind, after one warm-up batch


def step_work(step, cfg: dict | None, sizes: Sizes) -> Work:
    """The work of a pipeline step (:class:`app.steps.Step`) under the config it runs with
    (visualize: None, a few images)."""
    if step.kind == "phase_i":
        return phase_i_work(cfg, sizes)
    if step.kind == "phase_ii":
        return phase_ii_work(cfg, sizes)
    if step.kind == "phase_iii":
        return step.method.work(cfg, sizes)
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
