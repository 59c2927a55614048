"""Run logs (console + `log.txt` in the run folder) and TensorBoard writers."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


def setup_logger(run_dir: Path | None, name: str = "fsa_lt") -> logging.Logger:
    """A logger that writes to stderr and, when `run_dir` is given, appends to `run_dir/log.txt`."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "log.txt")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


def silent_logger(name: str = "fsa_lt.silent") -> logging.Logger:
    """A logger that drops everything: what ranks other than 0 of a torchrun job log to."""
    logger = logging.getLogger(name)
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def open_summary_writer(summary_dir: Path) -> SummaryWriter:
    summary_dir.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(summary_dir))


def log_scalars(writer: SummaryWriter | None, prefix: str, values: dict, step: int) -> None:
    """Write every numeric, non-None value of `values` as `prefix/key`."""
    if writer is None:
        return
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(f"{prefix}/{key}", value, step)
