"""Phase III methods on pooled features of the frozen backbone (engine/phase_iii_features.py):
TailCalib (offline, from phase II's store) and TailCalibX (online, regenerated every epoch)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.method_table import METHODS, PhaseIIIMethod
from engine.workload import Sizes, Work, tailcalib_work
from utils.fields import F, Section, count

TAILCALIB = Section("tailcalib", {
    "tukey": F(1.0, float, ge=0),  # Tukey's ladder exponent; 0 = log
    "alpha": F(0.0, float, ge=0),
    "k": count(3),
    "epochs": count(10),
    "batch_size": count(256),
    # TailCalib's own SGD lr; null = finetune.lr (optimizer / nesterov / weight decay come from finetune)
    "lr": F(None, float, nullable=True, gt=0),
    # TailCalib's own SGD momentum: the release's 0.7 at imbalance 100 (CIFAR-100-LT; mini-ImageNet-LT too); it sets 0.0
    # at imbalance 50 and 0.9 at 10 (run_all_CIFAR100-LT.sh --cv3), which those configs must set
    "momentum": F(0.7, float, ge=0, lt=1),
    # the classifier on the transformed features: phase_i = a copy of the phase I classifier (the release loads the
    # CosineCE / CBD run's classifier, pretrain: true), fresh = newly initialised (this project's earlier choice)
    "init": F("phase_i", str, choices=("phase_i", "fresh")),
    # k nearest class means among all classes (the release: a sample's own class usually is one) or others only
    "neighbours": F("all", str, choices=("all", "others")),
    # as the release's training code: ridge * I added to every calibrated covariance, and real + generated (and test)
    # rows L2-normalised again after Tukey's transform
    "ridge": F(1e-4, float, ge=0),
    "renormalize": F(True),
}, "TailCalib / TailCalibX")


@dataclass(frozen=True, kw_only=True)
class TailCalibMethod(PhaseIIIMethod):
    """A classifier on Tukey-transformed pooled features plus calibrated Gaussian tail features; its
    checkpoint holds that classifier only (phase I's backbone stays as it was)."""

    group: str = "TailCalib"
    section: Section = TAILCALIB
    versus_baseline: bool = True
    holds_backbone: ClassVar[bool] = False

    @property
    def reads_store(self) -> bool:
        return self.mode == "offline"

    runner: ClassVar[str] = "engine.phase_iii_features:run"

    def work(self, cfg: dict, sizes: Sizes) -> Work:
        return tailcalib_work(self.mode, cfg[self.section.name]["epochs"], sizes)


for method in (
    TailCalibMethod(id="tailcalib", label="TailCalib (offline)", mode="offline", generator="tailcalib",
                    summary="calibrated Gaussian tail features generated once from phase II's pooled features; the "
                            "phase I classifier fine-tuned on real + generated features"),
    TailCalibMethod(id="tailcalibx", label="TailCalibX (online)", mode="online", generator="tailcalibx",
                    summary="TailCalib regenerated every epoch from freshly augmented images; the phase I classifier "
                            "fine-tuned on them"),
):
    METHODS.register(method)

# the TailCalibX release's arms on its own backbones (--suite tailcalibx), after those on CE
for method_id, backbone_id in (("tailcalib", "cosine_ce"), ("tailcalibx", "cosine_ce"), ("tailcalibx", "cbd")):
    METHODS.add_other_backbone_arm("tailcalibx", method_id, backbone_id)
