"""The report's figures of single classes and rows (matplotlib, Agg), each a PNG in the report folder:

    per_class.png         one small panel per row: per-class accuracy, classes sorted by training count,
                          bars coloured by shot group, the phase I baseline as a reference line
    confusion_<id>.png    a row's confusion matrix, rows normalised to recall, classes by training count
    curves_<id>.png       a row's training and evaluation curves from each note's ``history``

Rows are :class:`analysis.rows.Row` objects (``label``, ``stat(metric)``, ``per_class()``, ``head_size()``).
The summary figures that compare the rows (ablation bars, forest) are ``analysis.plots``'.
"""
from __future__ import annotations

import math
from pathlib import Path

# through the module, not its names: a test replaces figure_kit.save to watch the figures saved
from analysis import figure_kit
from engine.metrics import FEW_SHOT_BELOW, MANY_SHOT_ABOVE, shot_groups

# fixed figure sizes (inches at figure_kit.DPI) so the PNGs have a known size in pixels
PANEL_SIZE = (3.0, 2.2)     # one small multiple of per_class.png
PANEL_COLUMNS = 5
MAX_CELL_TEXT = 20          # confusion matrices print each cell's value up to this many classes
GROUP_COLOURS = {"many": "#4c72b0", "medium": "#55a868", "few": "#c44e52"}
GROUP_NAMES = {"many": f"many-shot (> {MANY_SHOT_ABOVE} images)", "medium": f"medium ({FEW_SHOT_BELOW}-{MANY_SHOT_ABOVE})",
               "few": f"few-shot (< {FEW_SHOT_BELOW})"}


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
    plt = figure_kit.pyplot()
    data = [(row, row.per_class()) for row in rows]
    data = [(row, d) for row, d in data if d is not None]
    if not data:
        fig, ax = plt.subplots(figsize=PANEL_SIZE, dpi=figure_kit.DPI)
        ax.text(0.5, 0.5, "no per-class data", ha="center", va="center")
        ax.set_axis_off()
        figure_kit.save(fig, path)
        return
    columns = min(PANEL_COLUMNS, len(data))
    lines = math.ceil(len(data) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * lines + 0.9),
                             dpi=figure_kit.DPI, sharey=True, squeeze=False, layout="constrained")
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
        ax.set_title(figure_kit.wrap(row.label, 34) + ("" if mean is None else f"  ({mean:.1f})"), fontsize=9)
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
    fig.suptitle(f"{config}: per-class test accuracy ({figure_kit.over_notes(notes, 'mean')}; title: top-1); x ticks: "
                 f"training images of the class", fontsize=10)
    figure_kit.save(fig, path)


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

    plt = figure_kit.pyplot()
    order = _class_order(counts)
    matrix = recall_matrix(confusions, order)
    size = len(order)
    values = np.array([[np.nan if v is None else v for v in line] for line in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(7.6, 6.6), dpi=figure_kit.DPI, layout="constrained")
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
    figure_kit.save(fig, path)
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
    plt = figure_kit.pyplot()
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(14.0, 4.2), dpi=figure_kit.DPI, layout="constrained")
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
    notes_text = figure_kit.over_notes(notes, "one line style per note")
    fig.suptitle(f"{title}: curves ({notes_text}; dotted grey: the selected model's {step_name})", fontsize=10)
    figure_kit.save(fig, path)
