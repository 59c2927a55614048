"""Checkpoints: written atomically, loadable with `torch.load(weights_only=True)`.

A checkpoint holds only tensors and plain Python values (no pickled objects), so that loading
one never executes code.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from utils.errors import UserError

FORMAT = "fsa-lt/1"


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over `path`.

    A write that fails (a full disk: torch reports it as a RuntimeError) removes the temporary file and
    is a UserError; the checkpoint already at `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save({"format": FORMAT, **payload}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
        raise UserError(
            f"cannot write the checkpoint {path}: {reason}. Nothing is lost: {kept}. Check that the disk has free "
            f"space and the folder is writable, then run the same command again with --resume."
        ) from exc


def load_checkpoint(path: Path, *, produced_by: str) -> dict:
    """Load with `weights_only=True`; a missing or damaged file is a UserError naming the fix."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a checkpoint file: pass a file inside it, e.g. {path / 'best_model.pt'}.")
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist. It is produced by: {produced_by}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as exc:
        raise UserError(f"Checkpoint {path} cannot be read: permission denied. Make it readable (chmod u+r) "
                        f"and run again.") from exc
    # a truncated file fails in torch's zip reader as any of these, depending on where it was cut
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        raise UserError(
            f"Checkpoint {path} is truncated or corrupt and cannot be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Re-create it by running its phase again, replacing the run "
            f"that holds it: {produced_by} --overwrite"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not an FSA-LT checkpoint (no '{FORMAT}' format tag).")
    return payload


def check_compatible(payload: dict, path: Path, *, arch: str, num_classes: int, in_channels: int) -> None:
    """Fail with a clear message before a state-dict load would fail with a cryptic one."""
    found = (payload.get("arch"), payload.get("num_classes"), payload.get("in_channels"))
    wanted = (arch, num_classes, in_channels)
    if found != wanted:
        raise UserError(
            f"Checkpoint {path} was made for arch={found[0]}, {found[1]} classes, {found[2]} input "
            f"channels, but this run builds arch={arch}, {num_classes} classes, {in_channels} input "
            f"channels. Use the checkpoint of the matching config, or change model/dataset settings."
        )


def load_model_state(model: nn.Module, state: dict, path: Path) -> None:
    """Strict load: every key must match (a silent partial load hides real mistakes)."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"Weights in {path} do not fit the model: {first}") from exc


def apply_weights(model: nn.Module, payload: dict, path: Path) -> None:
    """Put a checkpoint's backbone + classifier weights into `model`, after checking they fit it.

    `model` needs the `arch`, `num_classes` and `in_channels` attributes every LTModel has.
    """
    if "model" not in payload:
        raise UserError(
            f"{path} holds no backbone + classifier weights (kind: {payload.get('kind', 'unknown')}); a TailCalib "
            f"checkpoint is a classifier on transformed pooled features: evaluate it with the generator that made it "
            f"(--opts finetune.generator=...)."
        )
    check_compatible(payload, path, arch=model.arch, num_classes=model.num_classes, in_channels=model.in_channels)
    load_model_state(model, payload["model"], path)
