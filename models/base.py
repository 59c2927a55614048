"""The common model interface used by training, Grad-CAM and feature synthesis."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CLASSIFIERS = ("linear", "cosine")  # model.classifier


def inverse_softplus(value: float) -> float:
    """The x with softplus(x) = value (> 0)."""
    return value + math.log(-math.expm1(-value))


class CosineClassifier(nn.Module):
    """``logits = s * cos(f, w_c) + b_c``: rows of the weight and the feature L2-normalised, one scale
    ``s`` for all classes (the CosineCE classifier of the TailCalibX / CBD releases, whose scale is
    ``softplus`` of a learned parameter; with ``learn_scale=False`` it stays fixed, as LDAM's s = 30).

    Weight and bias start as ``nn.Linear``'s. Because the feature is normalised, the logit is not
    linear in the feature map: Grad-CAM takes the autograd path (``fsa.gradcam``'s ``auto`` does)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 10.0, learn_scale: bool = True):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"cosine classifier scale must be > 0, got {scale}")
        self.in_features, self.out_features = in_features, out_features
        reference = nn.Linear(in_features, out_features)  # nn.Linear's initialisation
        self.weight = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone())
        raw = torch.tensor(inverse_softplus(scale))
        if learn_scale:
            self.raw_scale = nn.Parameter(raw)
        else:
            self.register_buffer("raw_scale", raw)

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale)

    def scale_value(self) -> float:
        return float(self.scale.detach())

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """cos(f, w_c) for every row f and class c: [N, C]."""
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * self.cosine(features) + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale_value():.4g}"


def build_classifier(kind: str, in_features: int, out_features: int, *, scale: float = 10.0,
                     learn_scale: bool = True) -> nn.Module:
    """A fresh classifier of ``model.classifier`` kind ``kind``."""
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    if kind == "cosine":
        return CosineClassifier(in_features, out_features, scale, learn_scale)
    raise ValueError(f"unknown classifier {kind!r}; available: {', '.join(CLASSIFIERS)}")


def fresh_like(fc: nn.Module) -> nn.Module:
    """A newly initialised classifier of the same kind and shape as ``fc`` (cRT, TailCalib's fresh head)."""
    if isinstance(fc, CosineClassifier):
        return CosineClassifier(fc.in_features, fc.out_features, fc.scale_value(),
                                isinstance(fc.raw_scale, nn.Parameter)).to(fc.weight.device)
    return nn.Linear(fc.in_features, fc.out_features).to(fc.weight.device)


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
