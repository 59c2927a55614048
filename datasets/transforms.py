"""Vectorised augmentation for in-memory image batches (uint8 [B,C,H,W] on any device).

Random crop with zero padding + horizontal flip are done with one gather per batch (no per-sample
Python loop); then the batch is scaled to [0,1] and normalised per channel.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["normalize", "crop_flip", "random_crop_flip_params", "random_crop_flip", "augment_batch"]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[B,C,H,W]`` -> float32 ``(x/255 - mean) / std``."""
    x = images.to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def crop_flip(
    images: torch.Tensor,
    offset_y: torch.Tensor,
    offset_x: torch.Tensor,
    flips: torch.Tensor,
    pad: int,
) -> torch.Tensor:
    """Deterministic crop/flip: zero-pad by ``pad``, take the HxW window whose top-left corner is
    ``(offset_y[b], offset_x[b])`` in the padded image, then mirror left-right where ``flips[b]``.

    ``offset == pad`` on both axes and no flip returns the input unchanged.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad)) if pad > 0 else images
    wp = w + 2 * pad
    rows = offset_y.to(dev, torch.long).view(b, 1) + torch.arange(h, device=dev).view(1, h)  # [B,H]
    cols_fwd = torch.arange(w, device=dev).view(1, w)
    flips = flips.to(dev, torch.bool).view(b, 1)
    cols = torch.where(flips, (w - 1) - cols_fwd, cols_fwd) + offset_x.to(dev, torch.long).view(b, 1)  # [B,W]
    # one flat gather per batch: position (y, x) of the output reads padded[rows[y], cols[x]]
    flat = (rows.view(b, h, 1) * wp + cols.view(b, 1, w)).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)


def random_crop_flip_params(
    batch_size: int,
    pad: int,
    flip: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(offset_y, offset_x, flips)``, drawn on the generator's device (CPU by default)."""
    dev = generator.device if generator is not None else torch.device("cpu")
    oy = torch.randint(0, 2 * pad + 1, (batch_size,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (batch_size,), generator=generator, device=dev)
    if flip:
        fl = torch.randint(0, 2, (batch_size,), generator=generator, device=dev).bool()
    else:
        fl = torch.zeros(batch_size, dtype=torch.bool, device=dev)
    return oy, ox, fl


def random_crop_flip(
    images: torch.Tensor, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random zero-padded crop (+ flip) of every image in the batch, in one gather."""
    if images.shape[0] == 0 or (pad <= 0 and not flip):
        return images
    oy, ox, fl = random_crop_flip_params(images.shape[0], max(pad, 0), flip, generator)
    return crop_flip(images, oy, ox, fl, max(pad, 0))


def augment_batch(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    augment: bool,
    pad: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 batch -> normalised float batch, randomly cropped/flipped when ``augment``."""
    if augment:
        images = random_crop_flip(images, pad, flip, generator)
    return normalize(images, mean, std)
