"""Grad-CAM overlays and class-specific / class-generic masks as image grids (OpenCV, BGR uint8).

A grid has one row per sample and four square panels of ``panel`` pixels per row, then one colour bar
(``colour_bar_width(panel)`` pixels wide) that keys the heatmap's colours to the CAM value in [0, 1]:

    image | Grad-CAM heatmap (JET) blended on the image | class-specific mask (M >= ts) | class-generic mask (M < tg) | bar

The CAM is upsampled to the panel size with ``cv2.resize(..., INTER_LINEAR)`` for the heatmap. The
masks are the positions the method actually uses (CAM-layer resolution), shown as blocks
(nearest-neighbour upsampling): kept positions show the image, the rest is dimmed and tinted.
1-channel images are shown as gray. Small images are upscaled so the grid is legible. Labels are white
text drawn once on a dark band, so they stay crisp on any image.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

__all__ = ["to_display_images", "heatmap_overlay", "mask_panel", "label_panel", "sample_row", "render_grid",
           "colour_bar", "colour_bar_width", "PANEL_TITLES"]

PANEL_TITLES = ("image", "Grad-CAM", "specific", "generic")
_SPECIFIC_TINT = np.array([60, 200, 60], dtype=np.float32)   # BGR green
_GENERIC_TINT = np.array([200, 120, 40], dtype=np.float32)   # BGR blue


def to_display_images(x: Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """Normalised float images ``[B,C,H,W]`` -> uint8 BGR ``[B,H,W,3]`` (1 channel -> gray).

    With ``mean``/``std`` the dataset normalisation is undone; without, each image is min-max
    stretched.
    """
    x = x.detach().float().cpu()
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        x = (x * s + m).clamp(0, 1)
    else:
        lo = x.flatten(1).amin(1).view(-1, 1, 1, 1)
        hi = x.flatten(1).amax(1).view(-1, 1, 1, 1)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    img = (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    elif img.shape[-1] == 3:
        img = img[..., ::-1]  # RGB -> BGR for OpenCV
    else:
        img = np.repeat(img[..., :1], 3, axis=-1)
    return np.ascontiguousarray(img)


def _upscale(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    interp = cv2.INTER_NEAREST if size >= max(h, w) else cv2.INTER_AREA
    return cv2.resize(image, (size, size), interpolation=interp)


def heatmap_overlay(image_bgr: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """JET heatmap of ``cam`` (values in [0,1], any resolution) resized with INTER_LINEAR to the
    image size and blended on ``image_bgr`` (uint8 ``[H,W,3]``)."""
    h, w = image_bgr.shape[:2]
    cam_up = cv2.resize(cam.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.clip(cam_up * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(heat, alpha, image_bgr, 1.0 - alpha, 0.0)


def mask_panel(image_bgr: np.ndarray, mask: np.ndarray, tint: np.ndarray) -> np.ndarray:
    """Image where ``mask`` (bool, CAM resolution) holds, dimmed and tinted elsewhere."""
    h, w = image_bgr.shape[:2]
    m = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    img = image_bgr.astype(np.float32)
    kept = 0.75 * img + 0.25 * tint
    dimmed = 0.25 * img
    out = np.where(m[..., None], kept, dimmed)
    return np.clip(out, 0, 255).astype(np.uint8)


_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _font_scale(panel: int) -> float:
    return max(0.3, panel / 300.0)


def label_panel(panel: np.ndarray, text: str, line: int = 0) -> np.ndarray:
    """White text on a dark band in the panel's top-left corner, line ``line`` (in place). The text is drawn
    once: an outline drawn under it as a second, thicker copy reads as a ghosted double at small sizes."""
    scale = _font_scale(panel.shape[0])
    (width, height), baseline = cv2.getTextSize(text, _FONT, scale, 1)
    pitch = height + baseline + 3
    top = line * pitch
    band = panel[top:top + pitch, :min(width + 6, panel.shape[1])]
    band[:] = (band.astype(np.float32) * 0.35).astype(np.uint8)  # darkened, not blacked out: the image shows through
    cv2.putText(panel, text, (3, top + height + 1), _FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return panel


def colour_bar_width(panel: int) -> int:
    """The width in pixels of a grid's colour bar for panels of ``panel`` pixels."""
    return max(36, panel // 3)


def colour_bar(height: int, panel: int) -> np.ndarray:
    """The key of the heatmap panel: JET colours from CAM 1 (top) to 0 (bottom) with ticks 1, 0.5, 0 and the
    title 'CAM', on white, ``height`` x ``colour_bar_width(panel)`` uint8 BGR."""
    width = colour_bar_width(panel)
    scale = _font_scale(panel) * 0.9
    (_, text_h), baseline = cv2.getTextSize("0.5", _FONT, scale, 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    top, bottom = text_h + baseline + 6, height - text_h // 2 - 3
    if bottom - top < 8:
        return out  # too short to draw a key in
    strip_w = max(6, width // 4)
    values = np.linspace(255.0, 0.0, bottom - top).astype(np.uint8)[:, None]
    out[top:bottom, 3:3 + strip_w] = np.repeat(cv2.applyColorMap(values, cv2.COLORMAP_JET), strip_w, axis=1)
    cv2.putText(out, "CAM", (2, text_h + 2), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    for value, y in ((1.0, top), (0.5, (top + bottom) // 2), (0.0, bottom - 1)):
        cv2.line(out, (3 + strip_w, y), (6 + strip_w, y), (0, 0, 0), 1)
        cv2.putText(out, f"{value:g}", (8 + strip_w, y + text_h // 2), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def sample_row(image_bgr: np.ndarray, cam: np.ndarray, ts: float, tg: float, *, panel: int = 128,
               title: str = "", subtitle: str = "") -> np.ndarray:
    """The four panels of one sample side by side: uint8 ``[panel, 4*panel, 3]``."""
    img = _upscale(image_bgr, panel)
    specific, generic = cam >= ts, cam < tg
    panels = [
        img.copy(),
        heatmap_overlay(img, cam),
        mask_panel(img, specific, _SPECIFIC_TINT),
        mask_panel(img, generic, _GENERIC_TINT),
    ]
    label_panel(panels[0], title)
    if subtitle:
        label_panel(panels[0], subtitle, line=1)
    label_panel(panels[1], "Grad-CAM")
    label_panel(panels[2], f"specific M>={ts:g}")
    label_panel(panels[2], f"{specific.mean() * 100:.0f}% of map", line=1)
    label_panel(panels[3], f"generic M<{tg:g}")
    label_panel(panels[3], f"{generic.mean() * 100:.0f}% of map", line=1)
    return np.concatenate(panels, axis=1)


def render_grid(images_bgr: np.ndarray, cams: np.ndarray | Tensor, ts: float, tg: float, *, panel: int = 128,
                titles: Sequence[str] | None = None, subtitles: Sequence[str] | None = None) -> np.ndarray:
    """Rows of :func:`sample_row` stacked, then the colour bar: uint8 BGR
    ``[rows*panel, 4*panel + colour_bar_width(panel), 3]``."""
    if isinstance(cams, Tensor):
        cams = cams.detach().float().cpu().numpy()
    rows = [
        sample_row(images_bgr[i], cams[i], ts, tg, panel=panel,
                   title=titles[i] if titles else "", subtitle=subtitles[i] if subtitles else "")
        for i in range(len(images_bgr))
    ]
    if not rows:
        return np.zeros((0, 4 * panel + colour_bar_width(panel), 3), dtype=np.uint8)
    grid = np.concatenate(rows, axis=0)
    return np.concatenate([grid, colour_bar(grid.shape[0], panel)], axis=1)
