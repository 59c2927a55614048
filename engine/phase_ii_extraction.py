"""Phase II's passes over a dataset: the CAMs, score and split statistics and feature-store rows of the
training set (one view at a time, :func:`extract_view`), the test set's pooled features
(:func:`extract_test_pooled`), and the time they take (:class:`ExtractionTimer`). ``engine.phase_ii``
runs them for a phase II run; the benchmarks call them directly.
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch import Tensor

from engine.accel import NO_ACCEL, Accel
from engine.loops import ordered_map
from fsa.confusion import ScoreAccumulator
from fsa.decomposition import SplitStatistics
from fsa.feature_store import FeatureStoreWriter
from fsa.gradcam import CamExtractor
from models.base import eval_mode

__all__ = ["ExtractionTimer", "extract_test_pooled", "extract_view"]


class ExtractionTimer:
    """Wall-clock seconds of compute (forward + CAM + statistics) and of store writes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.compute_s = 0.0
        self.write_s = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def measure(self, what: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - start
            if what == "compute":
                self.compute_s += elapsed
            else:
                self.write_s += elapsed


def _write_rows(writer: FeatureStoreWriter, view: int, fmap16: Tensor, cam16: Tensor, pooled: Tensor, y: Tensor,
                idx: Tensor) -> None:
    """Store rows of one batch; they must be consecutive training-set positions."""
    if not len(idx):
        return
    start = int(idx[0])
    if not torch.equal(idx, torch.arange(start, start + len(idx))):
        raise RuntimeError("phase II batches must cover the training set in order")
    writer.write(view, start, fmap16, cam16, pooled)
    if view == 0:
        writer.write_labels(start, y, idx)


def extract_view(extractor: CamExtractor, dataset, batch_size: int, device: torch.device, *, view: int = 0,
                 seed: int | None = None, writer: FeatureStoreWriter | None = None,
                 scores: ScoreAccumulator | None = None, stats: SplitStatistics | None = None,
                 timer: ExtractionTimer | None = None, accel: Accel = NO_ACCEL, store: bool | None = None,
                 num_workers: int = 0, desc: str = "phase II") -> None:
    """One pass over `dataset` (augmented batch b seeded ``stream_seed(seed, b)``): CAMs of the true
    class, score / split statistics (when given) and store rows of ``view`` (when a writer is given).

    Through :func:`engine.loops.ordered_map`: under torchrun the ranks share the batches and rank 0
    books them in single-process order, so statistics and store are those of a single process.
    ``store`` (whether rank 0 writes store rows, hence whether maps are gathered; default: ``writer
    is not None``) must be the same on every rank."""
    timer = timer or ExtractionTimer(torch.device("cpu"))
    store = writer is not None if store is None else store

    def maps_of(x: Tensor, y: Tensor, idx: Tensor) -> dict[str, Tensor]:
        with timer.measure("compute"):
            with accel.autocast():
                fmap, cam, logits = extractor(accel.inputs(x), y)
            rows = {"cam": cam.float(), "logits": logits.float(), "y": y, "idx": idx}
            if store:
                fmap = fmap.float()
                rows.update(fmap16=fmap.to(torch.float16), pooled=fmap.mean(dim=(2, 3)))
        return rows

    def book(part: dict[str, Tensor]) -> None:
        with timer.measure("write"):
            if scores is not None:
                scores.update(part["logits"], part["y"])
            if stats is not None:
                stats.update(part["cam"], part["y"])
            if writer is not None:
                _write_rows(writer, view, part["fmap16"].cpu(), part["cam"].to(torch.float16).cpu(),
                            part["pooled"].cpu(), part["y"].cpu(), part["idx"].cpu())

    ordered_map(maps_of, dataset, batch_size, device, seed=seed, num_workers=num_workers, consume=book, desc=desc)


@torch.no_grad()
def extract_test_pooled(model, dataset, batch_size: int, device: torch.device, writer: FeatureStoreWriter | None, *,
                        accel: Accel = NO_ACCEL, num_workers: int = 0) -> None:
    """Pooled features of the (un-augmented) test images into the store (rank 0 writes)."""
    def pooled_of(x: Tensor, y: Tensor, idx: Tensor) -> dict[str, Tensor]:
        with accel.autocast():
            return {"pooled": model.pool(model.features(accel.inputs(x))).float(), "y": y, "idx": idx}

    def book(part: dict[str, Tensor]) -> None:
        if len(part["idx"]):
            writer.write_test(int(part["idx"][0]), part["pooled"].cpu(), part["y"].cpu())

    with eval_mode(model):
        ordered_map(pooled_of, dataset.with_augment(False), batch_size, device, num_workers=num_workers,
                    consume=book, desc="phase II test features")
