"""Decoupled classifiers on the frozen phase I backbone (engine/phase_iii_decoupled.py): post-hoc
choices of tau (logit adjustment, tau-normalisation) and re-trained classifiers (LWS, cRT), described
as data -- what they change in the phase I classifier, what a backbone's classifier must have, how a
re-trained head starts and which parameters train -- as classifier-balancing's stage configs do."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.method_table import METHODS, PhaseIIIMethod, load_object
from engine.workload import Sizes, Work, chosen_work, retrain_work
from utils.errors import UserError
from utils.fields import F, Section, count


def _check(values: dict) -> None:
    if not values["tau_grid"]:
        raise UserError("decoupled.tau_grid must list at least one tau.")


# lws / crt default to the classifier-balancing release (config/ImageNet_LT/cls_crt.yaml, cls_lws.yaml): SGD lr 0.2
# cosine to 0 per epoch, batch 512, class-aware batches of 4 per class, augmented images through the frozen backbone;
# momentum / weight decay come from finetune
DECOUPLED = Section("decoupled", {
    "epochs": F(None, int, nullable=True, ge=1),  # null: the release's per method, crt 10, lws 5
    "batch_size": count(512),
    "lr": F(0.2, float, gt=0),
    # cosine: the release's CosineAnnealingLR(T_max=epochs, eta_min=0) stepped before each epoch; constant: lr throughout
    "schedule": F("cosine", str, choices=("cosine", "constant")),
    # class_aware: the release's ClassAwareSampler; independent: every row a uniform class, then a uniform sample of
    # it, an epoch of as many rows as the training set
    "sampler": F("class_aware", str, choices=("class_aware", "independent")),
    "samples_per_class": count(4),  # class_aware: consecutive rows per class visit
    # augmented: every epoch, pooled features of freshly augmented images of the epoch's rows; stored: phase II's
    # pooled features of the un-augmented images (seconds, no backbone pass)
    "features": F("augmented", str, choices=("augmented", "stored")),
    # la_posthoc / tau_norm: tau is the grid value with the best validation mean class accuracy, or the fixed tau
    # without a validation split
    "tau": F(1.0, float, ge=0),
    "tau_grid": F([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0], list, item=float, ge=0),  # not empty
}, "decoupled classifiers (la_posthoc, tau_norm, lws, crt)", check=_check)

# what a backbone's classifier must offer a decoupled method: a bias to fold an adjustment into, rows whose
# norms or scales a linear classifier keeps (a cosine classifier normalises them in every forward pass)
NEEDS = ("bias", "linear_rows")


@dataclass(frozen=True, kw_only=True)
class DecoupledMethod(PhaseIIIMethod):
    """A classifier on phase II's pooled features of the frozen backbone; ``needs``: what the backbone's
    classifier must offer (:data:`NEEDS`)."""

    mode: str = "offline"
    group: str = "decoupled"
    section: Section = DECOUPLED
    versus_baseline: bool = True
    needs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if unknown := set(self.needs) - set(NEEDS):
            raise ValueError(f"method {self.id}: unknown classifier needs {sorted(unknown)}")

    @property
    def reads_store(self) -> bool:
        return True


@dataclass(frozen=True, kw_only=True)
class PostHocMethod(DecoupledMethod):
    """No training: the phase I classifier changed by ``adjustment`` ("module:function",
    ``(fc, train_counts, tau) -> classifier``) at the tau chosen on the validation split."""

    adjustment: str

    runner: ClassVar[str] = "engine.phase_iii_decoupled:run_post_hoc"

    def adjusted(self, fc, train_counts: list[int], tau: float):
        """The phase I classifier ``fc`` changed by the method's adjustment at ``tau``."""
        return load_object(self.adjustment)(fc, train_counts, tau)

    def work(self, cfg: dict, sizes: Sizes) -> Work:
        return chosen_work(sizes)


@dataclass(frozen=True, kw_only=True)
class RetrainMethod(DecoupledMethod):
    """A classifier trained on class-balanced batches: ``head`` says how it starts and what trains
    (``fresh``: re-initialised, every parameter; ``scaled``: the phase I classifier with a learned scale per
    class, only the scales), ``release_epochs`` its epochs when ``decoupled.epochs`` is null."""

    head: str
    release_epochs: int
    HEADS: ClassVar[tuple[str, ...]] = ("fresh", "scaled")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head not in self.HEADS:
            raise ValueError(f"method {self.id}: head {self.head!r} is none of {', '.join(self.HEADS)}")

    def epochs(self, cfg: dict) -> int:
        """Its epochs: ``decoupled.epochs``, or (null) the release's for the method."""
        d = cfg[self.section.name]
        return int(d["epochs"]) if d["epochs"] is not None else self.release_epochs

    runner: ClassVar[str] = "engine.phase_iii_decoupled:run_retrain"

    def work(self, cfg: dict, sizes: Sizes) -> Work:
        return retrain_work(self.epochs(cfg), cfg[self.section.name], sizes)


for method in (
    PostHocMethod(id="la_posthoc", label="Post-hoc logit adjustment", generator="la_posthoc",
                  adjustment="engine.phase_iii_decoupled:logit_adjusted", needs=("bias",),
                  summary="phase I logits - tau * log(prior), tau chosen on the validation split (else decoupled.tau)"),
    PostHocMethod(id="tau_norm", label="tau-normalised classifier", generator="tau_norm",
                  adjustment="engine.phase_iii_decoupled:tau_normalized", needs=("linear_rows",),
                  summary="phase I classifier rows divided by their norm ** tau, no bias (tau as la_posthoc)"),
    # the classifier-balancing release's num_epochs (config/ImageNet_LT/cls_crt.yaml, cls_lws.yaml)
    RetrainMethod(id="lws", label="LWS (learned class scales)", generator="lws", suites=("full",), head="scaled",
                  release_epochs=5, needs=("linear_rows",),
                  summary="phase I classifier with per-class logit scales trained on class-balanced batches"),
    RetrainMethod(id="crt", label="cRT (re-trained classifier)", generator="crt", suites=("full", "tailcalibx"),
                  head="fresh", release_epochs=10,
                  summary="linear classifier re-initialised and trained on class-balanced batches"),
):
    METHODS.register(method)
