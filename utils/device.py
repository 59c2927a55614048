"""`--device auto|cpu|N` -> torch.device."""
from __future__ import annotations

import warnings

import torch

from utils.errors import UserError


def resolve_device(spec: str) -> torch.device:
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    index = spec[5:] if spec.startswith("cuda:") else spec
    if not index.isdigit():
        raise UserError(f"--device must be 'auto', 'cpu' or a GPU index such as 0; got '{spec}'.")
    if not torch.cuda.is_available():
        warnings.warn(f"--device {spec}: CUDA is not available on this machine, running on the CPU.", stacklevel=2)
        return torch.device("cpu")
    if int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible (indices 0..{torch.cuda.device_count() - 1}).")
    return torch.device("cuda", int(index))
