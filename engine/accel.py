"""Optional speed settings of a phase (the ``accel:`` config section): mixed precision,
channels-last memory format and ``torch.compile``.

    accel:
      amp: auto | none | bf16 | fp16   # autocast dtype of forward passes; fp16 also scales the loss (GradScaler)
      channels_last: auto | true | false  # NHWC weights and inputs (what bf16 convolutions want)
      threads: auto | N         # CPU threads (utils/threads.py)
      compile: false            # phase I only: torch.compile the training forward

``auto`` (the default) is bf16 autocast and channels-last where bf16 is fast: a CUDA GPU with bf16, a
CPU with AVX-512 BF16 or AMX (utils.device.resolve_accel); elsewhere float32, contiguous. On this
project's 2-core AVX-512 BF16 machine a ResNet-20 training step takes about 0.5x the float32 time, and
3 seeds of the main job's phase I moved top-1 by a paired difference whose interval includes 0
(docs/RESULTS.md). ``amp: none`` is float32 (with ``channels_last: auto`` then off), one setting away:
the float32 path of earlier versions. bf16 needs no loss scaling; fp16 is for GPUs without bf16.
Grad-CAMs, statistics and stored maps are always computed and kept in float32 / float16 from the
autocast outputs, so the phase II store has the same format whatever ``amp`` is.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from utils.device import resolve_accel
from utils.errors import UserError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Accel:
    device: torch.device
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    auto: tuple[str, ...] = ()  # the settings that were `auto` in the config (the log says what auto chose)

    @classmethod
    def from_config(cls, section: dict | None, device: torch.device) -> "Accel":
        section = section or {}
        if section.get("amp", "none") not in (*AMP_DTYPES, "auto"):
            raise UserError(f"accel.amp must be one of auto, {', '.join(AMP_DTYPES)}; got '{section['amp']}'.")
        amp, channels_last = resolve_accel(section, device)
        auto = tuple(key for key in ("amp", "channels_last", "threads") if section.get(key) == "auto")
        accel = cls(device, amp, channels_last, bool(section.get("compile", False)), auto)
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
        def value(key: str, shown) -> str:
            return f"{key} {shown}{' (auto)' if key in self.auto else ''}"

        return (f"{value('amp', self.amp)}, {value('channels_last', self.channels_last)}, compile {self.compile}, "
                f"{value('threads', torch.get_num_threads())}")


# every setting off: the default of functions that take an Accel (the device is not consulted)
NO_ACCEL = Accel(torch.device("cpu"))
