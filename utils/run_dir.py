"""Where each phase's outputs live, and the rules that keep finished runs safe.

checkpoints/<phase>/<config>/<note>/   checkpoints, config.yaml, log.txt, results.json
run_summary/<phase>/<config>/<note>/   TensorBoard events
features/<config>/<note>/              phase II outputs
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

RESULTS_FILE = "results.json"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best_model.pt"


@dataclass(frozen=True)
class RunPaths:
    phase: str
    config: str
    note: str
    root: Path = Path(".")

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints" / self.phase / self.config / self.note

    @property
    def summary_dir(self) -> Path:
        return self.root / "run_summary" / self.phase / self.config / self.note

    @property
    def features_dir(self) -> Path:
        return self.root / "features" / self.config / self.note

    @property
    def last(self) -> Path:
        return self.checkpoint_dir / LAST_CHECKPOINT

    @property
    def best(self) -> Path:
        return self.checkpoint_dir / BEST_CHECKPOINT

    @property
    def results(self) -> Path:
        return self.checkpoint_dir / RESULTS_FILE

    def sibling(self, phase: str) -> "RunPaths":
        """The run of another phase for the same config name and note."""
        return RunPaths(phase, self.config, self.note, self.root)


def read_results(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_finished(paths: RunPaths) -> bool:
    results = read_results(paths.results)
    return bool(results and results.get("finished"))


def prepare_run(paths: RunPaths, *, resume: bool, overwrite: bool, command: str) -> str:
    """Decide how a training run starts: 'fresh', 'resume' or 'finished' (resume of a done run).

    A finished run is never replaced without `overwrite`; an interrupted one needs `resume` or
    `overwrite`, so that no work is thrown away by accident.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pass only one of them.")
    ckpt_dir = paths.checkpoint_dir
    has_state = paths.last.is_file() or paths.results.is_file()
    if overwrite:
        for folder in (ckpt_dir, paths.summary_dir):
            if folder.exists():
                shutil.rmtree(folder)
        return "fresh"
    if resume:
        if is_finished(paths):
            return "finished"
        if not paths.last.is_file():
            raise UserError(
                f"--resume: nothing to resume in {ckpt_dir} (no {LAST_CHECKPOINT}). Start the run without "
                f"--resume: {command}"
            )
        return "resume"
    if has_state:
        if is_finished(paths):
            raise UserError(
                f"A finished run already exists in {ckpt_dir}. It is not overwritten silently: pass "
                f"--overwrite to replace it, or --note NAME to start a separate experiment."
            )
        raise UserError(
            f"An interrupted run exists in {ckpt_dir}. Pass --resume to continue it, --overwrite to "
            f"start again from scratch, or --note NAME for a separate experiment."
        )
    return "fresh"


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
