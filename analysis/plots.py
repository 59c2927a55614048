"""The report's figures (matplotlib, Agg): grouped bars of the metrics and per-class accuracy
against class size. Rows are :class:`analysis.report.Row` objects (anything with ``label``,
``stat(metric)`` and ``per_class()``)."""
from __future__ import annotations

from pathlib import Path

# fixed figure sizes (inches at 100 dpi) so the PNGs have a known size in pixels
BAR_FIGSIZE = (9.0, 5.0)
PER_CLASS_FIGSIZE = (8.0, 5.0)
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def row_styles(count: int) -> list[tuple[tuple[float, ...], bool]]:
    """A distinct ``(colour, patterned)`` for each of ``count`` rows: tab20's 20 colours, then the same
    colours patterned (hatched bars, dashed lines), so that the suites' 20-odd rows stay tellable apart."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"]
    return [(tuple(palette(i % 20)), (i // 20) % 2 == 1) for i in range(count)]


def bar_chart(path: Path, config: str, notes: list[str], rows: list, metrics: tuple[str, ...]) -> None:
    """Mean test accuracy per metric and row (error bar: sample std over notes)."""
    plt = _pyplot()
    metrics = [m for m in metrics if any(row.stat(m).n for row in rows)]
    fig, ax = plt.subplots(figsize=BAR_FIGSIZE, dpi=DPI)
    width = 0.8 / max(len(rows), 1)
    styles = row_styles(len(rows))
    for i, row in enumerate(rows):
        color, patterned = styles[i]
        stats = [row.stat(m) for m in metrics]
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(metrics))]
        means = [s.mean if s.mean is not None else 0.0 for s in stats]
        errs = [s.std if s.std is not None else 0.0 for s in stats]
        keep = [k for k, s in enumerate(stats) if s.n]  # an absent group draws no bar
        with_err = any(stats[k].std is not None for k in keep)
        ax.bar([xs[k] for k in keep], [means[k] for k in keep], width * 0.95,
               yerr=[errs[k] for k in keep] if with_err else None, capsize=3, label=row.label, color=color,
               hatch="//" if patterned else None)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    shown = f"mean ± sample std over {len(notes)} notes" if len(notes) > 1 else f"note {notes[0]}"
    ax.set_title(f"{config}: test accuracy of the selected models ({shown})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(len(rows), 3), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def per_class_chart(path: Path, config: str, notes: list[str], rows: list) -> None:
    """Per-class test accuracy against training-class size (log x), one line per row."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=PER_CLASS_FIGSIZE, dpi=DPI)
    styles = row_styles(len(rows))
    drawn = 0
    for i, row in enumerate(rows):
        data = row.per_class()
        if data is None:
            continue
        counts, accuracy = data
        points = sorted((max(n, 1), a) for n, a in zip(counts, accuracy) if a is not None)
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) <= 100 else None, markersize=3, linewidth=1.2, label=row.label,
                color=styles[i][0], linestyle="--" if styles[i][1] else "-")
        drawn += 1
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("per-class test accuracy (%)")
    ax.set_ylim(-2, 102)
    shown = f"mean over {len(notes)} notes" if len(notes) > 1 else f"note {notes[0]}"
    ax.set_title(f"{config}: per-class accuracy, selected models ({shown})")
    ax.grid(alpha=0.3, which="both")
    if drawn:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
