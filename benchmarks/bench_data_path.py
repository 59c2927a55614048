"""Benchmark: the project's batched in-memory augmentation vs. torchvision's usual per-image PIL path.

Times, on one device, one pass over the same training images in the same batches (best of `--repeats`,
runs interleaved), every batch ending up as a normalised float tensor on the device:

  project       `BatchLoader` over the `InMemoryDataset` with augmentation on: one `get_batch` call per
                batch (index_select, zero-padded random crop (padding 4) + horizontal flip as one gather,
                /255 and per-channel normalisation, all vectorised on the device)
  torchvision   a torch `Dataset` whose `__getitem__` does
                `Compose([RandomCrop(size, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])`
                on `PIL.Image.fromarray(uint8 array)`, through a `torch.utils.data.DataLoader` with the same
                batches as `batch_sampler`, `num_workers=0`; the batch is then moved to the device
                (pinned memory when the device is a GPU)
  torchvision, N workers   the same with `num_workers=N` (only with `--workers N`; persistent workers,
                started before timing, so worker start-up is not counted)

and prints images/s and the speed-up of the project's path over each. No model is involved: this is
the data path alone. Data: synthetic-LT (default, 10 classes of 32x32 RGB shapes, imbalance 10, ~3,300
images) or Fashion-MNIST-LT (imbalance 100, 14,886 28x28 grey images, when the IDX files are available).

    python benchmarks/bench_data_path.py [--data synthetic|fashion-mnist] [--threads 1] [--repeats 3]
                                         [--workers 2] [--epochs 1] [--device auto|cpu|0]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import dataset_cfg, device_name, sync  # noqa: E402

from datasets import build_datasets  # noqa: E402
from datasets.loader import BatchLoader, shuffled_batches  # noqa: E402
from utils.device import resolve_device  # noqa: E402


class PILDataset(Dataset):
    """The usual torchvision recipe: one uint8 array per image -> PIL -> transforms, one item at a time."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform):
        # [N,C,H,W] -> what PIL expects: [N,H,W] for one channel, [N,H,W,C] otherwise
        self.images = images[:, 0] if images.shape[1] == 1 else np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.targets[i])


def project_pass(train_aug, batches, device, seed, epochs) -> float:
    sync(device)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for x, y, _ in BatchLoader(train_aug, batches, device, generator=generator):
            pass
    sync(device)
    return time.perf_counter() - start


def torchvision_pass(loader, device, epochs) -> float:
    sync(device)
    start = time.perf_counter()
    nb = device.type == "cuda"
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=nb), y.to(device, non_blocking=nb)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic", choices=("synthetic", "fashion-mnist"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training set per timed run")
    parser.add_argument("--workers", type=int, default=0, help="also time the DataLoader with this many workers")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, or a GPU index")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    bundle = build_datasets(dataset_cfg(args.data, augment=True), None)
    train_aug = bundle.train.with_augment(True)
    n, size = len(train_aug), train_aug.image_size
    transform = transforms.Compose([
        transforms.RandomCrop(size, padding=train_aug.pad),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(train_aug.mean, train_aug.std),
    ])
    pil_set = PILDataset(train_aug.images.numpy(), train_aug.targets.numpy(), transform)
    batches = shuffled_batches(n, args.batch_size, torch.Generator().manual_seed(0))
    pin = device.type == "cuda"
    loaders = {"torchvision, 0 workers": DataLoader(pil_set, batch_sampler=batches, num_workers=0, pin_memory=pin)}
    if args.workers > 0:
        loaders[f"torchvision, {args.workers} workers"] = DataLoader(
            pil_set, batch_sampler=batches, num_workers=args.workers, pin_memory=pin, persistent_workers=True)

    print(f"{args.data}: {n} training images {tuple(train_aug.images.shape[1:])}, batch {args.batch_size}, "
          f"{len(batches)} batches x {args.epochs} epoch(s) per run, crop {size} padding {train_aug.pad} + flip + "
          f"normalise, device {device} ({device_name(device, args.threads)}), best of {args.repeats}")

    # warm-up: the first batches of each (and the workers' start-up)
    project_pass(train_aug, batches[:2], device, 999, 1)
    torchvision_pass(DataLoader(pil_set, batch_sampler=batches[:2], num_workers=0, pin_memory=pin), device, 1)
    for loader in loaders.values():
        if loader.num_workers:
            torchvision_pass(loader, device, 1)  # starts the persistent workers

    runs = {"project (BatchLoader, in-memory batched)": []}
    runs.update({key: [] for key in loaders})
    for r in range(args.repeats):
        runs["project (BatchLoader, in-memory batched)"].append(project_pass(train_aug, batches, device, r, args.epochs))
        for key, loader in loaders.items():
            runs[key].append(torchvision_pass(loader, device, args.epochs))

    images = n * args.epochs
    rate = {key: images / min(times) for key, times in runs.items()}
    project = rate["project (BatchLoader, in-memory batched)"]
    print(f"device: {device_name(device, args.threads)}")
    print(f"{'path':<44}{'images/s':>11}{'project x':>11}   all runs (s)")
    for key, times in runs.items():
        print(f"{key:<44}{rate[key]:>11.0f}{project / rate[key]:>10.1f}x   {', '.join(f'{t:.3f}' for t in times)}")
    for key in loaders:
        print(f"speed-up of the project's path over {key}: {project / rate[key]:.1f}x")


if __name__ == "__main__":
    main()
