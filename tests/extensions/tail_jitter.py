"""A phase III method with its own hyper-parameter, in one file: a map generator, its config section
and its method-table entry (docs/ARCHITECTURE.md, "Adding a phase III method"). The test registers
``TAIL_JITTER`` with one call; a method of the project ends its file with ``METHODS.register(...)`` and
is imported by engine/methods/__init__.py."""
import torch

from engine.methods.maps import MapMethod
from fsa.generators import MapGenerator
from utils.fields import F, Section

# its own settings: --opts jitter.noise=0.3 (phase III); the schema, --help and the sweep read them from the entry
JITTER = Section("jitter", {"noise": F(0.1, float, ge=0)}, "tail jitter: multiplicative noise of the copies")


class TailJitter(MapGenerator):
    """`Na` copies of each real tail map with multiplicative Gaussian noise of std ``jitter.noise``."""

    def extra_indices(self, tail_labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)  # needs no other sample's maps

    def generate(self, tail_maps, tail_cams, tail_labels, extra_maps, extra_cams, extra_labels, generator):
        copies = tail_maps.repeat_interleave(self.ctx.na, 0)
        noise = torch.randn(copies.shape, generator=generator).to(copies)
        return copies * (1 + self.ctx.options["noise"] * noise), tail_labels.repeat_interleave(self.ctx.na)


TAIL_JITTER = MapMethod(id="jitter_offline", label="Tail jitter (offline)", group="FSA", mode="offline",
                        generator="jitter", implementation=f"{__name__}:TailJitter", section=JITTER,
                        control="control_offline", summary="noisy copies of the real tail maps")
