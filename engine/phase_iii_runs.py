"""Names of phase III runs: their folder under checkpoints/ and the command that makes them.

A module of its own so that engine.phase_iii, engine.phase_iii_features, the report and visualize
can all use them without importing each other (no import cycle).
"""
from __future__ import annotations

from utils.cli import script_command


def phase_name(mode: str, generator: str) -> str:
    """Run folder phase: `phase_iii_online`, `phase_iii_offline`, or with a non-default generator
    `phase_iii_offline-none`, so that the ablation's runs of one config and note sit side by side."""
    base = f"phase_iii_{mode}"
    return base if generator == "fsa" else f"{base}-{generator}"


def parse_phase_name(phase: str) -> tuple[str, str]:
    """`(mode, generator)` of a run folder name made by `phase_name`."""
    mode, _, generator = phase[len("phase_iii_"):].partition("-")
    return mode, generator or "fsa"


def phase_iii_command(mode: str, config: str, note: str, generator: str) -> str:
    extra = [] if generator == "fsa" else ["--opts", f"finetune.generator={generator}"]
    return script_command(f"phase_iii_{mode}_train_or_test.py", config, note, *extra)
