"""Phase III: fine-tune on top of the phase I model with one phase III method of the method table.

``finetune.generator`` and the script's mode (online / offline) select the method
(:data:`engine.methods.METHODS`); this module opens what the method consumes -- the phase I run and
model, phase II's split / confusing classes and, for offline methods, its feature store -- checks
them, and hands them to the method (``method.run(inputs)``: its family's runner, ``engine.phase_iii_maps``,
``engine.phase_iii_features`` or ``engine.phase_iii_decoupled``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from datasets import DatasetBundle
from engine.accel import Accel
from engine.artifacts import PhaseIRun, open_phase_i_run, phase_i_command, read_backbone_checkpoint
from engine.phase_ii_outputs import PhaseIIOutputs, open_store, phase_ii_command, phase_ii_paths, read_phase_ii
from engine.loops import EvalSets
from engine.methods import METHODS, MODES, Arm, PhaseIIIMethod
from engine.recorder import open_run, start_recording, write_test_results
from fsa.batch_composition import PAPER_ROWS_PER_IMAGE, auto_iterations, batch_size
from utils.checkpoint import apply_weights
from utils.cli import RunSpec
from utils.config import config_name, load_config
from utils import distributed
from utils.errors import UserError
from utils.layout import RunPaths, check_run_name
from utils.run_lock import lock_run

if TYPE_CHECKING:
    from fsa.feature_store import FeatureStore
    from models import LTModel


@dataclass
class PhaseIIIInputs:
    """Everything a phase III runner starts from, opened and checked."""

    spec: RunSpec
    cfg: dict                     # the resolved phase III config
    arm: Arm                      # the method on its backbone
    paths: RunPaths               # this run's folders
    phase_i: PhaseIRun
    p2: PhaseIIOutputs
    store: "FeatureStore | None"  # phase II's feature store (methods that consume it)
    model: "LTModel"              # the phase I model (its checkpoint: p2.checkpoint)
    device: torch.device
    accel: Accel
    eval_sets: EvalSets

    @property
    def method(self) -> PhaseIIIMethod:
        return self.arm.method

    @property
    def bundle(self) -> DatasetBundle:
        return self.phase_i.bundle

    @property
    def hr(self) -> float:
        return self.p2.hr

    @property
    def upstream_note(self) -> str:
        """The note whose phase I run and phase II outputs this run reads (``--upstream-note``, else its own)."""
        return upstream_note(self.spec)

    @property
    def command(self) -> str:
        """The command of this run, with its --upstream-note and --opts (what a message tells the user to run
        again)."""
        upstream = ["--upstream-note", self.upstream_note] if self.upstream_note != self.paths.note else []
        return self.arm.command(self.paths.config, self.paths.note, *upstream, *self.spec.opts_args)

    def open_run(self):
        """Apply the overwrite / resume rules (:func:`engine.recorder.open_run`), then record in
        `sources.yaml` which phase I checkpoint and phase II outputs the run is built from."""
        mode, logger = open_run(self.paths, self.cfg, resume=self.spec.resume, overwrite=self.spec.overwrite,
                                command=self.command)
        if mode != "finished" and distributed.context().is_main:
            (self.paths.checkpoint_dir / "sources.yaml").write_text(yaml.safe_dump({
                "phase_i_checkpoint": str(self.p2.checkpoint), "phase_ii_features": str(self.p2.folder),
                "upstream_note": self.upstream_note, "mode": self.method.mode}))
        return mode, logger

    def start_recording(self, run_mode: str, logger, payload, *, restore, optimizer: torch.optim.Optimizer | None,
                        step_name: str, total_steps: int, scaler: torch.amp.GradScaler | None = None):
        """:func:`engine.recorder.start_recording` for this run (its folders, command and selection rule)."""
        return start_recording(self.paths, run_mode, logger, payload, restore=restore, optimizer=optimizer,
                               scaler=scaler, step_name=step_name, total_steps=total_steps, command=self.command,
                               select_on_val=self.bundle.val is not None)

    @property
    def test_checkpoint(self) -> Path:
        """What ``phase: test`` evaluates: --checkpoint, else this run's best_model.pt."""
        return Path(self.spec.checkpoint) if self.spec.checkpoint else self.paths.best

    def test_model_checkpoint(self) -> dict:
        """``phase: test`` of a method whose checkpoints are backbone + classifier models: load
        :attr:`test_checkpoint` into the model, evaluate it on the test set, write test_results.json."""
        ckpt = self.test_checkpoint
        apply_weights(self.model, read_backbone_checkpoint(ckpt, self.command), ckpt)
        return write_test_results(self.paths, ckpt, self.eval_sets.test_report(self.model, self.bundle.train_counts,
                                                                               self.hr, accel=self.accel))

    def records(self) -> dict:
        """What every phase III results.json says about the method and its inputs."""
        return {"method": self.method.id, "arm": self.arm.id, "backbone": self.arm.backbone.id,
                "mode": self.method.mode, "generator": self.method.generator,
                "method_options": self.method.options(self.cfg),
                "tail_classes": self.p2.tail, "head_classes": self.p2.head,
                "processes": distributed.context().world_size, "upstream_note": self.upstream_note,
                "phase_i_checkpoint": str(self.p2.checkpoint),
                "phase_i_checkpoint_sha256": self.p2.checkpoint_sha256,
                "phase_i_checkpoint_selection": self.phase_i.selection_of(self.p2.checkpoint),
                **self.bundle.split_sizes()}


def upstream_note(spec: RunSpec) -> str:
    """The note whose phase I run and phase II outputs a phase III run of ``spec`` reads: ``--upstream-note``
    (checked as a run name), else the run's own ``--note``."""
    if spec.upstream_note is None:
        return spec.note
    return check_run_name(spec.upstream_note, "--upstream-note")


def _resolve_iterations(cfg: dict, train_images: int) -> None:
    """`finetune.iterations: null` -> the paper's budget for this training set, written into `cfg` (so the
    run's config.yaml, its --resume check and results.json hold the number), and said once."""
    f = cfg["finetune"]
    if f["iterations"] is None:
        f["iterations"] = auto_iterations(train_images, f["nt"], f["na"])
        if distributed.context().is_main:
            print(f"note: finetune.iterations = {f['iterations']} (null: the paper's {PAPER_ROWS_PER_IMAGE:.0f} rows "
                  f"per training image for {train_images} images at batch {batch_size(f['nt'], f['na'])}); set "
                  f"finetune.iterations to choose another budget.", file=sys.stderr)


def run(spec: RunSpec, mode: str) -> dict:
    assert mode in MODES
    cfg = load_config(spec.config, "phase_iii", list(spec.opts))
    name = config_name(spec.config)
    method = METHODS.phase_iii(mode, cfg["finetune"]["generator"], name, spec.note)
    backbone = cfg["backbone"]
    arm = METHODS.arm(method.id, backbone)
    paths = RunPaths(arm.folder, name, spec.note)
    # the phase I run and phase II outputs read: the run's own note's, or those of --upstream-note
    upstream = upstream_note(spec)
    features_dir = phase_ii_paths(name, upstream, backbone).features_dir
    needed_by = f"phase III ({arm.label})"
    given = " given as --upstream-note" if upstream != spec.note else ""
    # cheap checks first: a missing phase I or phase II run is named before any device or lock
    phase_i_paths = RunPaths(arm.backbone.folder, name, upstream)
    if not (phase_i_paths.checkpoint_dir / "config.yaml").is_file() or not phase_i_paths.best.is_file():
        raise UserError(f"{needed_by} needs the {arm.backbone.label} phase I run of config '{name}', note '{upstream}'"
                        f"{given} ({phase_i_paths.checkpoint_dir}), which has no best_model.pt. Run phase I first, then "
                        f"phase II: {phase_i_command(name, upstream, backbone=backbone)}")
    if not (features_dir / "results.json").is_file():
        raise UserError(f"No phase II outputs in {features_dir} (note '{upstream}'{given}). Run phase II first: "
                        f"{phase_ii_command(name, upstream, backbone=backbone)}")
    device = distributed.setup_device(spec.device)
    lock_run(paths)
    accel = Accel.from_config(cfg["accel"], device)
    phase_i = open_phase_i_run(name, upstream, needed_by=needed_by, need_checkpoint=True, backbone=backbone)
    _resolve_iterations(cfg, len(phase_i.bundle.train))
    p2 = read_phase_ii(features_dir, phase_i)
    store = open_store(features_dir, name, upstream, backbone) if method.reads_store else None
    model = phase_i.load_model(device, p2.checkpoint)
    accel.prepare_model(model)
    inputs = PhaseIIIInputs(spec, cfg, arm, paths, phase_i, p2, store, model, device, accel,
                            EvalSets.of(phase_i.bundle, cfg["eval"]["batch_size"], device))
    return method.run(inputs)
