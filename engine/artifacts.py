"""Phase I's outputs as typed objects: the only module that reads or writes a backbone run's files.

A phase I run (``checkpoints/phase_i/<config>/<note>/``) is opened as a :class:`PhaseIRun` -- its saved
config, the datasets rebuilt from it (same long-tailed subset), its checkpoints and how ``best_model.pt``
was selected. Every backbone run (phase I, phase III fsa / none, the decoupled methods) writes its
checkpoints through :func:`checkpoint_payload`, and every reader checks them here
(:func:`read_backbone_checkpoint`, :func:`read_feature_classifier_checkpoint` for TailCalib's). Phase II's
outputs, which are built on such a run, are read and written by :mod:`engine.phase_ii_outputs`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datasets import DatasetBundle, build_datasets
from engine.methods import BASELINE, METHODS, PhaseIMethod
from models import LTModel, build_model
from utils.checkpoint import apply_weights, load_checkpoint
from utils.cli import script_command
from utils.config import load_config
from utils.errors import UserError
from utils.json_files import read_results
from utils.layout import RunPaths, output_root

__all__ = ["PhaseIRun", "open_phase_i_run", "build_phase_i_model", "checkpoint_payload", "phase_i_command",
           "load_backbone", "read_backbone_checkpoint", "read_feature_classifier_checkpoint", "FEATURE_CLASSIFIER_KIND",
           "is_int", "is_finite_number"]

FEATURE_CLASSIFIER_KIND = "feature-classifier"  # the "kind" of TailCalib / TailCalibX checkpoints


def is_int(value: Any) -> bool:
    """An int that is not a bool: a count or index field of a loaded file."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """An int or float (never a bool) that is finite: a numeric field of a loaded file."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def phase_i_command(config: str, note: str, *extra: str, backbone: str = BASELINE) -> str:
    """The command of the phase I run of method ``backbone`` (its --opts first, then ``extra``)."""
    opts = METHODS.get(backbone).selecting_opts()
    if opts and extra and extra[0] == "--opts":
        extra = extra[1:]
    return script_command("phase_i_train_or_test.py", config, note, *(["--opts", *opts] if opts else []), *extra)


def build_phase_i_model(cfg: dict, bundle: DatasetBundle, device: torch.device) -> LTModel:
    """The (untrained) model of a phase I config for its datasets."""
    m = cfg["model"]
    return build_model(m["arch"], bundle.num_classes, bundle.in_channels, classifier=m["classifier"], scale=m["scale"],
                       learn_scale=m["learn_scale"]).to(device)


def checkpoint_payload(model: LTModel, cfg: dict, bundle: DatasetBundle, run_name: str, **extra) -> dict:
    """A backbone + classifier checkpoint of run ``run_name``: everything a later phase needs to rebuild and
    check the model; tensors and plain values only."""
    return {
        "phase": run_name,  # the file format's key (saved checkpoints and results.json keep it)
        "model": model.state_dict(),
        "arch": model.arch,
        "num_classes": model.num_classes,
        "in_channels": model.in_channels,
        "dataset": bundle.name,
        "train_counts": list(bundle.train_counts),
        "config": cfg,
        **extra,
    }


def read_backbone_checkpoint(path: Path, produced_by: str) -> dict:
    """The payload of a backbone + classifier checkpoint (phase I, phase III fsa / none: what
    :func:`checkpoint_payload` writes); any other file is a UserError naming it and what it is not."""
    payload = load_checkpoint(path, produced_by=produced_by)
    state = payload.get("model")
    bad = [key for key, ok in (
        ("model", isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())),
        ("arch", isinstance(payload.get("arch"), str)),
        *((key, is_int(payload.get(key))) for key in ("num_classes", "in_channels"))) if not ok]
    if bad:
        hint = (" It is a TailCalib checkpoint, a classifier on transformed pooled features: evaluate it with the "
                "generator that made it (phase III with --opts finetune.generator=... phase=test)."
                if payload.get("kind") == FEATURE_CLASSIFIER_KIND else "")
        raise UserError(f"{path} is not a backbone + classifier checkpoint (phase I, or phase III fsa / none): its "
                        f"{', '.join(repr(k) for k in bad)} {'is' if len(bad) == 1 else 'are'} missing or "
                        f"malformed.{hint} Pass a best_model.pt or last.pt of such a run.")
    return payload


def read_feature_classifier_checkpoint(path: Path, produced_by: str, generator: str) -> dict:
    """The payload of a TailCalib / TailCalibX checkpoint (``fc`` on transformed pooled features, see
    engine.phase_iii_features); any other file is a UserError naming it and what it is not."""
    payload = load_checkpoint(path, produced_by=produced_by)
    fc, transform = payload.get("fc"), payload.get("feature_transform")
    bad = [key for key, ok in (
        ("kind", payload.get("kind") == FEATURE_CLASSIFIER_KIND),
        # a bias-free head (LDAM's normed classifier) saves none
        ("fc", isinstance(fc, dict) and isinstance(fc.get("weight"), torch.Tensor) and fc["weight"].ndim == 2
         and isinstance(fc.get("bias", torch.zeros(0)), torch.Tensor)),
        ("feature_transform", isinstance(transform, dict) and is_finite_number(transform.get("tukey"))
         and is_finite_number(transform.get("eps")) and isinstance(transform.get("normalize"), bool)),
        ("arch", isinstance(payload.get("arch"), str)),
        *((key, is_int(payload.get(key))) for key in ("num_classes", "in_channels"))) if not ok]
    if bad:
        backbone = (" It is a backbone + classifier checkpoint: evaluate it with phase I, or with phase III "
                    "finetune.generator=fsa / none." if "model" in payload else "")
        raise UserError(f"{path} is not a TailCalib feature-classifier checkpoint: its {', '.join(repr(k) for k in bad)} "
                        f"{'is' if len(bad) == 1 else 'are'} missing or malformed, so finetune.generator={generator} "
                        f"cannot evaluate it.{backbone} Pass a best_model.pt or last.pt of a {generator} run.")
    return payload


def load_backbone(path: Path, cfg: dict, bundle: DatasetBundle, device: torch.device, produced_by: str) -> LTModel:
    """The model of phase I config `cfg` with the backbone checkpoint at `path` loaded (and checked)."""
    payload = read_backbone_checkpoint(path, produced_by)
    if payload.get("dataset") not in (None, bundle.name):
        raise UserError(
            f"Checkpoint {path} was trained on dataset '{payload.get('dataset')}', but this run uses "
            f"'{bundle.name}'. Use the checkpoint of the matching config."
        )
    model = build_phase_i_model(cfg, bundle, device)
    apply_weights(model, payload, path)
    return model


@dataclass
class PhaseIRun:
    """A phase I run that a later stage builds on."""

    paths: RunPaths          # phase I paths (checkpoint_dir = the phase I run folder)
    cfg: dict                # its resolved config (config.yaml)
    bundle: DatasetBundle    # built with run_dir = the phase I run, so its train_subset.json is reused
    method: PhaseIMethod     # the phase I method it trained (the backbone of the phases built on it)

    @property
    def config_path(self) -> Path:
        return self.paths.config_file

    @property
    def hr(self) -> float:
        """The head / tail share of every phase built on this run (one hr: phase I's eval.hr)."""
        return self.cfg["eval"]["hr"]

    def command(self, *extra: str) -> str:
        return phase_i_command(self.paths.config, self.paths.note, *extra, backbone=self.method.id)

    def load_model(self, device: torch.device, checkpoint: Path | None = None, produced_by: str | None = None) -> LTModel:
        """The model with `checkpoint` (default: the run's best_model.pt) loaded."""
        return load_backbone(checkpoint or self.paths.best, self.cfg, self.bundle, device, produced_by or self.command())

    def selection_of(self, checkpoint: Path) -> dict | None:
        """How the model at `checkpoint` was chosen (the run's `checkpoint_selection`), for the records
        of the phases that start from it; None for a file other than the run's best_model.pt."""
        results = read_results(self.paths.results)
        if results is None or Path(checkpoint).resolve() != self.paths.best.resolve():
            return None
        return results.get("checkpoint_selection")


def open_phase_i_run(config: str, note: str, root: Path | None = None, *, needed_by: str = "phase II",
                     need_checkpoint: bool = False, backbone: str = BASELINE) -> PhaseIRun:
    """Find the phase I run of (config, note) of phase I method ``backbone`` and rebuild its datasets;
    UserError naming the phase I command when it (or, with `need_checkpoint`, its best_model.pt) does
    not exist."""
    method = METHODS.get(backbone)
    paths = RunPaths(method.folder, config, note, output_root() if root is None else Path(root))
    config_path = paths.config_file
    if not config_path.is_file() or (need_checkpoint and not paths.best.is_file()):
        missing = config_path if not config_path.is_file() else paths.best
        raise UserError(
            f"{needed_by} needs the {method.label} phase I run of config '{config}' (note '{note}'), but "
            f"{missing} does not exist. Run phase I first: {phase_i_command(config, note, backbone=backbone)}"
        )
    cfg = load_config(str(config_path), "phase_i", saved=True)
    return PhaseIRun(paths=paths, cfg=cfg, bundle=build_datasets(cfg["dataset"], paths.checkpoint_dir), method=method)

