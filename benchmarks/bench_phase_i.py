"""Benchmark: phase I training throughput (images/s) of the project's path vs. a bare PyTorch loop.

Times, on one device, the same model architecture (same initial weights) and the same training images
(best of `--repeats`, runs interleaved):

  project   what phase_i_train_or_test.py does per epoch: `EpochBatches` (seeded, `set_epoch`),
            `BatchLoader` over the in-memory training set with augmentation ON (zero-padded random crop
            + flip + normalisation, vectorised on the device), `engine.loops.train_one_epoch` (per-step
            lr, forward, cross-entropy, zero_grad, backward, SGD step, loss / accuracy accumulated on the
            device)
  bare      the floor any loader could reach: the training images preloaded ONCE as a normalised float
            tensor on the device (no augmentation at all), a random permutation cut into batches,
            `model(x)`, loss, zero_grad, backward, step

and prints images/s of each and the ratio project / bare (target >= 0.9). Each timed run covers the
first `--batches` batches of an epoch (default: the whole epoch), so that a CPU run stays short.
`--amp bf16` runs both paths with bfloat16 autocast around forward + loss: the project's path through
`train_one_epoch(..., accel=Accel(device, "bf16"))` (the `accel.amp` config option). The model is a CIFAR ResNet-32
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
from datasets.loader import BatchLoader, EpochBatches  # noqa: E402
from engine.accel import Accel  # noqa: E402
from engine.loops import train_one_epoch  # noqa: E402
from models import build_model  # noqa: E402
from utils.device import resolve_device  # noqa: E402

TARGET = 0.9  # project images/s >= 0.9 x bare loop


def project_epoch(model, train_set, criterion, optimizer, batch_size, max_batches, seed, device, lr, amp) -> tuple[float, int]:
    """One (possibly truncated) phase I epoch through the project's loader and loop; (seconds, images)."""
    sync(device)
    start = time.perf_counter()
    sampler = EpochBatches(len(train_set), batch_size, seed=0)
    sampler.set_epoch(seed)
    batches = list(sampler)[:max_batches]
    loader = BatchLoader(train_set, batches, device, generator=torch.Generator().manual_seed(seed))
    train_one_epoch(model, loader, criterion, optimizer, lambda i: lr, accel=Accel(device, amp or "none"))
    sync(device)
    return time.perf_counter() - start, sum(len(b) for b in batches)


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
        optimizers[key] = torch.optim.SGD(models[key].parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()

    # the bare loop's data: every training image once, normalised, on the device (preloading not timed)
    images = train_set.images.to(device)
    mean = torch.tensor(train_set.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(train_set.std, device=device).view(1, -1, 1, 1)
    x_all = ((images.float() / 255.0) - mean) / std
    y_all = train_set.targets.to(device)

    amp_note = ""
    if args.amp:
        amp_note = ", bf16 autocast (project: accel=Accel(amp='bf16'))"
    print(f"{args.data}: {n} training images {tuple(train_set.images.shape[1:])}, {bundle.num_classes} classes, "
          f"{args.arch}, batch {args.batch_size}, {max_batches} batches per run, device {device} "
          f"({device_name(device, args.threads)}){amp_note}, best of {args.repeats}")

    # warm-up (allocator, cudnn autotuning, lazy init): a few batches of each
    project_epoch(models["project"], train_set, criterion, optimizers["project"], args.batch_size, 3, 999, device, lr, amp)
    bare_epoch(models["bare"], x_all, y_all, criterion, optimizers["bare"], args.batch_size, 3, 999, device, amp_ctx)

    runs = {"project": [], "bare": []}
    for r in range(args.repeats):
        s, imgs = project_epoch(models["project"], train_set, criterion, optimizers["project"], args.batch_size,
                                max_batches, r, device, lr, amp)
        runs["project"].append(imgs / s)
        s, imgs = bare_epoch(models["bare"], x_all, y_all, criterion, optimizers["bare"], args.batch_size, max_batches,
                             r, device, amp_ctx)
        runs["bare"].append(imgs / s)

    labels = {"project": "project (BatchLoader + augment + train_one_epoch)", "bare": "bare loop (preloaded, no augment)"}
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
