"""ImageNet-style ResNets (7x7 stride-2 stem + max-pool); randomly initialised, no downloads."""
from __future__ import annotations

from functools import partial

from torch import nn

from .base import LTModel
from .blocks import BasicBlock, Block, Bottleneck, make_stages
from .registry import register_model


def imagenet_resnet(
    arch: str, block: Block, depths: list[int], num_classes: int, in_channels: int = 3
) -> LTModel:
    stem = nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    stages, dim = make_stages(block, 64, [64, 128, 256, 512], depths)
    return LTModel(arch, stem, stages, dim, num_classes, in_channels)


_CONFIGS: dict[str, tuple[Block, list[int]]] = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}

for _name, (_block, _depths) in _CONFIGS.items():
    register_model(_name, partial(imagenet_resnet, _name, _block, _depths))
