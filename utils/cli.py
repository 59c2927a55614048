"""The arguments every phase script shares, and the user-error boundary."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from utils import distributed
from utils.errors import UserError


def phase_parser(description: str, *, training: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="config name (configs/<phase>/NAME.yaml) or path to a YAML file")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, or a GPU index such as 0")
    parser.add_argument("--note", default="default", help="experiment name; outputs go to .../<config>/<note>/")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="override config values, e.g. train.lr=0.01")
    if training:
        parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last.pt")
        parser.add_argument("--overwrite", action="store_true", help="replace a finished or interrupted run")
    return parser


def training_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of the train-or-test scripts (phase I and III)."""
    parser = phase_parser(description)
    parser.add_argument("--checkpoint", help="phase: test only: checkpoint to evaluate (default: this run's best_model.pt)")
    return parser


def script_command(script: str, config: str, note: str, *extra: str) -> str:
    """The command line a user types to run `script` for a config and note (for error messages)."""
    parts = ["python", script, "--config", config, *([] if note == "default" else ["--note", note]), *extra]
    return " ".join(parts)


def run_cli(main: Callable[[], object]) -> None:
    """Run `main`; a UserError becomes `error: <message>` on stderr and exit code 2.

    Under torchrun every rank runs `main`; rank 0 alone prints the message, and a rank that finished
    waits for the others before leaving the process group."""
    first_rank = distributed.first_process()
    try:
        main()
        distributed.barrier()
    except UserError as exc:
        if first_rank:
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted. A training run keeps its last checkpoint (last.pt): continue it with --resume. "
              "Phase II and visualize.py have no resume: run them again with --overwrite.", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.shutdown()
