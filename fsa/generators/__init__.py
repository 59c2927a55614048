"""Phase III sample generators, chosen by `finetune.generator`.

A generator adds `Nt*Na` rows to each phase III batch from the batch's `Nt` real tail samples.
It first names the extra training samples whose feature maps it needs (`extra_indices`), the
runner fetches those maps together with the tail and head maps (online: one forward pass over
the images; offline: the phase II store), then `generate` turns them into the extra rows, and `match`
rescales synthetic ones to the real class statistics under `fusion.match` (`fsa.fusion.match_statistics`).
A new generator subclasses `MapGenerator`; its entry in the method table (`engine.methods`) names it.
"""
from __future__ import annotations

from fsa.generators.feature_maps import FusionGenerator, GeneratorContext, MapGenerator, ResampleGenerator

__all__ = ["FusionGenerator", "GeneratorContext", "MapGenerator", "ResampleGenerator"]
