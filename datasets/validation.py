"""The validation split that every selection uses, so the reported test images choose nothing.

``dataset.val.source``:
- ``none``: no validation split; nothing is selected (the final model is used everywhere);
- ``train``: a stratified share ``dataset.val.fraction`` of each class's long-tailed training images
  is held out (each class keeps at least one image for training);
- ``test``: each class's test images are split into a validation part and the reported part.

The split is a pure function of (labels, fraction, seed): stratified by class, each class's share
rounded to the nearest image. The chosen positions are written to ``val_split.json`` in the phase I
run folder, and checked when a later phase rebuilds the data from that folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from utils.errors import UserError
from utils.json_files import write_json_atomic

VAL_SOURCES = ("none", "train", "test")
VAL_SPLIT_FILENAME = "val_split.json"


def stratified_split(targets: torch.Tensor, num_classes: int, fraction: float, seed: int,
                     keep_one: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept positions, validation positions)``, both sorted: ``round(fraction * n_c)`` random
    images of each class go to validation (at most ``n_c - 1`` with ``keep_one``)."""
    targets = targets.cpu().long()
    counts = torch.bincount(targets, minlength=num_classes)
    n_val = torch.floor(counts.double() * fraction + 0.5).long()
    if keep_one:
        n_val = torch.minimum(n_val, (counts - 1).clamp_min(0))
    # a random order inside each class: sort by a random key, then (stably) by class
    keys = torch.rand(len(targets), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    order = torch.argsort(keys)
    order = order[torch.argsort(targets[order], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(targets)) - starts[targets[order]]
    is_val = torch.zeros(len(targets), dtype=torch.bool)
    is_val[order] = rank < n_val[targets[order]]
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def split_validation(train, test, val_cfg: dict, run_dir: Path | None):
    """``(train, val, test)`` after carving the validation split named by ``val_cfg`` (val None for
    ``none``); the datasets need ``subset(positions)``."""
    source, fraction, seed = val_cfg["source"], float(val_cfg["fraction"]), int(val_cfg["seed"])
    if source == "none":
        return train, None, test
    if source not in VAL_SOURCES:
        raise UserError(f"dataset.val.source must be one of {', '.join(VAL_SOURCES)}; got {source!r}.")
    if not 0.0 < fraction < 1.0:
        raise UserError(f"dataset.val.fraction must be between 0 and 1 (exclusive); got {fraction}.")
    pool = train if source == "train" else test
    kept, val = stratified_split(pool.targets, pool.num_classes, fraction, seed, keep_one=source == "train")
    if len(val) == 0:
        raise UserError(f"dataset.val.fraction={fraction} of the {source} set leaves no validation image: raise it.")
    if run_dir is not None:
        _record(Path(run_dir) / VAL_SPLIT_FILENAME, {"source": source, "fraction": fraction, "seed": seed,
                                                      "num_val": len(val), "val_positions": val.tolist()})
    if source == "train":
        return pool.subset(kept), pool.subset(val), test
    return train, pool.subset(val), pool.subset(kept)


def _record(path: Path, split: dict) -> None:
    """Write the split next to the run, or check that the one written there is the same."""
    if not path.exists():
        write_json_atomic(path, split)
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); delete it or start a new run folder.") from exc
    if saved != split:
        raise UserError(f"{path} records another validation split (source {saved.get('source')}, fraction "
                        f"{saved.get('fraction')}, seed {saved.get('seed')}) than this config makes (source "
                        f"{split['source']}, fraction {split['fraction']}, seed {split['seed']}): use the run's own "
                        f"dataset.val settings, or start a new run folder.")
