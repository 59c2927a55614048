"""Model zoo: ``build_model(arch, num_classes, in_channels)`` -> :class:`LTModel`."""
from __future__ import annotations

from utils.errors import UserError

from . import resnet_cifar, resnet_imagenet
from .base import CLASSIFIERS, CosineClassifier, LTModel, build_classifier, fresh_like

_REGISTRY = {**resnet_cifar.MODELS, **resnet_imagenet.MODELS}

__all__ = ["LTModel", "CosineClassifier", "CLASSIFIERS", "available_models", "build_classifier", "build_model",
           "check_arch", "fresh_like"]


def available_models() -> list[str]:
    return list(_REGISTRY)


def check_arch(arch: str) -> None:
    """Fail early (before any run folder is made) on an unknown architecture name."""
    if arch not in _REGISTRY:
        raise UserError(
            f"unknown model arch {arch!r}; available: {', '.join(available_models())}. "
            "Set model.arch in the config to one of these."
        )


def build_model(arch: str, num_classes: int, in_channels: int = 3, *, classifier: str = "linear",
                scale: float = 10.0, learn_scale: bool = True) -> LTModel:
    """``arch`` with a ``classifier`` head (``linear`` | ``cosine``, the latter with its ``scale``)."""
    check_arch(arch)
    if num_classes < 1 or in_channels < 1:
        raise UserError(
            f"model needs num_classes >= 1 and in_channels >= 1, got {num_classes} and {in_channels}"
        )
    model = _REGISTRY[arch](num_classes, in_channels)
    if classifier != "linear":
        model.fc = build_classifier(classifier, model.feature_dim, num_classes, scale=scale, learn_scale=learn_scale)
    return model
