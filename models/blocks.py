"""Residual building blocks shared by the CIFAR and ImageNet ResNet families."""
from __future__ import annotations

import torch
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def projection(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """1x1 conv + BN shortcut used whenever the block changes shape, identity otherwise.

    Both families use this projection shortcut (option B of He et al.); for the CIFAR ResNets it
    replaces the parameter-free zero-padding shortcut (option A) at a cost of ~0.6% more
    parameters, so the block code is identical across families.
    """
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = projection(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in torchvision's v1.5), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = projection(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


def make_stages(
    block: Block, in_planes: int, widths: list[int], depths: list[int]
) -> tuple[list[nn.Sequential], int]:
    """Build residual stages; every stage after the first halves the resolution.

    Returns the stages and the channel count of the last one.
    """
    stages = []
    for i, (planes, num_blocks) in enumerate(zip(widths, depths)):
        stride = 1 if i == 0 else 2
        blocks = []
        for j in range(num_blocks):
            blocks.append(block(in_planes, planes, stride if j == 0 else 1))
            in_planes = planes * block.expansion
        stages.append(nn.Sequential(*blocks))
    return stages, in_planes
