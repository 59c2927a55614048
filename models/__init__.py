"""Model zoo: ``build_model(arch, num_classes, in_channels)`` -> :class:`LTModel`."""
from __future__ import annotations

from utils.errors import UserError

from . import resnet_cifar, resnet_imagenet
from .base import LTModel

_REGISTRY = {**resnet_cifar.MODELS, **resnet_imagenet.MODELS}

__all__ = ["LTModel", "available_models", "build_model", "check_arch"]


def available_models() -> list[str]:
    return list(_REGISTRY)


def check_arch(arch: str) -> None:
    """Fail early (before any run folder is made) on an unknown architecture name."""
    if arch not in _REGISTRY:
        raise UserError(
            f"unknown model arch {arch!r}; available: {', '.join(available_models())}. "
            "Set model.arch in the config to one of these."
        )


def build_model(arch: str, num_classes: int, in_channels: int = 3) -> LTModel:
    check_arch(arch)
    if num_classes < 1 or in_channels < 1:
        raise UserError(
            f"model needs num_classes >= 1 and in_channels >= 1, got {num_classes} and {in_channels}"
        )
    return _REGISTRY[arch](num_classes, in_channels)
