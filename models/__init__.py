"""Model zoo: ``build_model(arch, num_classes, in_channels)`` -> :class:`LTModel`.

Every ``model.arch`` is a builder in the registry (``MODELS``, models/registry.py); the backbone modules
imported below register theirs when imported.
"""
from __future__ import annotations

from utils.errors import UserError

# the backbone modules register themselves when imported: this order is the order of the names in
# MODELS (error messages, model.arch's choices in docs/CONFIG.md)
from . import resnet_cifar, resnet_imagenet  # noqa: F401
from .base import CLASSIFIERS, CosineClassifier, LTModel, build_classifier, fresh_like
from .registry import MODELS, register_model, unregister_model

__all__ = ["LTModel", "CosineClassifier", "CLASSIFIERS", "MODELS", "available_models", "build_classifier",
           "build_model", "check_arch", "fresh_like", "register_model", "unregister_model"]


def available_models() -> list[str]:
    return list(MODELS)


def check_arch(arch: str) -> None:
    """Fail early (before any run folder is made) on an unknown architecture name."""
    if arch not in MODELS:
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
    model = MODELS[arch](num_classes, in_channels)
    if classifier != "linear":
        model.fc = build_classifier(classifier, model.feature_dim, num_classes, scale=scale, learn_scale=learn_scale)
    return model
