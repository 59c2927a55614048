"""Phase I methods: the CE baseline, the re-weighting / re-margining losses and the TailCalibX
release's cosine backbones (CosineCE, CBD). Each is selected by its ``settings`` of the phase I config
(engine.phase_i trains every one of them)."""
from __future__ import annotations

from engine.method_table import METHODS, SUITES, PhaseIMethod

_LOSSES = dict(group="losses", versus_baseline=True, suites=("full",))
_COSINE = dict(group="cosine", versus_baseline=True)


def _loss(name: str) -> tuple:
    return (("train.loss", name),)


for method in (
    PhaseIMethod("ce", "Phase I baseline (CE)", "baseline", suites=SUITES,
                 summary="backbone + classifier trained with cross-entropy on the long-tailed set"),
    PhaseIMethod("focal", "Focal loss", settings=_loss("focal"), **_LOSSES,
                 summary="softmax CE scaled by (1 - p_t)^train.focal_gamma (1: the LDAM-DRW release's focal baseline)"),
    PhaseIMethod("class_balanced", "Class-balanced CE", settings=_loss("class_balanced"), **_LOSSES,
                 summary="CE weighted by the effective number of samples (train.cb_beta), batch mean of w_y * CE as "
                         "Cui et al.'s release (train.cb_reduction)"),
    PhaseIMethod("balanced_softmax", "Balanced softmax", settings=_loss("balanced_softmax"), **_LOSSES,
                 summary="CE on logits + log(prior)"),
    PhaseIMethod("la_loss", "Logit-adjusted loss", settings=_loss("la_loss"), **_LOSSES,
                 summary="CE on logits + train.la_tau * log(prior)"),
    PhaseIMethod("ldam_drw", "LDAM-DRW", settings=(*_loss("ldam"), ("train.reweight", "drw"), ("model.classifier", "normed")),
                 opts=("model.scale=30", "model.learn_scale=false"), **_LOSSES,
                 summary="LDAM margins train.ldam_max_margin * (n_min / n_c)^(1/4) on the release's bias-free "
                         "NormedLinear cosine logits (s = 30), class-balanced weights from train.drw_epoch on (train.loss=ldam train.reweight=drw)"),
    PhaseIMethod("cosine_ce", "CosineCE", settings=(("model.classifier", "cosine"),), tag="cosine",
                 suites=("full", "tailcalibx"), **_COSINE,
                 summary="CE on the TailCalibX release's cosine classifier (weights normalised per feature over the "
                         "classes, bias, learned scale from model.scale)"),
    PhaseIMethod("cbd", "CBD (class-balanced distillation)",
                 settings=(("model.classifier", "cosine"), ("distill.enabled", True)), teacher="cosine_ce",
                 suites=("tailcalibx",), **_COSINE,
                 summary="CosineCE student distilled from distill.teachers CosineCE teachers (cosine feature loss), "
                         "class-aware batches (the TailCalibX release's ClassAwareSampler)"),
):
    METHODS.register(method)
