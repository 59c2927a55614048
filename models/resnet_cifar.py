"""CIFAR-style ResNets: 3x3 stem, no max-pool, so 28x28 / 32x32 inputs keep enough resolution."""
from __future__ import annotations

from functools import partial

from torch import nn

from .base import LTModel
from .blocks import BasicBlock, conv3x3, make_stages
from .registry import register_model


def _stem(in_channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))


def cifar_resnet(depth: int, num_classes: int, in_channels: int = 3) -> LTModel:
    """He et al. (2016) CIFAR ResNet: 3 stages of 16/32/64 channels, (depth-2)/6 blocks each.

    Depth 8 (one block per stage) is not in the paper; it is the tiny model of the smoke config.
    """
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    stages, dim = make_stages(BasicBlock, 16, [16, 32, 64], [n, n, n])
    return LTModel(f"resnet{depth}", _stem(in_channels, 16), stages, dim, num_classes, in_channels)


def cifar_wide_resnet(
    arch: str, depths: list[int], num_classes: int, in_channels: int = 3
) -> LTModel:
    """ResNet-18/34 body (64..512 channels) on the CIFAR 3x3 stem."""
    stages, dim = make_stages(BasicBlock, 64, [64, 128, 256, 512], depths)
    return LTModel(arch, _stem(in_channels, 64), stages, dim, num_classes, in_channels)


for _depth in (8, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", partial(cifar_resnet, _depth))
register_model("resnet18_cifar", partial(cifar_wide_resnet, "resnet18_cifar", [2, 2, 2, 2]))
register_model("resnet34_cifar", partial(cifar_wide_resnet, "resnet34_cifar", [3, 4, 6, 3]))
