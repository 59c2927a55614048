"""The backbone registry: every ``model.arch`` and the function that builds it.

A backbone module defines a builder ``build(num_classes, in_channels) -> LTModel`` and registers it with
one call, ``register_model(name, build)``; importing the ``models`` package imports every such module, so
``MODELS`` is then complete. It is the one list of names: the config schema reads ``model.arch``'s choices
from it and ``build_model`` looks names up in it, so a new backbone is one new file plus one registration
(docs/ARCHITECTURE.md, "Adding a backbone"). The classifier head (``model.classifier``) is not the
backbone's business: ``build_model`` swaps it in on any registered backbone.
"""

from __future__ import annotations

from typing import Callable

from models.base import LTModel

__all__ = ["MODELS", "ModelBuilder", "register_model", "unregister_model"]

# (num_classes, in_channels) -> a freshly initialised model whose `arch` is its registered name
ModelBuilder = Callable[[int, int], LTModel]

MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str, build: ModelBuilder) -> None:
    """Make ``build`` the backbone ``name`` (``model.arch: <name>``); names are listed in registration order."""
    if name in MODELS:
        raise ValueError(f"model arch {name} is already registered")
    MODELS[name] = build


def unregister_model(name: str) -> None:
    """Remove ``name`` (a test's backbone, after the test)."""
    del MODELS[name]
