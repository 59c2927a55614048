"""Phase III methods on CAM-layer feature maps (engine/phase_iii_maps.py): Feature Space Augmentation
in both modes and its paired control, each a :class:`fsa.generators.MapGenerator` named by
``implementation``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.method_table import METHODS, PhaseIIIMethod, load_object
from engine.workload import Sizes, Work, maps_work
from utils.fields import F, Section

# fsa's fused rows before the classifier sees them (fsa.fusion.match_statistics): none = the paper's rule; norm = each
# fused pooled feature rescaled to its class's mean real norm; moments = per dimension to its class's real mean / std.
# Real statistics: phase II's store offline, a pass over the training images online. The control `none` adds real rows,
# which are left as they are (it does not read this section).
FUSION = Section("fusion", {"match": F("none", str, choices=("none", "norm", "moments"))},
                 "fused feature maps (fsa)")


@dataclass(frozen=True, kw_only=True)
class MapMethod(PhaseIIIMethod):
    """Fine-tuning on batches of real tail / head maps plus the rows its generator (``implementation``,
    "module:Class") makes; offline the maps come from phase II's store, online from augmented images."""

    implementation: str

    @property
    def reads_store(self) -> bool:
        return self.mode == "offline"

    def generator_class(self) -> type:
        return load_object(self.implementation)

    runner: ClassVar[str] = "engine.phase_iii_maps:run"

    def work(self, cfg: dict, sizes: Sizes) -> Work:
        return maps_work(self.mode, cfg["finetune"], sizes)


def _fsa_mode(mode: str, summary: str) -> list[MapMethod]:
    """FSA in one mode and its paired cRT control (same batches, real tail samples instead of fused maps)."""
    control = MapMethod(id=f"control_{mode}", label=f"cRT control ({mode}, no fusion)", group="FSA", mode=mode,
                        generator="none", implementation="fsa.generators.feature_maps:ResampleGenerator",
                        summary="FSA's class-balanced batches with real tail samples instead of fused maps (the control)")
    fsa = MapMethod(id=f"fsa_{mode}", label=f"FSA {mode}", group="FSA", mode=mode, generator="fsa", section=FUSION,
                    implementation="fsa.generators.feature_maps:FusionGenerator", control=control.id,
                    versus_baseline=True, summary=summary)
    return [control, fsa]


for method in (
    *_fsa_mode("offline", "feature space augmentation from phase II's stored maps and CAMs"),
    *_fsa_mode("online", "feature space augmentation, maps and CAMs recomputed from augmented images every iteration"),
):
    METHODS.register(method)
