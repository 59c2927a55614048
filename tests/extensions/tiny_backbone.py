"""tiny_cnn: a backbone in one file, for tests/test_adding_backbone.py (docs/ARCHITECTURE.md, "Adding a backbone").

A conv-BN-ReLU stem and two conv-BN-ReLU stages (8 and 16 channels, each halving the resolution): far smaller
than resnet8, so the whole chain trains on it in seconds. It only has to fill :class:`models.LTModel`'s slots;
training, Grad-CAM (the last stage is the CAM layer), phase II's feature maps and the classifier heads come
with it. Registered by the test's fixture, ``register_model(NAME, build_tiny_cnn)``; a backbone of the project
registers itself at its module's end.
"""
from __future__ import annotations

from torch import nn

from models import LTModel

NAME = "tiny_cnn"
WIDTHS = (8, 8, 16)  # stem, layer1, layer2


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def build_tiny_cnn(num_classes: int, in_channels: int = 3) -> LTModel:
    """A freshly initialised tiny_cnn; ``arch`` is the registered name, so checkpoints record it."""
    stem = _conv_bn_relu(in_channels, WIDTHS[0], stride=1)
    stages = [_conv_bn_relu(WIDTHS[0], WIDTHS[1], stride=2), _conv_bn_relu(WIDTHS[1], WIDTHS[2], stride=2)]
    return LTModel(NAME, stem, stages, WIDTHS[-1], num_classes, in_channels)
