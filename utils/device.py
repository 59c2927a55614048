"""`--device auto|cpu|N` -> torch.device."""
from __future__ import annotations

import torch

from utils.errors import UserError


def parse_device(spec: str) -> str | int:
    """``'auto'``, ``'cpu'`` or the GPU index that ``spec`` (``N`` or ``cuda:N``) names.

    An explicit GPU index must exist on this machine: training silently on the CPU (or failing deep
    inside CUDA) because of a typo in ``--device`` would waste a run, so it is a UserError here."""
    spec = str(spec).strip().lower()
    if spec in ("auto", "cpu"):
        return spec
    index = spec[5:] if spec.startswith("cuda:") else spec
    if not index.isdigit():
        raise UserError(f"--device must be 'auto', 'cpu' or a GPU index such as 0; got '{spec}'.")
    if not torch.cuda.is_available():
        raise UserError(f"--device {spec}: this machine has no CUDA GPU (or this PyTorch build cannot use it). "
                        f"Use --device cpu, or --device auto to take a GPU where there is one.")
    count = torch.cuda.device_count()
    if int(index) >= count:
        raise UserError(f"--device {spec}: only {count} GPU{'s' if count != 1 else ''} visible: "
                        f"{', '.join(map(str, range(count)))}. Pass one of those indices, cpu or auto "
                        f"(CUDA_VISIBLE_DEVICES decides which GPUs are visible).")
    return int(index)


_resolved: torch.device | None = None  # what resolve_device chose last (results.json's provenance.device)


def resolve_device(spec: str) -> torch.device:
    """The device ``--device spec`` names, noted as the one this process computes on (:func:`device_in_use`)."""
    global _resolved
    choice = parse_device(spec)
    if choice == "auto":
        choice = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    _resolved = torch.device("cpu") if choice == "cpu" else torch.device("cuda", choice)
    return _resolved


def device_in_use() -> torch.device:
    """The device this process computes on: what :func:`resolve_device` chose; in a torchrun process
    (whose device ``utils.distributed.setup_device`` picks itself) the current CUDA device once CUDA is
    set up, else the CPU."""
    if _resolved is not None:
        return _resolved
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_initialized() else torch.device("cpu")


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 autocast speeds this device up: a CUDA GPU with bf16 support (Ampere on), or a
    CPU with AVX-512 BF16 or AMX instructions (oneDNN's bf16 kernels; elsewhere bf16 is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_accel(section: dict, device: torch.device) -> tuple[str, bool]:
    """(amp, channels_last) that an ``accel:`` section means on `device`: ``amp: auto`` is bf16 where
    :func:`bf16_is_fast`, else none; ``channels_last: auto`` is on exactly when autocast is (NHWC is what
    oneDNN's bf16 convolutions and tensor cores want; in float32 it is not reliably faster on a CPU)."""
    amp = section.get("amp", "none")
    if amp == "auto":
        amp = "bf16" if bf16_is_fast(device) else "none"
    channels_last = section.get("channels_last", False)
    if channels_last == "auto":
        channels_last = amp != "none"
    return amp, bool(channels_last)
