"""The report's figures (matplotlib, Agg), each a PNG in the report folder:

    ablation.png          one panel per metric, one horizontal bar per row (mean, error bar = std over
                          notes), coloured by method group; taller with more rows
    forest.png            every paired difference: mean, 95% t-interval, a line at 0, n per row
    per_class.png         one small panel per row: per-class accuracy, classes sorted by training count,
                          bars coloured by shot group, the phase I baseline as a reference line
    confusion_<id>.png    a row's confusion matrix, rows normalised to recall, classes by training count
    curves_<id>.png       a row's training and evaluation curves from each note's ``history``

Rows are :class:`analysis.rows.Row` objects (``label``, ``stat(metric)``, ``per_class()``, ``head_size()``,
``runs``); paired differences :class:`analysis.stats.PairedDifference` objects (``caption``, ``metric``, ``n``,
``mean``, ``interval``).
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

from engine.metrics import FEW_SHOT_BELOW, MANY_SHOT_ABOVE, shot_groups

# fixed figure sizes (inches at 100 dpi) so the PNGs have a known size in pixels
BAR_FIGSIZE = (9.0, 5.0)    # ablation.png: its width and its least height
BAR_ROW_PIXELS = 17         # ablation.png: height of one row (a label line) in each panel
BAR_PANEL_PIXELS = 45       # ablation.png: a line of panels' title and x tick labels
BAR_FIXED_PIXELS = 100      # ablation.png: the title, x label and legend
BAR_COLUMNS = 3             # ablation.png: metric panels side by side
BAR_LABEL_WIDTH = 40        # ablation.png: row labels wrap past this many characters
BAR_EXTRA_LINE = 0.7        # ablation.png: a row's extra height (in rows) for each further line of its label
FOREST_EXTRA_LINE = 0.4     # forest.png: the same for a line whose caption wraps
DPI = 100
PANEL_SIZE = (3.0, 2.2)     # one small multiple of per_class.png
PANEL_COLUMNS = 5
MAX_CELL_TEXT = 20          # confusion matrices print each cell's value up to this many classes
GROUP_COLOURS = {"many": "#4c72b0", "medium": "#55a868", "few": "#c44e52"}
GROUP_NAMES = {"many": f"many-shot (> {MANY_SHOT_ABOVE} images)", "medium": f"medium ({FEW_SHOT_BELOW}-{MANY_SHOT_ABOVE})",
               "few": f"few-shot (< {FEW_SHOT_BELOW})"}
METRIC_COLOURS = {"top1": "#1f77b4", "tail": "#d62728"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)


def _shown(notes: list[str], how: str) -> str:
    return f"{how} over {len(notes)} notes" if len(notes) > 1 else f"note {notes[0]}"


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

    plt = _pyplot()
    metrics = [m for m in metrics if any(row.stat(m).n for row in rows)]
    columns = max(1, min(BAR_COLUMNS, len(metrics)))
    lines = max(1, math.ceil(len(metrics) / columns))
    labels = [_wrap(row.label, BAR_LABEL_WIDTH) for row in rows]
    ys, spans = _stacked(labels, BAR_EXTRA_LINE)
    ys = np.array(ys)
    panel_pixels = BAR_PANEL_PIXELS + round(BAR_ROW_PIXELS * sum(spans))
    height = max(BAR_FIGSIZE[1] * DPI, BAR_FIXED_PIXELS + lines * panel_pixels)
    fig, axes = plt.subplots(lines, columns, figsize=(BAR_FIGSIZE[0], height / DPI), dpi=DPI, sharex=True,
                             sharey=True, squeeze=False, layout="constrained")
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
    fig.suptitle(f"{config}: test accuracy of the selected models ({_shown(notes, 'mean ± sample std')})\n"
                 f"colour: method group; dashed line: the first row's mean", fontsize=10)
    drawn = _bars_drawn(axes[0, 0], panels)
    _save(fig, path)
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
    plt = _pyplot()
    count = len(diffs)
    captions = [_wrap(d.caption, 80) for d in diffs]
    ys, spans = _stacked(captions, FOREST_EXTRA_LINE)  # the first difference on top
    height = round((1.6 + 0.32 * sum(spans)) * DPI)  # whole pixels
    fig, ax = plt.subplots(figsize=(11.0, height / DPI), dpi=DPI, layout="constrained")
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
    _save(fig, path)
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


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


# ------------------------------------------------------------------------------------------------
# per_class.png
# ------------------------------------------------------------------------------------------------
def _class_order(counts: list[int]) -> list[int]:
    """Classes by training count, largest first, ties by class index (the order of the head / tail split)."""
    return sorted(range(len(counts)), key=lambda c: (-counts[c], c))


def _group_of(counts: list[int]) -> dict[int, str]:
    return {c: group for group, classes in shot_groups(counts).items() for c in classes}


def per_class_chart(path: Path, config: str, notes: list[str], rows: list) -> None:
    """Small multiples, one panel per row: per-class test accuracy (averaged over notes) as bars, classes
    sorted by training count (largest left), coloured by shot group, the head | tail boundary dashed, and
    the first row (the phase I baseline) as a black step line in every other panel for reference."""
    plt = _pyplot()
    data = [(row, row.per_class()) for row in rows]
    data = [(row, d) for row, d in data if d is not None]
    if not data:
        fig, ax = plt.subplots(figsize=PANEL_SIZE, dpi=DPI)
        ax.text(0.5, 0.5, "no per-class data", ha="center", va="center")
        ax.set_axis_off()
        _save(fig, path)
        return
    columns = min(PANEL_COLUMNS, len(data))
    lines = math.ceil(len(data) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * lines + 0.9),
                             dpi=DPI, sharey=True, squeeze=False, layout="constrained")
    reference_row, (reference_counts, reference_accuracy) = data[0]
    for k, ax in enumerate(axes.flat):
        if k >= len(data):
            ax.set_axis_off()
            continue
        row, (counts, accuracy) = data[k]
        order = _class_order(counts)
        group = _group_of(counts)
        xs = range(len(order))
        ax.bar(xs, [accuracy[c] or 0.0 for c in order], width=1.0,  # a class without test images: no bar
               color=[GROUP_COLOURS[group[c]] for c in order], edgecolor="white",
               linewidth=0.8 if len(order) <= 40 else 0)  # a gap between wide bars; none at one pixel per class
        if k > 0 and reference_counts == counts:
            ax.stairs([reference_accuracy[c] or 0.0 for c in order], [x - 0.5 for x in range(len(order) + 1)],
                      color="black", linewidth=1.0)
        head = row.head_size()
        if head is not None and 0 < head < len(order):
            ax.axvline(head - 0.5, color="black", linestyle="--", linewidth=0.9)
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_ylim(0, 100)
        ax.set_yticks([0, 50, 100])
        ax.grid(axis="y", alpha=0.3)
        mean = row.stat("top1").mean
        ax.set_title(_wrap(row.label, 34) + ("" if mean is None else f"  ({mean:.1f})"), fontsize=9)
        ticks = _count_ticks(counts, order)
        ax.set_xticks([x for x, _ in ticks])
        tick_labels = ax.set_xticklabels([str(n) for _, n in ticks], fontsize=7)
        if len(order) > 1:  # the end labels inside their panel, apart from the next panel's first
            tick_labels[0].set_horizontalalignment("left")
            tick_labels[-1].set_horizontalalignment("right")
        ax.tick_params(axis="y", labelsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)", fontsize=8)
    for column in range(columns):  # under the lowest panel of each column (the last line may be short)
        axes.flat[max(k for k in range(len(data)) if k % columns == column)].set_xlabel("classes, by training images",
                                                                                    fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=GROUP_COLOURS[g], label=GROUP_NAMES[g])
               for g in GROUP_COLOURS if any(g in _group_of(d[0]).values() for _, d in data)]
    handles.append(plt.Line2D([], [], color="black", linestyle="--", label="head | tail"))
    if len(data) > 1:
        handles.append(plt.Line2D([], [], color="black", label=f"{reference_row.label}"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"{config}: per-class test accuracy ({_shown(notes, 'mean')}; title: top-1); x ticks: training "
                 f"images of the class", fontsize=10)
    _save(fig, path)


def _count_ticks(counts: list[int], order: list[int]) -> list[tuple[int, int]]:
    """``(x, training count)`` at the first class, the first of each shot group and the last class."""
    group = _group_of(counts)
    xs = [0] + [x for x in range(1, len(order)) if group[order[x]] != group[order[x - 1]]] + [len(order) - 1]
    return [(x, counts[order[x]]) for x in dict.fromkeys(xs)]


# ------------------------------------------------------------------------------------------------
# confusion_<id>.png
# ------------------------------------------------------------------------------------------------
def recall_matrix(confusions: list[list[list[int]]], order: list[int]) -> list[list[float | None]]:
    """The mean over runs of each run's confusion matrix with rows normalised to recall (a true class's
    predictions as shares), classes in ``order``; a class without test images in any run is a row of None."""
    size = len(order)
    out: list[list[float | None]] = []
    for true in order:
        shares = [[cm[true][p] / sum(cm[true]) for p in order] for cm in confusions if sum(cm[true])]
        out.append([sum(s[j] for s in shares) / len(shares) for j in range(size)] if shares else [None] * size)
    return out


def confusion_chart(path: Path, title: str, confusions: list[list[list[int]]], counts: list[int],
                    head: int | None) -> list[list[float | None]]:
    """The recall-normalised confusion matrix (``recall_matrix``) as an image, classes sorted by training
    count on both axes (tick labels ``class (count)``, thinned past ``MAX_CELL_TEXT`` classes, when cell
    values are no longer printed either), shot-group boundaries as lines, head | tail dashed. Returns the
    matrix drawn."""
    import numpy as np
    from matplotlib.colors import PowerNorm

    plt = _pyplot()
    order = _class_order(counts)
    matrix = recall_matrix(confusions, order)
    size = len(order)
    values = np.array([[np.nan if v is None else v for v in line] for line in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(7.6, 6.6), dpi=DPI, layout="constrained")
    # a square-root colour scale: the few-percent confusions of a tail class with the head stay visible
    image = ax.imshow(values, cmap="Blues", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, shrink=0.85, label="share of the true class's test images (sqrt scale)")
    bar.set_ticks([0, 0.02, 0.1, 0.25, 0.5, 0.75, 1.0])
    step = max(1, math.ceil(size / MAX_CELL_TEXT))
    ticks = list(range(0, size, step))
    labels = [f"{order[t]} ({counts[order[t]]})" for t in ticks]
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=7)
    if size <= MAX_CELL_TEXT:
        for i in range(size):
            for j in range(size):
                if not np.isnan(values[i, j]) and values[i, j] >= 0.005:
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if values[i, j] > 0.6 else "black")
    group = _group_of(counts)
    for x in range(1, size):
        if group[order[x]] != group[order[x - 1]]:
            for line in (ax.axvline, ax.axhline):
                line(x - 0.5, color="#444444", linewidth=0.8)
    if head is not None and 0 < head < size:
        for line in (ax.axvline, ax.axhline):
            line(head - 0.5, color="#d62728", linestyle="--", linewidth=1.0)
    ax.set_xlabel("predicted class (training images), by training count")
    ax.set_ylabel("true class (training images)")
    ax.set_title(f"{title}\ngrey lines: shot groups (many | medium | few); red dashed: head | tail", fontsize=9)
    _save(fig, path)
    return matrix


# ------------------------------------------------------------------------------------------------
# curves_<id>.png
# ------------------------------------------------------------------------------------------------
# the panels of a curves figure: (title, y label, [(history key, legend label, line colour)])
CURVE_PANELS = (
    ("training loss", "loss", [("loss", "train loss", "#333333")]),
    ("top-1 accuracy", "accuracy (%)", [("train_acc", "train (batches)", "#7f7f7f"), ("top1", "test", "#1f77b4"),
                                         ("val_top1", "validation", "#2ca02c")]),
    ("head and tail (test, validation)", "accuracy (%)",
     [("head", "test head", "#9467bd"), ("tail", "test tail", "#d62728"),
      ("val_head", "val head", "#c5b0d5"), ("val_tail", "val tail", "#ff9896")]),
)
STEP_KEYS = ("epoch", "iteration")


def has_curves(run: dict) -> bool:
    """Whether a run's ``history`` holds at least two evaluated steps (a post-hoc method has one)."""
    history = run.get("history") or []
    return sum(1 for h in history if isinstance(h, dict) and any(k in h for k in STEP_KEYS)) >= 2


def curves_chart(path: Path, title: str, runs: dict[str, dict]) -> None:
    """Each note's training and evaluation history against its step (epoch or iteration): loss, top-1
    (train batches, test, validation when the run has one), head and tail; one line style per note, the
    selected model's step dotted."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(14.0, 4.2), dpi=DPI, layout="constrained")
    styles = ["-", "--", "-.", (0, (1, 1))]
    step_name = "step"
    labelled: dict[str, object] = {}
    for k, (note, run) in enumerate(runs.items()):
        history = [h for h in run.get("history") or [] if isinstance(h, dict)]
        step_name = next((s for s in STEP_KEYS if history and s in history[0]), step_name)
        selected = (run.get("checkpoint_selection") or {}).get(step_name)
        for ax, (_, _, series) in zip(axes, CURVE_PANELS):
            for key, label, colour in series:
                points = [(h[step_name], h[key]) for h in history if isinstance(h.get(key), (int, float))
                          and not isinstance(h.get(key), bool) and step_name in h]
                if not points:
                    continue
                xs, ys = zip(*points)
                line, = ax.plot(xs, ys, styles[k % len(styles)], color=colour, linewidth=1.4,
                                marker="o" if len(xs) <= 12 else None, markersize=3)
                labelled.setdefault(label, line)
            if isinstance(selected, (int, float)):
                ax.axvline(selected, color="#888888", linestyle=":", linewidth=1)
    notes = list(runs)
    for ax, (panel_title, ylabel, series) in zip(axes, CURVE_PANELS):
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(step_name)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        shown = [label for _, label, _ in series if label in labelled]
        if shown:
            ax.legend([labelled[label] for label in shown], shown, fontsize=8, loc="best")
        if ylabel.startswith("accuracy"):
            ax.set_ylim(-2, 102)
    if len(notes) > 1:  # the line style of each note, once for the figure
        fig.legend(handles=[plt.Line2D([], [], color="#555555", linestyle=styles[k % len(styles)], label=note)
                            for k, note in enumerate(notes)],
                   loc="outside lower center", ncol=len(notes), fontsize=8, frameon=False)
    fig.suptitle(f"{title}: curves ({_shown(notes, 'one line style per note')}; dotted grey: the selected "
                 f"model's {step_name})", fontsize=10)
    _save(fig, path)
