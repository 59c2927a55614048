"""The common model interface used by training, Grad-CAM and feature synthesis."""
from __future__ import annotations

import torch
from torch import nn


class LTModel(nn.Module):
    """Stem -> residual stages ``layer1..layerN`` -> global average pooling -> ``fc``.

    The split into ``features`` (the CAM-layer map, output of the last stage) and ``head`` exists
    because FSA synthesises feature maps and pushes them through ``head`` alone, so ``head`` must
    accept a map of any spatial size.
    """

    def __init__(
        self,
        arch: str,
        stem: nn.Module,
        stages: list[nn.Module],
        feature_dim: int,
        num_classes: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.feature_dim = feature_dim
        self.stem = stem
        self.stage_names = [f"layer{i + 1}" for i in range(len(stages))]
        for name, stage in zip(self.stage_names, stages):
            self.add_module(name, stage)
        self.cam_layer: str = self.stage_names[-1]
        self.fc = nn.Linear(feature_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def last_stage(self) -> nn.Module:
        return self.get_submodule(self.cam_layer)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean(dim=(2, 3))

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(fmap))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
