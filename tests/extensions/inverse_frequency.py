"""A re-weighting schedule from one file (docs/ARCHITECTURE.md, "Adding a re-weighting schedule"):
every class weighted by 1 / n_c from the first epoch on (normalised to sum to the number of classes,
as the class-balanced weights), for any loss.

Use: ``REWEIGHTINGS["inverse_frequency"] = inverse_frequency`` and ``METHODS.register(METHOD)``, then
``--opts train.reweight=inverse_frequency``."""
from __future__ import annotations

import torch

from engine.methods import PhaseIMethod
from engine.reweighting import ClassWeightSchedule


def inverse_frequency_weights(counts: list[int]) -> torch.Tensor:
    """1 / n_c, scaled to sum to the number of classes (a class without images counts as one)."""
    inverse = 1.0 / torch.tensor(counts, dtype=torch.float64).clamp_min(1)
    return (inverse / inverse.sum() * len(counts)).float()


def inverse_frequency(counts: list[int], options: dict) -> ClassWeightSchedule:
    """The `REWEIGHTINGS` factory: the same weights every epoch (`options`, the train section, unused)."""
    weights = inverse_frequency_weights(counts)
    return lambda epoch: weights


# its phase I method with the default loss (CE): the run folder checkpoints/phase_i-inverse_frequency
METHOD = PhaseIMethod("inverse_frequency", "CE re-weighted by 1/n", "losses",
                      settings=(("train.reweight", "inverse_frequency"),), versus_baseline=True,
                      summary="CE with every class weighted by 1 / n_c from the first epoch")
