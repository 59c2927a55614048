"""Generators that work on CAM-layer feature maps: `fsa` (fusion) and `none` (the cRT control).

After `generate`, phase III passes the generated rows through `match` (`fusion.match`): `fsa` rescales its
fused maps to the real statistics of their class (:func:`fsa.fusion.match_statistics`); `none` adds real
rows and leaves them as they are, so that the two differ only in the fused rows."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fsa.batch_composition import TailHeadComposer
from fsa.fusion import ClassStatistics, DonorPool, fuse_from_cams, match_statistics, sample_donors
from utils.errors import UserError


@dataclass
class GeneratorContext:
    """What a generator may use: training labels, phase II's confusing classes and thresholds."""

    labels: Tensor  # [N] training labels
    confusing: Tensor  # [C, nf] confusing classes per class, -1 where none
    composer: TailHeadComposer
    na: int
    ts: float
    tg: float
    match: str = "none"  # fusion.match
    # the real per-class statistics `match` rescales to (set by the runner before training; None: not matching)
    targets: ClassStatistics | None = None
    # the method's own config section (engine.methods: its `section`), e.g. {"match": ...} for fsa
    options: dict = field(default_factory=dict)


class MapGenerator:
    """A phase III map method's generator (the `implementation` of its engine.methods entry)."""

    fuses = False  # its generated rows are synthetic (fusion.match applies to them) rather than real samples

    def __init__(self, ctx: GeneratorContext):
        self.ctx = ctx

    @property
    def matches(self) -> bool:
        """Whether `match` rescales this generator's rows (a fusing generator under fusion.match != none)."""
        return self.fuses and self.ctx.match != "none"

    def match(self, maps: Tensor, labels: Tensor) -> Tensor:
        """The generated rows the classifier sees: `maps` rescaled to the real statistics of their class
        (:func:`fsa.fusion.match_statistics`, mode `ctx.match`) when :attr:`matches`, else `maps` itself."""
        if not self.matches:
            return maps
        if self.ctx.targets is None:
            raise RuntimeError(f"fusion.match={self.ctx.match} needs the real class statistics (ctx.targets) first")
        return match_statistics(maps, labels, self.ctx.targets, self.ctx.match)

    def extra_indices(self, tail_labels: Tensor, generator: torch.Generator) -> Tensor:
        """Training samples whose maps `generate` needs: `Na` per tail sample, row-aligned."""
        raise NotImplementedError

    def generate(self, tail_maps: Tensor, tail_cams: Tensor, tail_labels: Tensor, extra_maps: Tensor,
                 extra_cams: Tensor, extra_labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`Nt*Na` generated maps and their labels."""
        raise NotImplementedError


class FusionGenerator(MapGenerator):
    """FSA (docs/METHOD.md 2.6): each tail sample's class-specific vectors fused with the class-generic
    vectors of a donor from one of its confusing classes; the fused map keeps the tail label."""

    fuses = True

    def __init__(self, ctx: GeneratorContext):
        super().__init__(ctx)
        self.pool = DonorPool.from_labels(ctx.labels, ctx.confusing.shape[0])
        tail = ctx.composer.tail_classes
        missing = [int(c) for c in tail if not bool((ctx.confusing[c] >= 0).any())]
        if missing:
            raise UserError(
                f"tail classes {missing} have no confusing class in phase II's confusion.json, so FSA has no donor for "
                f"them. Rerun phase II (python phase_ii_extract_feature.py ... --overwrite) so that every tail class gets "
                f"confusion.nf confusing classes."
            )

    def extra_indices(self, tail_labels: Tensor, generator: torch.Generator) -> Tensor:
        repeated = tail_labels.repeat_interleave(self.ctx.na)
        donors, _ = sample_donors(repeated.cpu(), self.ctx.confusing, self.pool, generator)
        return donors

    def generate(self, tail_maps, tail_cams, tail_labels, extra_maps, extra_cams, extra_labels, generator):
        na = self.ctx.na
        fused, labels, _ = fuse_from_cams(tail_maps.repeat_interleave(na, 0), tail_cams.repeat_interleave(na, 0),
                                          tail_labels.repeat_interleave(na), extra_maps, extra_cams,
                                          self.ctx.ts, self.ctx.tg, generator)
        return fused, labels


class ResampleGenerator(MapGenerator):
    """The cRT control: the same class-balanced batches, but the `Nt*Na` extra rows are more real
    samples of the same tail classes instead of fused maps. The gap between this and `fsa` is what
    the augmentation adds beyond re-balancing."""

    def extra_indices(self, tail_labels: Tensor, generator: torch.Generator) -> Tensor:
        return self.ctx.composer.sample_from_classes(tail_labels.repeat_interleave(self.ctx.na).cpu(), generator)

    def generate(self, tail_maps, tail_cams, tail_labels, extra_maps, extra_cams, extra_labels, generator):
        return extra_maps, extra_labels
