"""Optional speed settings of a phase (the ``accel:`` config section): mixed precision,
channels-last memory format and ``torch.compile``.

    accel:
      amp: none | bf16 | fp16   # autocast dtype of forward passes; fp16 also scales the loss (GradScaler)
      channels_last: false      # NHWC weights and inputs (faster convolutions on tensor cores)
      compile: false            # phase I only: torch.compile the training forward

All default off, so a run is bit-for-bit what it was without them. bf16 needs no loss scaling and is
the choice on A100/H100; fp16 is for older GPUs. Autocast also works on the CPU (bf16).
Grad-CAMs, statistics and stored maps are always computed and kept in float32 / float16 from the
autocast outputs, so the phase II store has the same format whatever ``amp`` is.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from utils.errors import UserError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Accel:
    device: torch.device
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def from_config(cls, section: dict | None, device: torch.device) -> "Accel":
        section = section or {}
        accel = cls(device, section.get("amp", "none"), bool(section.get("channels_last", False)),
                     bool(section.get("compile", False)))
        if accel.amp not in AMP_DTYPES:
            raise UserError(f"accel.amp must be one of {', '.join(AMP_DTYPES)}; got '{accel.amp}'.")
        if accel.amp == "fp16" and device.type == "cpu":
            raise UserError("accel.amp=fp16 needs a GPU (float16 autocast with loss scaling); on the CPU use accel.amp=bf16 "
                            "or accel.amp=none.")
        if accel.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(f"accel.amp=bf16: the GPU {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                            f"use accel.amp=fp16.")
        return accel

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the configured dtype (a no-op context with amp: none)."""
        dtype = AMP_DTYPES[self.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (disabled, i.e. the identity, otherwise)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model in the configured memory format (in place; returned for chaining)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def compiled(self, module: nn.Module) -> nn.Module:
        """``torch.compile(module)`` when ``compile`` is on (the original keeps the parameters and state dict)."""
        return torch.compile(module) if self.compile else module

    def describe(self) -> str:
        return f"amp {self.amp}, channels_last {self.channels_last}, compile {self.compile}"


# every setting off: the default of functions that take an Accel (the device is not consulted)
NO_ACCEL = Accel(torch.device("cpu"))
