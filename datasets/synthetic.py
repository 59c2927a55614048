"""synthetic-LT: procedurally drawn shapes on class-independent textured backgrounds.

Each class is one shape (circle, square, triangle, ...) drawn at a jittered position and scale in a
high-contrast colour over a random background (smoothed colour noise or random stripes). The
background and colour distributions are the same for every class, so only the shape tells the class.
``masks[N,H,W]`` marks the shape's pixels. Everything is seeded; generation is fast (no files).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from datasets.base import InMemoryDataset
from datasets.registry import Augmentation, register_dataset
from utils.errors import UserError

__all__ = ["SHAPES", "SyntheticShapes", "build_synthetic", "generate_shapes"]

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar", "diamond", "star", "x", "frame")

_SHIFT = 4  # cv2 fixed-point bits for sub-pixel coordinates
_SCALE = 1 << _SHIFT


def _pts(points) -> list[np.ndarray]:
    arr = np.round(np.asarray(points, dtype=np.float64) * _SCALE).astype(np.int32)
    return [arr.reshape(-1, 1, 2)]


def _fill(mask: np.ndarray, points) -> None:
    cv2.fillPoly(mask, _pts(points), 1, lineType=cv2.LINE_8, shift=_SHIFT)


def _disc(mask: np.ndarray, cx: float, cy: float, r: float, value: int = 1) -> None:
    cv2.circle(
        mask, (int(round(cx * _SCALE)), int(round(cy * _SCALE))), int(round(r * _SCALE)), value, -1,
        lineType=cv2.LINE_8, shift=_SHIFT,
    )


def _rect(cx: float, cy: float, hw: float, hh: float):
    return [(cx - hw, cy - hh), (cx + hw, cy - hh), (cx + hw, cy + hh), (cx - hw, cy + hh)]


def _draw_shape(mask: np.ndarray, shape: str, cx: float, cy: float, r: float) -> None:
    """Draw ``shape`` of half-size ``r`` centred at ``(cx, cy)`` into the uint8 ``mask`` (value 1)."""
    if shape == "circle":
        _disc(mask, cx, cy, r)
    elif shape == "square":
        _fill(mask, _rect(cx, cy, 0.85 * r, 0.85 * r))
    elif shape == "triangle":
        _fill(mask, [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)])
    elif shape == "cross":
        t = 0.32 * r
        _fill(mask, _rect(cx, cy, r, t))
        _fill(mask, _rect(cx, cy, t, r))
    elif shape == "ring":
        _disc(mask, cx, cy, r)
        _disc(mask, cx, cy, 0.5 * r, 0)
    elif shape == "bar":
        _fill(mask, _rect(cx, cy, r, 0.45 * r))
    elif shape == "diamond":
        _fill(mask, [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)])
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        _fill(mask, pts)
    elif shape == "x":
        t = 0.3 * r
        d = r / math.sqrt(2)
        for s in (1.0, -1.0):  # two thick diagonals as rotated rectangles
            ux, uy = d, s * d  # half-length direction
            nx, ny = -s * t / math.sqrt(2), t / math.sqrt(2)  # half-thickness normal
            _fill(
                mask,
                [(cx - ux + nx, cy - uy + ny), (cx + ux + nx, cy + uy + ny),
                 (cx + ux - nx, cy + uy - ny), (cx - ux - nx, cy - uy - ny)],
            )
    elif shape == "frame":
        _fill(mask, _rect(cx, cy, 0.85 * r, 0.85 * r))
        cv2.fillPoly(mask, _pts(_rect(cx, cy, 0.4 * r, 0.4 * r)), 0, lineType=cv2.LINE_8, shift=_SHIFT)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(shape)


def _backgrounds(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """float32 ``[N,3,H,W]`` in about [55, 200]: half smoothed colour noise, half random stripes."""
    base = rng.uniform(85.0, 170.0, size=(n, 3, 1, 1)).astype(np.float32)
    amp = rng.uniform(15.0, 30.0, size=(n, 1, 1, 1)).astype(np.float32)
    # smoothed colour noise: a coarse random grid upsampled bilinearly
    grid = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(n, 3, 5, 5)).astype(np.float32))
    noise = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False).numpy()
    # stripes: random orientation, period and phase; colours base +- amp per channel
    theta = rng.uniform(0.0, math.pi, size=(n, 1, 1))
    period = rng.uniform(4.0, 10.0, size=(n, 1, 1))
    phase = rng.uniform(0.0, 2 * math.pi, size=(n, 1, 1))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    freq = (2 * math.pi / period).astype(np.float32)
    wave = np.sin(
        xx * (np.cos(theta) * freq).astype(np.float32) + yy * (np.sin(theta) * freq).astype(np.float32)
        + phase.astype(np.float32)
    )  # [N,H,W]
    tint = rng.uniform(-1.0, 1.0, size=(n, 3, 1, 1)).astype(np.float32)
    stripes = wave[:, None] * tint
    use_stripes = (rng.random(n) < 0.5).reshape(n, 1, 1, 1)
    pattern = np.where(use_stripes, stripes, noise)
    return np.clip(base + amp * pattern, 0.0, 255.0)


def generate_shapes(
    labels: Sequence[int] | np.ndarray, image_size: int, seed: int | Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8[N,3,S,S]`` and masks ``bool[N,S,S]`` of shape ``SHAPES[label]`` (seeded)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n, s = labels.size, int(image_size)
    rng = np.random.default_rng(seed)
    bg = _backgrounds(rng, n, s)
    # shape geometry: side 38-50 % of the image, fully inside
    half = rng.uniform(0.19, 0.25, size=n) * s
    margin = 2.0  # keep a clear border of at least one pixel after rasterisation
    cx = half + margin + rng.random(n) * (s - 2 * half - 2 * margin)
    cy = half + margin + rng.random(n) * (s - 2 * half - 2 * margin)
    masks = np.zeros((n, s, s), dtype=np.uint8)
    for i in range(n):
        _draw_shape(masks[i], SHAPES[labels[i]], float(cx[i]), float(cy[i]), float(half[i]))
    # colour contrasting with the background brightness: bright on dark, dark on bright
    bright = bg.mean(axis=(1, 2, 3)) < 127.5
    fg = np.where(
        bright[:, None], rng.uniform(215.0, 255.0, size=(n, 3)), rng.uniform(0.0, 40.0, size=(n, 3))
    ).astype(np.float32)[:, :, None, None]
    img = np.where(masks[:, None].astype(bool), fg, bg)
    img += 5.0 * rng.standard_normal(size=img.shape, dtype=np.float32)  # mild sensor noise
    images = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return images, masks.astype(bool)


class SyntheticShapes(InMemoryDataset):
    """In-memory shapes dataset with aligned ``masks: bool[N,H,W]``."""

    _per_item_fields = ("images", "targets", "masks")

    def __init__(self, images, targets, masks, num_classes, mean, std, **kwargs) -> None:
        super().__init__(images, targets, num_classes, mean, std, **kwargs)
        self.masks = torch.as_tensor(masks, dtype=torch.bool)
        if self.masks.shape != (self.images.shape[0], *self.images.shape[2:]):
            raise ValueError("masks must be [N,H,W] aligned with images")

    @classmethod
    def generate(
        cls,
        num_classes: int,
        per_class: int,
        image_size: int,
        seed: int,
        split: str,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **kwargs,
    ) -> "SyntheticShapes":
        """``per_class`` images of each of the first ``num_classes`` shapes; ``split`` picks the stream."""
        check_synthetic(num_classes, per_class, image_size)
        stream = {"train": 0, "test": 1}[split]
        labels = np.repeat(np.arange(num_classes), per_class)
        images, masks = generate_shapes(labels, image_size, seed=[int(seed), stream])
        if mean is None or std is None:
            x = images.astype(np.float64) / 255.0
            mean = x.mean(axis=(0, 2, 3)).tolist()
            std = x.std(axis=(0, 2, 3)).tolist()
        return cls(
            torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(masks), num_classes,
            mean, std, class_names=list(SHAPES[:num_classes]), **kwargs,
        )


def check_synthetic(num_classes: int, per_class: int, image_size: int) -> None:
    if not 1 <= int(num_classes) <= len(SHAPES):
        raise UserError(
            f"dataset.synthetic.num_classes must be between 1 and {len(SHAPES)} (one shape per class: "
            f"{', '.join(SHAPES)}), got {num_classes}"
        )
    if int(per_class) < 1:
        raise UserError(f"dataset.synthetic train/test_per_class must be >= 1, got {per_class}")
    if int(image_size) < 16:
        raise UserError(f"dataset.synthetic.image_size must be >= 16, got {image_size}")


def build_synthetic(cfg: dict[str, Any], augmentation: Augmentation) -> tuple[SyntheticShapes, SyntheticShapes]:
    """Balanced ``(train, test)`` of ``dataset.synthetic``; the test set is normalised with the training
    set's statistics."""
    syn = cfg["synthetic"]
    num_classes, image_size, seed = int(syn["num_classes"]), int(syn["image_size"]), int(syn["seed"])
    train = SyntheticShapes.generate(num_classes, int(syn["train_per_class"]), image_size, seed, "train",
                                     augment=augmentation.augment, flip=augmentation.flip)
    test = SyntheticShapes.generate(num_classes, int(syn["test_per_class"]), image_size, seed, "test",
                                    mean=train.mean, std=train.std, augment=False)
    return train, test


register_dataset("synthetic-LT", build_synthetic)
