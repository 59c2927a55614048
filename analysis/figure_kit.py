"""What every report figure shares (``analysis.plots``, ``analysis.detail_plots``): matplotlib drawing to
files (Agg), one resolution, saving, and the wording of captions.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from types import ModuleType

DPI = 100  # every figure's size is fixed in inches at this resolution, so its PNG has a known size in pixels


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display); imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` at :data:`DPI` and close it."""
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)


def over_notes(notes: list[str], how: str) -> str:
    """What a figure shows of its notes: ``how`` over several (``mean over 3 notes``), or the one note."""
    return f"{how} over {len(notes)} notes" if len(notes) > 1 else f"note {notes[0]}"


def wrap(text: str, width: int) -> str:
    """``text`` wrapped into lines of at most ``width`` characters (not at hyphens)."""
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text
