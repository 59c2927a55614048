"""Long-tailed class profiles and the seeded, reproducible choice of the training subset.

- exponential: ``n_i = floor(n_max * rho ** (-i / (C - 1)))`` (class 0 the largest)
- step: the first ``round(step_fraction * C)`` classes keep ``n_max``, the rest get ``floor(n_max / rho)``

Every class keeps at least one image. The chosen indices are saved to ``<run_dir>/train_subset.json``;
a resumed run re-reads them instead of drawing again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from utils.errors import UserError
from utils.json_files import write_json_atomic

__all__ = [
    "PROFILES",
    "SUBSET_FILENAME",
    "long_tail_counts",
    "select_long_tail_indices",
    "make_long_tail_subset",
]

PROFILES = ("exp", "step")
SUBSET_FILENAME = "train_subset.json"

# floor() tolerance so that e.g. 5000 * 100**-1 == 49.999999... still gives 50
_EPS = 1e-9


def _check_profile(rho: float, profile: str, step_fraction: float) -> None:
    if profile not in PROFILES:
        raise UserError(f"dataset.profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 1):
        raise UserError(f"dataset.imbalance (rho = n_max / n_min) must be a number >= 1, got {rho!r}")
    if profile == "step" and not (0.0 <= float(step_fraction) <= 1.0):
        raise UserError(f"dataset.step_fraction must be in [0, 1], got {step_fraction!r}")


def long_tail_counts(
    n_max: int, num_classes: int, rho: float, profile: str = "exp", step_fraction: float = 0.5
) -> list[int]:
    """Per-class image counts of the long-tailed training set (class 0 the largest)."""
    _check_profile(rho, profile, step_fraction)
    n_max = int(n_max)
    num_classes = int(num_classes)
    if n_max < 1 or num_classes < 1:
        raise UserError(f"need n_max >= 1 and at least one class, got n_max={n_max}, classes={num_classes}")
    rho = float(rho)
    if profile == "exp":
        if num_classes == 1:
            counts = [n_max]
        else:
            counts = [
                int(math.floor(n_max * rho ** (-i / (num_classes - 1)) * (1 + _EPS)))
                for i in range(num_classes)
            ]
    else:
        n_head = int(round(float(step_fraction) * num_classes))
        n_tail = int(math.floor(n_max / rho * (1 + _EPS)))
        counts = [n_max if i < n_head else n_tail for i in range(num_classes)]
    return [max(1, min(n_max, c)) for c in counts]


def select_long_tail_indices(targets: Sequence[int] | np.ndarray, counts: Sequence[int], seed: int) -> np.ndarray:
    """Sorted indices keeping ``counts[c]`` randomly chosen items of each class ``c`` (seeded)."""
    targets = np.asarray(targets).reshape(-1)
    rng = np.random.default_rng(int(seed))
    chosen = []
    for c, k in enumerate(counts):
        pool = np.flatnonzero(targets == c)
        if k > pool.size:
            raise UserError(f"class {c} has {pool.size} training images, cannot keep {k}")
        chosen.append(rng.choice(pool, size=int(k), replace=False))
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def make_long_tail_subset(
    targets: Sequence[int] | np.ndarray,
    num_classes: int,
    *,
    dataset_name: str,
    rho: float,
    profile: str,
    step_fraction: float,
    seed: int,
    run_dir: Path | str | None,
) -> tuple[np.ndarray, list[int]]:
    """Indices (into the balanced training set) and counts of the long-tailed subset.

    ``n_max`` is the smallest class count of the balanced set. With ``run_dir`` the choice is written
    to ``<run_dir>/train_subset.json``, or, if that file exists (a resumed run), read back and checked.
    """
    targets = np.asarray(targets).reshape(-1).astype(np.int64)
    original = np.bincount(targets, minlength=num_classes)[:num_classes]
    n_max = int(original.min()) if original.size else 0
    counts = long_tail_counts(n_max, num_classes, rho, profile, step_fraction)
    meta = {
        "dataset": dataset_name,
        "profile": profile,
        "imbalance": float(rho),
        "step_fraction": float(step_fraction),
        "subset_seed": int(seed),
        "num_classes": int(num_classes),
        "original_size": int(targets.size),
        "original_counts": [int(c) for c in original],
    }

    path = Path(run_dir) / SUBSET_FILENAME if run_dir is not None else None
    if path is not None and path.exists():
        return _load_subset(path, meta, targets, counts)

    indices = select_long_tail_indices(targets, counts, seed)
    if path is not None:
        write_json_atomic(path, {**meta, "counts": counts, "indices": indices.tolist()}, indent=None)
    return indices, counts


def _load_subset(path: Path, meta: dict[str, Any], targets: np.ndarray, counts: list[int]):
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        indices = np.asarray(saved["indices"], dtype=np.int64).reshape(-1)
        saved_counts = [int(c) for c in saved["counts"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is unreadable or malformed ({exc}); delete it or use a new run folder") from exc
    keys = list(meta) if meta["profile"] == "step" else [k for k in meta if k != "step_fraction"]
    diff = [k for k in keys if saved.get(k) != meta[k]]
    if diff:
        details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {meta[k]!r}" for k in diff)
        raise UserError(
            f"{path} was made for a different dataset setting ({details}); resume with the original "
            "dataset config or start a new run folder"
        )
    ok = (
        indices.size == len(set(indices.tolist()))
        and (indices.size == 0 or (indices.min() >= 0 and indices.max() < targets.size))
        and saved_counts == counts
    )
    if ok:
        got = np.bincount(targets[indices], minlength=len(counts))[: len(counts)].tolist()
        ok = got == counts
    if not ok:
        raise UserError(
            f"{path} does not match the training set (indices out of range, duplicated or with wrong "
            "per-class counts); delete it or start a new run folder"
        )
    return np.sort(indices), counts
