"""Benchmark: phase II extraction vs. a plain eval forward pass over the same training images.

Times, on one device and the same batches (best of `--repeats`, runs interleaved):

  forward      plain eval forward `model(x)` under no_grad (batch gathering + normalisation included)
  phase II     what phase_ii_extract_feature.py does per batch (`engine.phase_ii_extraction.extract_view` with a
               `fsa.gradcam.CamExtractor`, through `engine.loops.ordered_map`): forward, closed-form
               Grad-CAM of the true class, score-matrix and split-statistics accumulation, float16 store
               write
  autograd     the same with gradcam.method=autograd at the CAM layer (autograd through the head)
  layer2       Grad-CAM at a non-CAM layer (`layer2`): forward + backward through the last stage,
               plus the no-grad forward for the CAM-layer maps that the store needs

and prints the ratios to the plain forward (target for phase II: <= 1.5x). The model is a CIFAR
ResNet-32 (random weights: timing does not depend on them). Data: synthetic-LT (default, 10 classes of
32x32 shapes, imbalance 10, ~3,300 images) or Fashion-MNIST-LT (imbalance 100, when the IDX files are
available).

    python benchmarks/bench_phase_ii.py [--data synthetic|fashion-mnist] [--threads 1] [--repeats 2]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import dataset_cfg  # noqa: E402

from datasets import build_datasets  # noqa: E402
from datasets.loader import BatchLoader, sequential_batches  # noqa: E402
from engine.phase_ii_extraction import ExtractionTimer, extract_view  # noqa: E402
from fsa.confusion import ScoreAccumulator  # noqa: E402
from fsa.decomposition import SplitStatistics  # noqa: E402
from fsa.feature_store import FeatureStoreWriter, format_bytes  # noqa: E402
from fsa.gradcam import CamExtractor  # noqa: E402
from models import build_model  # noqa: E402


def plain_forward(model, loader) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for x, _, _ in loader:
            model(x)
    return time.perf_counter() - start


def extraction(extractor: CamExtractor, train, batch_size, num_classes, n, fmap_shape, folder: Path,
               device) -> tuple[float, float, float, int]:
    timer = ExtractionTimer(device)
    scores = ScoreAccumulator(num_classes, device)
    stats = SplitStatistics(num_classes, 0.8, 0.2, device)
    start = time.perf_counter()
    writer = FeatureStoreWriter(folder, num_samples=n, fmap_shape=fmap_shape, views=1, num_test=0)
    extract_view(extractor, train, batch_size, device, view=0, writer=writer, scores=scores, stats=stats, timer=timer,
                 desc="bench")
    scores.matrix()
    stats.result()
    meta = writer.close()
    return time.perf_counter() - start, timer.compute_s, timer.write_s, meta["bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic", choices=("synthetic", "fashion-mnist"))
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    bundle = build_datasets(dataset_cfg(args.data, augment=False), None)
    train = bundle.train.with_augment(False)
    n = len(train)
    model = build_model(args.arch, bundle.num_classes, bundle.in_channels).to(device).eval()
    batches = sequential_batches(n, args.batch_size)
    loader = BatchLoader(train, batches, device)
    with torch.no_grad():
        fmap_shape = tuple(model.features(train.get_batch(torch.arange(1), device)).shape[1:])
    print(f"{args.data}: {n} training images {tuple(train.images.shape[1:])}, {bundle.num_classes} classes, "
          f"{args.arch}, CAM-layer maps {list(fmap_shape)}, batch {args.batch_size}, device {device}, "
          f"{args.threads} thread(s), best of {args.repeats}")

    closed = CamExtractor(model, None, "closed_form")
    auto_head = CamExtractor(model, None, "autograd")
    other = CamExtractor(model, "layer2", "auto")
    runs = {"forward": [], "phase II (closed form)": [], "autograd (CAM layer)": [], "autograd (layer2)": []}
    detail = {}
    plain_forward(model, BatchLoader(train, batches[:2], device))  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            runs["forward"].append(plain_forward(model, loader))
            for key, extractor in (("phase II (closed form)", closed), ("autograd (CAM layer)", auto_head),
                                   ("autograd (layer2)", other)):
                total, compute, write, nbytes = extraction(extractor, train, args.batch_size, bundle.num_classes, n,
                                                           fmap_shape, Path(tmp) / f"{key[:5]}{r}", device)
                runs[key].append(total)
                if total <= min(runs[key]):
                    detail[key] = (compute, write, nbytes)
    base = min(runs["forward"])
    print(f"{'what':<24}{'seconds':>9}{'img/s':>9}{'x forward':>11}   details")
    for key, times in runs.items():
        best = min(times)
        extra = ""
        if key in detail:
            compute, write, nbytes = detail[key]
            extra = f"forward+CAM+stats {compute:.2f}s, store write {write:.2f}s ({format_bytes(nbytes)})"
        print(f"{key:<24}{best:>9.2f}{n / best:>9.0f}{best / base:>10.2f}x   {extra}")
    ratio = min(runs["phase II (closed form)"]) / base
    print(f"phase II / plain forward = {ratio:.2f}x (target <= 1.5x): {'OK' if ratio <= 1.5 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
