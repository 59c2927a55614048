"""Per-evaluation bookkeeping shared by the training phases: log line, TensorBoard scalars,
`best_model.pt` / `last.pt` / periodic checkpoints, and `results.json` (unfinished until the end).

A "step" is an epoch in phase I and an iteration in phase III.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from engine.metrics import SCALAR_KEYS, summary_line
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import config_differences, dump_config, read_yaml
from utils.errors import UserError
from utils.json_files import write_json_atomic
from utils.layout import RunPaths
from utils import distributed
from utils.logging import log_scalars, open_summary_writer, setup_logger, silent_logger
from utils.provenance import begin_run, collect
from utils.run_dir import prepare_run, run_started


SPEED_SETTINGS = "accel."  # may change on --resume (e.g. moving the run to a GPU), except under determinism


def saved_config_differences(saved: dict, cfg: dict) -> list[str]:
    """The settings in which `cfg` differs from the config a run saved, as far as they change its results:
    not the speed settings, unless `cfg` asks for determinism (a bit-identical continuation, which other
    kernels would break). A config saved before the `determinism` key existed ran without it."""
    diffs = config_differences({"determinism": False, **saved}, cfg)
    return diffs if cfg.get("determinism") else [d for d in diffs if not d.startswith(SPEED_SETTINGS)]


# a balanced score: a validation split held out of the long-tailed training set is long-tailed too
SELECTION_METRIC = "mean_class_acc"


class RunRecorder:
    """`best_model.pt` is the selected model: the best `SELECTION_METRIC` on the validation split when
    the run has one (`select_on_val`), else the latest evaluation, so that the final model is used. The
    reported test numbers are those of the selected model; test images never choose anything."""

    def __init__(self, paths: RunPaths, logger: logging.Logger, payload: Callable[..., dict], *, step_name: str,
                 total_steps: int, select_on_val: bool, optimizer: torch.optim.Optimizer | None,
                 scaler: torch.amp.GradScaler | None = None, resumed_state: dict | None = None):
        """`payload(**extra)` returns the checkpoint dict of the current model (plain values only);
        `last.pt` adds the optimizer's (and the fp16 GradScaler's) state for --resume (no optimizer: a
        method that chooses rather than trains).

        Only rank 0 of a torchrun job records; on the other ranks every method is a no-op."""
        self.enabled = distributed.context().is_main
        self.paths, self.logger, self.payload = paths, logger, payload
        self.optimizer, self.scaler = optimizer, scaler
        self.step_name, self.total_steps = step_name, total_steps
        self.selection_by = "val" if select_on_val else "final"
        self.resumed = resumed_state is not None
        state = resumed_state or {}
        self.selected: dict = state.get("selected", {})  # step, val score, test report of best_model.pt
        self.history: list[dict] = state.get("history", [])
        self.elapsed = state.get("elapsed_s", 0.0)
        self.writer = open_summary_writer(paths.summary_dir) if self.enabled else None

    def state(self) -> dict:
        return {"selected": self.selected, "history": self.history, "elapsed_s": self.elapsed}

    def record(self, step: int, stats: dict, report: dict | None, seconds: float, periodic: bool = False,
               val_report: dict | None = None) -> None:
        """Book step `step` (1-based, completed): `stats` are training numbers, `report` a test evaluation
        or None, `val_report` the validation evaluation that goes with it (runs with a validation split)."""
        if not self.enabled:
            return
        if report is not None and (val_report is None) == (self.selection_by == "val"):
            raise ValueError(f"a run selecting by {self.selection_by} got val_report={val_report is not None}")
        self.elapsed += seconds
        entry = {self.step_name: step, **stats}
        if report is not None:
            entry.update({k: report[k] for k in SCALAR_KEYS})
            if val_report is not None:
                entry.update({f"val_{k}": val_report[k] for k in SCALAR_KEYS})
        self.history.append(entry)
        line = f"{self.step_name} {step}/{self.total_steps} " + " ".join(
            f"{k} {v:.4g}" for k, v in stats.items() if isinstance(v, float))
        if val_report is not None:
            line += f" | val {SELECTION_METRIC} {val_report[SELECTION_METRIC]:.2f}"
        self.logger.info(line + (f" | test {summary_line(report)}" if report is not None else ""))
        log_scalars(self.writer, "train", stats, step)
        if report is not None:
            log_scalars(self.writer, "test", {k: report[k] for k in SCALAR_KEYS}, step)
            if val_report is not None:
                log_scalars(self.writer, "val", {k: val_report[k] for k in SCALAR_KEYS}, step)
            score = None if val_report is None else val_report[SELECTION_METRIC]
            if score is None or not self.selected or score > self.selected["val_score"]:
                self.selected = {"step": step, "val_score": score, "report": report}
                save_checkpoint(self.paths.best, self.payload(**{self.step_name: step}))
        training = {} if self.optimizer is None else {"optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            training["scaler"] = self.scaler.state_dict()
        save_checkpoint(self.paths.last, self.payload(**{self.step_name: step}, **training, **self.state()))
        run_started(self.paths)  # a checkpoint exists: a run replaced by --overwrite is now removed for good
        if periodic:
            save_checkpoint(self.paths.checkpoint_dir / f"model_{self.step_name}_{step:04d}.pt", self.payload(**{self.step_name: step}))
        write_json_atomic(self.paths.results, {"finished": False, "phase": self.paths.run_name, self.step_name: step,
                                               "history": self.history})

    def selection(self) -> dict:
        """How `best_model.pt` was chosen: `{"by": "val" | "final", "<step>": N}` (+ the validation score)."""
        out = {"by": self.selection_by, self.step_name: self.selected.get("step")}
        if self.selection_by == "val":
            out[f"val_{SELECTION_METRIC}"] = self.selected.get("val_score")
        return out

    def finish(self, **extra) -> dict:
        """Write the final results.json (top-level metrics = the selected model's test evaluation) and close TensorBoard."""
        if not self.enabled:
            return {}
        self.writer.close()
        report = self.selected.get("report", {})
        chosen = (f"the {self.step_name} of the best validation {SELECTION_METRIC}" if self.selection_by == "val"
                  else f"the final {self.step_name} (no validation split: nothing is selected)")
        results = {
            "finished": True, "phase": self.paths.run_name, "config": self.paths.config, "note": self.paths.note,
            "evaluated": f"best_model.pt: {chosen}", "checkpoint_selection": self.selection(), **report,
            "wall_time_s": self.elapsed, **extra, "provenance": collect(resumed=self.resumed),
            "history": self.history,
        }
        write_json_atomic(self.paths.results, results)
        run_started(self.paths)
        self.logger.info(f"finished: test {summary_line(report)} | best_model.pt = {chosen}, {self.step_name} "
                         f"{self.selected.get('step')} | {self.elapsed:.1f}s")
        return results


def open_run(paths: RunPaths, cfg: dict, *, resume: bool, overwrite: bool, command: str) -> tuple[str, logging.Logger | None]:
    """Apply the overwrite / resume rules, check a resumed run's config, save the resolved config.

    Returns (mode, logger); mode 'finished' (a --resume of a completed run) comes with no logger.
    Under torchrun rank 0 decides and writes; every rank gets the same mode (and the same UserError),
    the other ranks a silent logger. First, on every rank, the run begins (:func:`utils.provenance.begin_run`:
    its start, its determinism), before anything is written.
    """
    begin_run(cfg)
    opened = distributed.on_main(lambda: _open_run(paths, cfg, resume=resume, overwrite=overwrite, command=command))
    mode = distributed.broadcast_object(opened[0] if opened else None)
    if opened is not None:
        return opened
    return mode, (None if mode == "finished" else silent_logger())


def _open_run(paths: RunPaths, cfg: dict, *, resume: bool, overwrite: bool, command: str) -> tuple[str, logging.Logger | None]:
    mode = prepare_run(paths, resume=resume, overwrite=overwrite, command=command)
    if mode == "finished":
        print(f"{paths.checkpoint_dir} is already finished; nothing to resume.")
        return mode, None
    run_dir = paths.checkpoint_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if mode == "resume":
        saved = _saved_config(run_dir / "config.yaml", command)
        diffs = saved_config_differences(saved, cfg)
        if diffs:
            speed = any(d.startswith(SPEED_SETTINGS) for d in diffs)
            raise UserError(
                f"--resume with a config that differs from the interrupted run's ({', '.join(diffs)})"
                f"{'; under determinism: true the accel settings must stay as they were too' if speed else ''}. "
                f"Resume with the same config and --opts, or start a new run with --note NAME."
            )
    else:
        dump_config(cfg, run_dir / "config.yaml")
    logger = setup_logger(run_dir)
    logger.info(f"{paths.run_name} {mode} run in {run_dir}")
    return mode, logger


def _saved_config(path: Path, command: str) -> dict:
    """The resolved config an interrupted run saved, which its --resume must match."""
    try:
        return read_yaml(path)
    except UserError as exc:
        raise UserError(
            f"--resume needs the interrupted run's config, but {path} is missing or unreadable: {exc} So the run "
            f"cannot be checked and continued. Start it again with --overwrite ({command} --overwrite), "
            f"or use --note NAME for a separate experiment."
        ) from exc


def write_test_results(paths: RunPaths, checkpoint: Path, report: dict) -> dict:
    """`phase: test` output of any phase: the evaluation of `checkpoint`, in `test_results.json` (rank 0 writes)."""
    out = {"finished": True, "phase": paths.run_name, "mode": "test", "checkpoint": str(checkpoint), **report}
    if distributed.context().is_main:
        out["provenance"] = collect()
        write_json_atomic(paths.checkpoint_dir / "test_results.json", out)
    return out


def start_recording(paths: RunPaths, run_mode: str, logger: logging.Logger, payload: Callable[..., dict], *,
                    restore: Callable[[dict, Path], None], optimizer: torch.optim.Optimizer | None,
                    scaler: torch.amp.GradScaler | None = None, step_name: str, total_steps: int, command: str,
                    select_on_val: bool) -> tuple[int, RunRecorder]:
    """(first step to run, recorder): the one saver of every training run. On 'resume', `restore(state,
    path)` puts the weights of `last.pt` back, then the optimizer (and GradScaler) state follows."""
    start, state = 0, None
    if run_mode == "resume":
        state = load_checkpoint(paths.last, produced_by=command)
        needed = [key for key in (step_name, *(["optimizer"] if optimizer is not None else [])) if key not in state]
        if needed:
            raise UserError(f"{paths.last} cannot be resumed: it holds no {' and no '.join(needed)} state (a model "
                            f"checkpoint copied over last.pt?). Start the run again: {command} --overwrite")
        restore(state, paths.last)
        try:
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"{paths.last} cannot be resumed: its optimizer state does not fit this run's optimizer "
                            f"({str(exc).splitlines()[0]}). Start the run again: {command} --overwrite") from exc
        start = state[step_name]
        logger.info(f"resumed after {step_name} {start}")
    return start, RunRecorder(paths, logger, payload, step_name=step_name, total_steps=total_steps,
                              select_on_val=select_on_val, optimizer=optimizer, scaler=scaler, resumed_state=state)
