"""Benchmark: phase III iteration time, online and offline, vs. a plain forward over the same images.

Builds phase III the way `engine.phase_iii_maps.run` does -- `TailHeadComposer`, the `fsa` generator
(`FusionGenerator(GeneratorContext(...))`), the iteration draws (`IterationDraws`), the backbone frozen
with `_set_trainable(model, False)` (eval mode, only `fc` trainable), SGD over `fc` -- and times, on one
device, iterations 0..N-1 of the same plan through the shared loop `engine.loops.fit` (best of
`--repeats`, runs interleaved):

  forward   the images an online iteration fetches (`Nt` tail + `Nt*Na` donors + `Nt*(1+Na)` head
            = `2*Nt*(1+Na)` rows), gathered with the same `BatchLoader` (augmentation on) and pushed
            through a plain eval `model(x)` under no_grad: the floor for the online step
  online    `batch_loss` with `_OnlineMaps` (one forward + closed-form CAMs over those images,
            fusion, head forward) and fit's backward / SGD step, plus the per-iteration draws and reseed
  offline   the same `batch_loss` with `_OfflineMaps` reading phase II's float16 store (memory-mapped)

and prints per-iteration milliseconds, online / forward (target <= 2x) and offline / online. The split,
the confusing classes and the store come from phase II's pieces run on the same (random-weight) model
first: `engine.phase_ii_extraction.extract_view` with a closed-form `CamExtractor`, a `ScoreAccumulator` and a
`FeatureStoreWriter` into a temporary folder (view 0 only, as with the default store.views=0), then
`head_tail_split(hr=0.9)` and
`confusing_classes(nf=3)` (timing does not depend on the weights).
Data: synthetic-LT (default, 10 classes of 32x32 shapes, imbalance 10, ~3,300 images) or
Fashion-MNIST-LT (imbalance 100, 14,886 images, when the IDX files are available).

    python benchmarks/bench_phase_iii.py [--data synthetic|fashion-mnist] [--threads 1] [--repeats 2]
                                         [--iterations 20] [--nt 16] [--na 3] [--device auto|cpu|0]
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

from benchmarks.common import dataset_cfg, device_name, sync  # noqa: E402

from datasets import build_datasets  # noqa: E402
from datasets.loader import BatchLoader  # noqa: E402
from engine.loops import StepResult, TrainingTask, fit  # noqa: E402
from engine.optim import build_optimizer  # noqa: E402
from engine.phase_ii_extraction import extract_view  # noqa: E402
from engine.phase_iii_maps import IterationDraws, _OfflineMaps, _OnlineMaps, _set_trainable, batch_loss  # noqa: E402
from fsa.batch_composition import TailHeadComposer  # noqa: E402
from fsa.class_split import head_tail_split  # noqa: E402
from fsa.confusion import ScoreAccumulator, confusing_classes, confusing_table  # noqa: E402
from fsa.feature_store import FeatureStore, FeatureStoreWriter, format_bytes  # noqa: E402
from fsa.generators import FusionGenerator, GeneratorContext  # noqa: E402
from fsa.gradcam import CamExtractor  # noqa: E402
from models import build_model  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.seeding import seed_everything, stream_seed  # noqa: E402

TARGET = 2.0  # online iteration <= 2 x a plain forward over the same images
SEED, HR, NF, TS, TG = 0, 0.9, 3, 0.8, 0.2


def write_store(model, train, num_classes, folder: Path, device, batch_size) -> tuple[torch.Tensor, dict]:
    """What phase II writes for view 0 (un-augmented; the default store.views=0), by its own pieces:
    `extract_view` with a closed-form `CamExtractor` (one eval forward + CAMs per batch), the score
    matrix (`ScoreAccumulator`) and float16 rows through `FeatureStoreWriter`."""
    with torch.no_grad():
        fmap_shape = tuple(model.features(train.get_batch(torch.arange(1), device)).shape[1:])
    scores = ScoreAccumulator(num_classes, device)
    writer = FeatureStoreWriter(folder, num_samples=len(train), fmap_shape=fmap_shape, views=1, num_test=0)
    extract_view(CamExtractor(model, None, "closed_form"), train, batch_size, device, view=0, writer=writer,
                 scores=scores, desc="bench store")
    return scores.matrix().cpu(), writer.close()


class TimedIterations(TrainingTask):
    """A map method's side of the loop (`engine.phase_iii_maps.MapTraining`: reseed, the iteration's
    draws, `batch_loss`) with its evaluation left out: the run's iterations are booked once, at the end."""

    step_name = "iteration"
    progress_over_units = True

    def __init__(self, model, generator, draws: IterationDraws, fetch, iterations: int):
        self.model, self.generator, self.draws, self.fetch = model, generator, draws, fetch
        self.total = self.eval_every = self.record_every = iterations

    def begin(self, unit: int) -> None:
        seed_everything(stream_seed(SEED, unit))

    def batches(self, unit: int) -> list:
        return [self.draws(unit)]

    def step(self, batch) -> StepResult:
        plan, rng, extra = batch
        loss, logits, targets = batch_loss(self.model, self.generator, plan, rng, self.fetch, extra=extra)
        return StepResult(loss, 1, logits, targets)

    def evaluate(self):
        return {}, None


class NoRecorder:
    """fit's recorder, minus the log line, TensorBoard, checkpoints and results.json."""

    def record(self, *args, **kwargs) -> None:
        pass


def phase_iii_steps(model, optimizer, generator, draws, fetch, iterations, device) -> float:
    """Iterations 0..N-1 as the phase III loop runs them (evaluation left out; the window's loss and
    accuracy are read once at the end, one sync)."""
    sync(device)
    start = time.perf_counter()
    fit(TimedIterations(model, generator, draws, fetch, iterations), optimizer, NoRecorder())
    sync(device)
    return time.perf_counter() - start


def plain_forward(model, train_aug, index_lists, device) -> float:
    sync(device)
    start = time.perf_counter()
    rng = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for x, _, _ in BatchLoader(train_aug, index_lists, device, generator=rng):
            model(x)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic", choices=("synthetic", "fashion-mnist"))
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--iterations", type=int, default=20, help="phase III iterations per timed run")
    parser.add_argument("--nt", type=int, default=16)
    parser.add_argument("--na", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, or a GPU index")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    bundle = build_datasets(dataset_cfg(args.data, augment=False), None)
    train = bundle.train.with_augment(False)
    train_aug = bundle.train.with_augment(True)  # what _OnlineMaps reads
    torch.manual_seed(SEED)
    model = build_model(args.arch, bundle.num_classes, bundle.in_channels).to(device).eval()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        matrix, meta = write_store(model, train, bundle.num_classes, Path(tmp) / "store", device, 256)
        store_s = time.perf_counter() - t0
        store = FeatureStore(Path(tmp) / "store")
        head, tail = head_tail_split(bundle.train_counts, HR)
        table = confusing_table(confusing_classes(matrix, tail, NF), bundle.num_classes, NF)

        composer = TailHeadComposer(bundle.train.targets, tail, head, args.nt, args.na, SEED)
        generator = FusionGenerator(GeneratorContext(labels=bundle.train.targets, confusing=table, composer=composer,
                                                     na=args.na, ts=TS, tg=TG))
        draws = IterationDraws(composer, generator, SEED)
        trainable = _set_trainable(model, False)
        optimizer = build_optimizer(trainable, {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False,
                                                "weight_decay": 5e-4})
        fetches = {"online": _OnlineMaps(model, bundle, device, with_grad=False), "offline": _OfflineMaps(store, device)}
        index_lists = [draws.images(i) for i in range(args.iterations)]  # what each iteration's fetch reads
        rows = len(index_lists[0])
        print(f"{args.data}: {len(train)} training images {tuple(train.images.shape[1:])}, {bundle.num_classes} classes, "
              f"{args.arch}, CAM-layer maps {meta['fmap_shape']}, tail classes {tail}, head {head}; nt {args.nt}, "
              f"na {args.na}: batch {2 * args.nt * (1 + args.na)} rows, {rows} images fetched per iteration; "
              f"{args.iterations} iterations per run, device {device} ({device_name(device, args.threads)}), best of "
              f"{args.repeats}")
        print(f"phase II store for the offline path: {format_bytes(meta['bytes'])} written in {store_s:.1f}s (not timed below)")

        # warm-up: a few iterations of each path (allocator, page cache of the store, lazy init)
        warm = min(3, args.iterations)
        plain_forward(model, train_aug, index_lists[:warm], device)
        for fetch in fetches.values():
            phase_iii_steps(model, optimizer, generator, draws, fetch, warm, device)

        runs = {"forward": [], "online": [], "offline": []}
        for _ in range(args.repeats):
            runs["forward"].append(plain_forward(model, train_aug, index_lists, device))
            for key, fetch in fetches.items():
                runs[key].append(phase_iii_steps(model, optimizer, generator, draws, fetch, args.iterations, device))

    labels = {"forward": "plain eval forward (same images)", "online": "phase III online iteration",
              "offline": "phase III offline iteration"}
    ms = {key: 1000 * min(times) / args.iterations for key, times in runs.items()}
    print(f"device: {device_name(device, args.threads)}")
    print(f"{'what':<36}{'ms/iter':>9}{'x forward':>11}   all runs (ms/iter)")
    for key, times in runs.items():
        print(f"{labels[key]:<36}{ms[key]:>9.1f}{ms[key] / ms['forward']:>10.2f}x   "
              f"{', '.join(f'{1000 * t / args.iterations:.1f}' for t in times)}")
    ratio = ms["online"] / ms["forward"]
    print(f"online / plain forward = {ratio:.2f}x (target <= {TARGET}x): {'OK' if ratio <= TARGET else 'ABOVE TARGET'}")
    print(f"offline / online = {ms['offline'] / ms['online']:.3f} (online / offline = {ms['online'] / ms['offline']:.1f}x)")


if __name__ == "__main__":
    main()
