"""Benchmark: phase I training throughput (images/s) of the project's path vs. a bare PyTorch loop.

Times, on one device, the same model architecture (same initial weights) and the same training images
(best of `--repeats`, runs interleaved):

  project   what phase_i_train_or_test.py does per epoch: phase I's own task
            (`engine.phase_i.BackboneTraining`: `EpochBatches` seeded per epoch, one persistent
            `BatchLoader` over the in-memory training set with augmentation ON -- zero-padded random crop
            + flip + normalisation, vectorised on the device -- the configured loss and per-step lr)
            through the shared loop `engine.loops.fit` (forward, loss, zero_grad, backward, SGD step,
            loss / accuracy accumulated on the device, one sync per epoch); its evaluation and
            checkpointing are left out (a no-op recorder)
  bare      the floor any loader could reach: the training images preloaded ONCE as a normalised float
            tensor on the device (no augmentation at all), a random permutation cut into batches,
            `model(x)`, loss, zero_grad, backward, step

and prints images/s of each and the ratio project / bare (target >= 0.9). Each timed run covers the
first `--batches` batches of an epoch (default: the whole epoch), so that a CPU run stays short.
`--amp bf16` runs both paths with bfloat16 autocast around forward + loss: the project's path with
`--opts accel.amp=bf16` in its config (`engine.accel.Accel`). The model is a CIFAR ResNet-32
by default (timing does not depend on the weights). Data: synthetic-LT (default, 10 classes of 32x32
shapes, imbalance 10, ~3,300 images) or Fashion-MNIST-LT (imbalance 100, 14,886 images, when the IDX
files are available).

    python benchmarks/bench_phase_i.py [--data synthetic|fashion-mnist] [--threads 1] [--repeats 2]
                                       [--batches N] [--device auto|cpu|0] [--amp bf16]
"""

import argparse
import contextlib
import copy
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import dataset_cfg, device_name, sync  # noqa: E402

from datasets import build_datasets  # noqa: E402
from engine.accel import Accel  # noqa: E402
from engine.loops import fit  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from engine.phase_i import BackboneTraining  # noqa: E402
from models import build_model  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.device import resolve_device  # noqa: E402

TARGET = 0.9  # project images/s >= 0.9 x bare loop


class _Truncated:
    """The first `count` batches of phase I's (persistent) epoch loader."""

    def __init__(self, loader, count: int):
        self.loader, self.count = loader, min(count, len(loader))

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.count:
                return
            yield batch


class TimedEpochs(BackboneTraining):
    """Phase I's task with each epoch cut to its first `max_batches` batches and the evaluation left out."""

    max_batches = 0

    def batches(self, unit: int):
        return _Truncated(self.loader, self.max_batches)

    def evaluate(self):
        return {}, None


class NoRecorder:
    """fit's recorder, minus the log line, TensorBoard, checkpoints and results.json."""

    def record(self, *args, **kwargs) -> None:
        pass


def project_cfg(arch: str, batch_size: int, lr: float, amp: str | None) -> dict:
    """A phase I config of the project's path: the bare loop's optimiser, a constant lr, augmentation on."""
    return load_config("smoke", "phase_i", [f"model.arch={arch}", f"train.batch_size={batch_size}", f"train.lr={lr}",
                                            "train.momentum=0.9", "train.weight_decay=0.0005", "train.schedule=constant",
                                            "train.warmup_epochs=0", "dataset.augment=true", f"accel.amp={amp or 'none'}"])


def project_epoch(task: TimedEpochs, optimizer, max_batches, epoch, device) -> tuple[float, int]:
    """Epoch `epoch` of phase I (its first `max_batches` batches) through the project's task and loop;
    (seconds, images)."""
    task.max_batches, task.total = max_batches, epoch + 1
    sync(device)
    start = time.perf_counter()
    fit(task, optimizer, NoRecorder(), start=epoch)
    sync(device)
    task.sampler.set_epoch(epoch)
    return time.perf_counter() - start, sum(len(b) for b in list(task.sampler)[:max_batches])


def bare_epoch(model, x_all, y_all, criterion, optimizer, batch_size, max_batches, seed, device, amp_ctx) -> tuple[float, int]:
    """The same number of batches from a preloaded normalised tensor, plain PyTorch; (seconds, images)."""
    sync(device)
    start = time.perf_counter()
    model.train()
    n = x_all.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    seen = 0
    for b in range(min(max_batches, -(-n // batch_size))):
        idx = order[b * batch_size:(b + 1) * batch_size]
        x, y = x_all.index_select(0, idx), y_all.index_select(0, idx)
        with amp_ctx():
            loss = criterion(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(idx)
    sync(device)
    return time.perf_counter() - start, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic", choices=("synthetic", "fashion-mnist"))
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=0, help="batches per timed run (default 0: the whole epoch)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, or a GPU index")
    parser.add_argument("--amp", default=None, choices=("bf16",), help="run both paths under bfloat16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the same for both paths

    def amp_ctx():
        if args.amp == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    amp = args.amp
    bundle = build_datasets(dataset_cfg(args.data, augment=True), None)
    train_set = bundle.train.with_augment(True)
    n = len(train_set)
    max_batches = args.batches if args.batches > 0 else -(-n // args.batch_size)
    lr = 0.1

    torch.manual_seed(0)
    base_model = build_model(args.arch, bundle.num_classes, bundle.in_channels)
    models, optimizers = {}, {}
    for key in ("project", "bare"):
        models[key] = copy.deepcopy(base_model).to(device)
    cfg = project_cfg(args.arch, args.batch_size, lr, amp)
    optimizers["project"] = build_optimizer(models["project"].parameters(), cfg["train"])
    optimizers["bare"] = torch.optim.SGD(models["bare"].parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    accel = Accel.from_config(cfg["accel"], device)
    task = TimedEpochs(cfg, bundle, models["project"], models["project"], device, accel)
    criterion = nn.CrossEntropyLoss()

    # the bare loop's data: every training image once, normalised, on the device (preloading not timed)
    images = train_set.images.to(device)
    mean = torch.tensor(train_set.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(train_set.std, device=device).view(1, -1, 1, 1)
    x_all = ((images.float() / 255.0) - mean) / std
    y_all = train_set.targets.to(device)

    amp_note = ""
    if args.amp:
        amp_note = ", bf16 autocast (project: accel.amp=bf16)"
    print(f"{args.data}: {n} training images {tuple(train_set.images.shape[1:])}, {bundle.num_classes} classes, "
          f"{args.arch}, batch {args.batch_size}, {max_batches} batches per run, device {device} "
          f"({device_name(device, args.threads)}){amp_note}, best of {args.repeats}")

    # warm-up (allocator, cudnn autotuning, lazy init): a few batches of each
    project_epoch(task, optimizers["project"], 3, 999, device)
    bare_epoch(models["bare"], x_all, y_all, criterion, optimizers["bare"], args.batch_size, 3, 999, device, amp_ctx)

    runs = {"project": [], "bare": []}
    for r in range(args.repeats):
        s, imgs = project_epoch(task, optimizers["project"], max_batches, r, device)
        runs["project"].append(imgs / s)
        s, imgs = bare_epoch(models["bare"], x_all, y_all, criterion, optimizers["bare"], args.batch_size, max_batches,
                             r, device, amp_ctx)
        runs["bare"].append(imgs / s)

    labels = {"project": "project (BackboneTraining + fit, augment on)", "bare": "bare loop (preloaded, no augment)"}
    bare = max(runs["bare"])
    print(f"device: {device_name(device, args.threads)}")
    print(f"{'path':<52}{'images/s':>10}{'x bare':>9}   all runs (images/s)")
    for key, rates in runs.items():
        best = max(rates)
        print(f"{labels[key]:<52}{best:>10.1f}{best / bare:>8.2f}x   {', '.join(f'{v:.1f}' for v in rates)}")
    ratio = max(runs["project"]) / bare
    print(f"project / bare = {ratio:.2f} (target >= {TARGET}): {'OK' if ratio >= TARGET else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()
