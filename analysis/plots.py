"""The report's summary figures (matplotlib, Agg), each a PNG in the report folder, comparing the rows:

    ablation.png          one panel per metric, one horizontal bar per row (mean, error bar = std over
                          notes), coloured by method group; taller with more rows
    forest.png            every paired difference: mean, 95% t-interval, a line at 0, n per row

Rows are :class:`analysis.rows.Row` objects (``label``, ``stat(metric)``, ``group``); paired differences
:class:`analysis.stats.PairedDifference` objects (``caption``, ``metric``, ``n``, ``mean``, ``interval``).
The figures of single classes and rows (per-class accuracy, confusion, curves) are
``analysis.detail_plots``'.
"""
from __future__ import annotations

import math
from pathlib import Path

# through the module, not its names: a test replaces figure_kit.save to watch the figures saved
from analysis import figure_kit

# fixed figure sizes (inches at figure_kit.DPI) so the PNGs have a known size in pixels
BAR_FIGSIZE = (9.0, 5.0)    # ablation.png: its width and its least height
BAR_ROW_PIXELS = 17         # ablation.png: height of one row (a label line) in each panel
BAR_PANEL_PIXELS = 45       # ablation.png: a line of panels' title and x tick labels
BAR_FIXED_PIXELS = 100      # ablation.png: the title, x label and legend
BAR_COLUMNS = 3             # ablation.png: metric panels side by side
BAR_LABEL_WIDTH = 40        # ablation.png: row labels wrap past this many characters
BAR_EXTRA_LINE = 0.7        # ablation.png: a row's extra height (in rows) for each further line of its label
FOREST_EXTRA_LINE = 0.4     # forest.png: the same for a line whose caption wraps
METRIC_COLOURS = {"top1": "#1f77b4", "tail": "#d62728"}


def row_styles(count: int) -> list[tuple[tuple[float, ...], bool]]:
    """A distinct ``(colour, patterned)`` for each of ``count`` rows: tab20's 20 colours, then the same
    colours patterned (hatched bars, dashed lines), so that the suites' 20-odd rows stay tellable apart."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"]
    return [(tuple(palette(i % 20)), (i // 20) % 2 == 1) for i in range(count)]


def bar_chart(path: Path, config: str, notes: list[str], rows: list, metrics: tuple[str, ...]) -> list[dict]:
    """Mean test accuracy per metric and row as horizontal bars: one panel per metric (``BAR_COLUMNS`` to a
    line of panels), one bar per row, rows top to bottom in the report's order with their labels on the y
    axis, bars coloured by the row's method group; error bar: sample std over notes (none with one note); a
    row without the metric says ``n/a`` instead of a bar; a dashed line at the first row's mean (the phase I
    baseline) in each panel. The figure is ``BAR_FIGSIZE`` wide and grows in height with the rows: each row
    ``BAR_ROW_PIXELS`` in each line of panels, ``BAR_EXTRA_LINE`` times that more for each further line of
    a wrapped label; never below ``BAR_FIGSIZE``'s height.

    Returns what was drawn, read back from the plotted artists (``label``, ``metric``, ``mean``, ``std``; mean
    None for ``n/a``), row by row in each metric's panel, so that a test can hold the picture to the report's
    numbers."""
    import matplotlib
    import numpy as np

    plt = figure_kit.pyplot()
    metrics = [m for m in metrics if any(row.stat(m).n for row in rows)]
    columns = max(1, min(BAR_COLUMNS, len(metrics)))
    lines = max(1, math.ceil(len(metrics) / columns))
    labels = [figure_kit.wrap(row.label, BAR_LABEL_WIDTH) for row in rows]
    ys, spans = _stacked(labels, BAR_EXTRA_LINE)
    ys = np.array(ys)
    panel_pixels = BAR_PANEL_PIXELS + round(BAR_ROW_PIXELS * sum(spans))
    height = max(BAR_FIGSIZE[1] * figure_kit.DPI, BAR_FIXED_PIXELS + lines * panel_pixels)
    fig, axes = plt.subplots(lines, columns, figsize=(BAR_FIGSIZE[0], height / figure_kit.DPI), dpi=figure_kit.DPI,
                             sharex=True, sharey=True, squeeze=False, layout="constrained")
    groups = list(dict.fromkeys(row.group or "other" for row in rows))
    colours = {g: matplotlib.colormaps["tab10"](k % 10) for k, g in enumerate(groups)}
    panels, referenced = [], False
    for k, ax in enumerate(axes.flat):
        if k >= len(metrics):
            ax.set_axis_off()
            continue
        metric = metrics[k]
        stats = [row.stat(metric) for row in rows]
        for y, span in list(zip(ys, spans))[1::2]:  # every other row shaded, to read a row across the panels
            ax.axhspan(y - span / 2, y + span / 2, color="#000000", alpha=0.05, linewidth=0)
        keep = [i for i, s in enumerate(stats) if s.n]  # an absent group draws no bar, but n/a
        bars = ax.barh(ys[keep], [stats[i].mean for i in keep], height=0.7,
                       color=[colours[rows[i].group or "other"] for i in keep])
        spread = [i for i in keep if stats[i].std is not None]  # one note: no error bar (not a zero one)
        errors = ax.errorbar([stats[i].mean for i in spread], ys[spread], xerr=[stats[i].std for i in spread],
                             fmt="none", ecolor="black", elinewidth=1.0, capsize=2.5) if spread else None
        absent = [ax.text(1.5, ys[i], "n/a", va="center", ha="left", fontsize=7, color="#666666")
                  for i in range(len(rows)) if i not in keep]
        if stats and stats[0].mean is not None:
            ax.axvline(stats[0].mean, color="black", linestyle="--", linewidth=0.9)
            referenced = True
        ax.set_title(metric, fontsize=10)
        ax.set_xlim(0, 100)
        ax.set_xticks([0, 25, 50, 75, 100])
        ax.tick_params(axis="x", labelsize=8)
        ax.tick_params(axis="y", labelsize=8, length=0)
        ax.grid(axis="x", alpha=0.3)
        ax.set_ylim(0, sum(spans))
        panels.append((metric, bars, errors, absent))
    axes[0, 0].set_yticks(ys)
    axes[0, 0].set_yticklabels(labels)
    for column in range(min(columns, len(metrics))):  # x ticks and label under the lowest panel of each column
        lowest = axes.flat[max(k for k in range(len(metrics)) if k % columns == column)]
        lowest.tick_params(axis="x", labelbottom=True)
        lowest.set_xlabel("test accuracy (%)", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g], label=g) for g in groups]
    if referenced:
        handles.append(plt.Line2D([], [], color="black", linestyle="--", label=rows[0].label))
    legend_lines = max(1, math.ceil(len(handles) / 7))  # lines of even length, at most 7 entries each
    fig.legend(handles=handles, loc="outside lower center", ncol=max(1, math.ceil(len(handles) / legend_lines)),
               fontsize=8, frameon=False)
    notes_text = figure_kit.over_notes(notes, "mean ± sample std")
    fig.suptitle(f"{config}: test accuracy of the selected models ({notes_text})\n"
                 f"colour: method group; dashed line: the first row's mean", fontsize=10)
    drawn = _bars_drawn(axes[0, 0], panels)
    figure_kit.save(fig, path)
    return drawn


def _bars_drawn(label_axes, panels: list) -> list[dict]:
    """What each metric panel of ``bar_chart`` drew, read back from its artists, top to bottom: the row label
    at the bar's height, the bar's length (mean), half its error bar (std; None without one), or None for
    both where the panel says n/a."""
    def at(y) -> float:  # a row's height, as the bars, error bars, texts and tick labels hold it
        return round(float(y), 6)

    names = {at(y): label.get_text().replace("\n", " ")
             for y, label in zip(label_axes.get_yticks(), label_axes.get_yticklabels())}
    out = []
    for metric, bars, errors, absent in panels:
        means = {at(patch.get_y() + patch.get_height() / 2): float(patch.get_width()) for patch in bars.patches}
        means.update({at(text.get_position()[1]): None for text in absent})
        spans = {}
        if errors is not None:
            _, _, (segments,) = errors.lines
            spans = {at(seg[0][1]): float(abs(seg[1][0] - seg[0][0]) / 2) for seg in segments.get_segments()}
        out += [{"label": names[y], "metric": metric, "mean": means[y], "std": spans.get(y)}
                for y in sorted(means, reverse=True)]
    return out


# ------------------------------------------------------------------------------------------------
# forest.png
# ------------------------------------------------------------------------------------------------
def forest_chart(path: Path, title: str, diffs: list) -> list[dict]:
    """Forest plot of paired differences, one line each, top to bottom in the report's order: a point at
    the mean, a bar over the 95% t-interval (none with one note), a vertical line at 0, and on the right
    the mean, interval and n. Filled points: the interval excludes 0.

    Returns what was drawn, read back from the plotted artists (``label``, ``metric``, ``n``, ``mean``,
    ``ci95``), so that a test can hold the picture to the report's numbers."""
    plt = figure_kit.pyplot()
    count = len(diffs)
    captions = [figure_kit.wrap(d.caption, 80) for d in diffs]
    ys, spans = _stacked(captions, FOREST_EXTRA_LINE)  # the first difference on top
    height = round((1.6 + 0.32 * sum(spans)) * figure_kit.DPI)  # whole pixels
    fig, ax = plt.subplots(figsize=(11.0, height / figure_kit.DPI), dpi=figure_kit.DPI, layout="constrained")
    points, bars = [], []
    for y, d in zip(ys, diffs):
        colour = METRIC_COLOURS.get(d.metric, "#555555")
        interval = d.interval
        filled = interval is not None and (interval[0] > 0 or interval[1] < 0)
        if interval is not None:
            bars.append(ax.hlines(y, interval[0], interval[1], color=colour, linewidth=2.2))
        else:
            bars.append(None)
        points.append(ax.plot([d.mean], [y], "o", markersize=7, color=colour,
                              markerfacecolor=colour if filled else "white", markeredgewidth=1.6)[0])
    pair_starts = [k for k in range(count) if k == 0 or (diffs[k].method, diffs[k].reference)
                   != (diffs[k - 1].method, diffs[k - 1].reference)]
    for first, after in list(zip(pair_starts, pair_starts[1:] + [count]))[::2]:  # shade every other pair's lines
        ax.axhspan(ys[after - 1] - spans[after - 1] / 2, ys[first] + spans[first] / 2, color="#000000", alpha=0.05,
                   linewidth=0)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(ys)
    ax.set_yticklabels(captions, fontsize=9)
    ax.set_ylim(-0.2, sum(spans) + 0.2)
    right = ax.twinx()  # the numbers, one per line, as a column of tick labels on the right
    right.set_ylim(ax.get_ylim())
    right.set_yticks(ys)
    right.set_yticklabels([_interval_text(d) for d in diffs], fontsize=9, family="monospace")
    right.tick_params(length=0)
    ax.set_xlabel("difference, method − reference (percentage points)")
    ax.grid(axis="x", alpha=0.3)
    notes_n = max((d.n for d in diffs), default=0)
    how = ("point = mean over the notes, bar = 95% t-interval; filled: the interval excludes 0"
           if notes_n > 1 else "one note: points only, no interval (run several seeds: --seeds 0 1 2)")
    ax.set_title(f"{title}\n{how}", fontsize=10)
    handles = [plt.Line2D([], [], color=c, marker="o", linewidth=2.2, label=m) for m, c in METRIC_COLOURS.items()
               if any(d.metric == m for d in diffs)]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure_kit.save(fig, path)
    return [{"label": label.get_text().replace("\n", " "), "metric": d.metric, "n": d.n,
             "mean": float(point.get_xdata()[0]),
             "ci95": None if bar is None else [float(v) for v in sorted(bar.get_segments()[0][:, 0])]}
            for d, point, bar, label in zip(diffs, points, bars, ax.get_yticklabels())]


def _stacked(labels: list[str], extra_line: float) -> tuple[list[float], list[float]]:
    """``(centres, heights)`` of rows stacked top to bottom in the order of their (wrapped) labels, each 1 high
    plus ``extra_line`` for each further line of its label: the first on top, the last one's bottom at 0."""
    heights = [1 + extra_line * label.count("\n") for label in labels]
    tops = [sum(heights) - sum(heights[:k]) for k in range(len(heights))]
    return [top - height / 2 for top, height in zip(tops, heights)], heights


def _interval_text(d) -> str:
    interval = "" if d.interval is None else f" [{d.interval[0]:+7.2f}, {d.interval[1]:+7.2f}]"
    return f"{d.mean:+7.2f}{interval}  n={d.n}"
