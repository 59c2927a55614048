"""Per-class statistics of the pooled rows of a phase III map run (engine.phase_iii_maps).

:class:`RowStatistics` accumulates, over a run's iterations, the per-class statistics of the real and
generated rows the classifier trained on (results.json's ``feature_statistics``; ``last.pt`` carries them so
that a resumed run covers its whole training), and :func:`real_statistics` computes once, before training,
the real per-class statistics that ``fusion.match`` rescales generated rows towards. Both are sums of
:class:`fsa.fusion.PooledMoments`, so that neither loops over samples.
"""
from __future__ import annotations

import torch

from engine.phase_iii import PhaseIIIInputs
from engine.phase_iii_features import pooled_features
from fsa.fusion import ClassStatistics, PooledMoments, class_statistics
from models.base import eval_mode
from utils import distributed


def real_statistics(inputs: PhaseIIIInputs) -> ClassStatistics:
    """The real per-class statistics ``fusion.match`` rescales generated rows to, on the run's device: those
    of the pooled features of the phase I backbone (eval mode) on the training images, computed once before
    training (deterministic; a resumed run computes the same).

    offline -- phase II's store: the stored pooled features of every stored view (view 0 = the un-augmented
               image, views 1.. its augmented draws): exactly the rows offline training draws its real maps from.
    online  -- one forward pass over the un-augmented training images (what the store's view 0 holds). Online
               training sees augmented images, whose population has no finite list; the un-augmented images
               are its deterministic centre. With finetune.unfreeze the targets stay those of phase I's last stage."""
    model, bundle, num_classes = inputs.model, inputs.bundle, inputs.bundle.num_classes
    if inputs.method.mode == "offline":
        moments = PooledMoments(num_classes, model.feature_dim)
        for view in range(inputs.store.views):
            moments.add(inputs.store.pooled(view), inputs.store.labels)
        return moments.statistics().to(inputs.device)
    with eval_mode(model):
        pooled, labels = pooled_features(model, bundle.train.with_augment(False), inputs.cfg["eval"]["batch_size"],
                                         inputs.device, accel=inputs.accel)
    return class_statistics(pooled, labels, num_classes)


class RowStatistics:
    """Per-class statistics of the pooled features (``model.pool``) of the rows every phase III map run trains
    on, accumulated on the device over its iterations (:class:`fsa.fusion.PooledMoments`, no per-sample loop):
    ``real`` = the batch's real tail and head rows; ``generated`` = the generator's rows as the classifier sees
    them (for the control none: its extra real tail rows); with fusion.match also ``generated_before_match``.

    Each process adds its own rows; at every booking (:meth:`book`) the processes' sums are added up into the
    booked totals, which ``last.pt`` carries (:meth:`state` / :meth:`load`), so a resumed run's statistics
    cover its whole training as a straight run's do. Memory: ``K x (2 + 2D)`` float64 per group on the device
    and as much on the host (ImageNet-LT, 1000 classes x 512: 8 MB; iNaturalist x ResNet-50: 267 MB)."""

    def __init__(self, num_classes: int, dim: int, device: torch.device, matching: bool):
        groups = ("real", "generated", *(("generated_before_match",) if matching else ()))
        self.local = {g: PooledMoments(num_classes, dim, device) for g in groups}
        self.booked = {g: torch.zeros_like(m.sums, device="cpu") for g, m in self.local.items()}  # (host memory)
        self.first = 0  # the first iteration the booked sums cover

    def add(self, group: str, pooled: torch.Tensor, labels: torch.Tensor) -> None:
        if group in self.local:
            self.local[group].add(pooled, labels)

    def book(self) -> None:
        """Add every process's sums since the last booking to the booked totals (one all-reduce per group)."""
        for group, moments in self.local.items():
            self.booked[group] += distributed.all_reduce_sum(moments.sums).cpu()
            moments.sums.zero_()

    def state(self) -> dict:
        return {group: sums.clone() for group, sums in self.booked.items()}

    def load(self, state: dict | None, iteration: int) -> None:
        """The booked sums of a ``last.pt`` of iteration ``iteration``; one saved without them (before this
        record existed) leaves the statistics to cover the iterations from ``iteration`` on."""
        if not state or any(g not in state or state[g].shape != s.shape for g, s in self.booked.items()):
            self.first = int(iteration)
            return
        for group, sums in self.booked.items():
            sums.copy_(state[group].to(sums.device, sums.dtype))

    def summary(self, iterations: int, targets: ClassStatistics | None) -> dict:
        """results.json's ``feature_statistics``: per group and class ``rows``, ``norm`` (mean L2 norm) and
        ``std`` (mean over dimensions of the per-dimension std); null where a class has no row."""
        out: dict = {"iterations": [self.first, int(iterations)]}
        for group, sums in self.booked.items():
            moments = PooledMoments(sums.shape[0], (sums.shape[1] - 2) // 2, sums.device)
            moments.sums = sums
            out[group] = moments.statistics().summary()
        if targets is not None:
            out["match_targets"] = targets.summary()
        return out
