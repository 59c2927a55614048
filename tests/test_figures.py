"""The report's figures from hand-written results.json files: the forest plot draws the report's own paired
intervals; every PNG opens at a sane size; ablation bars are the rows' means and stds, and at 25 rows (a full
suite) no two texts of ablation.png, per_class.png or forest.png overlap and none leaves the figure; per-class
panels stay fast and bounded at 25 rows x 100 classes; confusion matrices are recall over classes by training
count; curves only for trained rows."""
import json
import time
from pathlib import Path

import cv2
import pytest

import analysis.report
import analysis.stats
from analysis.detail_plots import recall_matrix
from analysis.report import build_report, report_dir
from analysis.rows import Row
from tests.test_report import CONFIG, COUNTS, NOTES, write_results


def add(path: Path, **extra) -> Path:
    path.write_text(json.dumps({**json.loads(path.read_text()), **extra}))
    return path


def history(steps: int) -> list[dict]:
    return [{"epoch": e, "loss": 2.0 / e, "train_acc": 50.0 + e, "top1": 40.0 + e, "head": 60.0, "tail": 20.0 + e}
            for e in range(1, steps + 1)]


@pytest.fixture()
def runs(tmp_path) -> Path:
    """Phase I, FSA offline and its control over three notes (paired differences with intervals), with
    confusion matrices; phase I and FSA trained (a history of 5 steps), the control with a single step."""
    confusion = [[8, 2, 0, 0], [1, 7, 2, 0], [0, 3, 6, 1], [2, 2, 2, 4]]
    for k, note in enumerate(NOTES):
        for phase, top1, tail, steps in (("phase_i", 60.0 + k, 20.0 + 3 * k, 5), ("phase_iii_offline", 66.0 + 2 * k, 30.0, 5),
                                         ("phase_iii_offline-none", 65.0 - k, 31.0 + k * k, 1)):
            add(write_results(tmp_path, phase, note, top1=top1, medium=50.0, few=30.0, head=80.0, tail=tail),
                confusion=confusion, history=history(steps), groups={"hr": 0.9, "head": [0, 1], "tail": [2, 3]})
    return tmp_path


def recording_forest(monkeypatch) -> list[list[dict]]:
    """What each forest_chart call of the report drew (read back from its artists)."""
    drawn: list[list[dict]] = []
    real = analysis.report.forest_chart

    def record(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(analysis.report, "forest_chart", record)
    return drawn


def test_forest_plot_draws_exactly_the_reports_paired_intervals(runs, monkeypatch):
    drawn = recording_forest(monkeypatch)
    build_report(CONFIG, NOTES, runs, echo=False)
    saved = json.loads((report_dir(CONFIG, NOTES, runs) / "report.json").read_text())
    (lines,) = drawn
    assert len(lines) == len(saved["paired"]) == 4  # FSA - control and FSA - phase I; top1 and tail
    for line, paired in zip(lines, saved["paired"]):
        assert line["label"] == f"{paired['method']} − {paired['reference']} ({paired['metric']})"  # no wrapping
        assert (line["metric"], line["n"]) == (paired["metric"], paired["n"]) and line["n"] == 3
        assert line["mean"] == pytest.approx(paired["mean"], abs=1e-12)
        assert line["ci95"] == pytest.approx(paired["ci95"], abs=1e-12)
    # the first line against a hand computation: FSA 66/68/70 - control 65/64/63 = 1, 4, 7: mean 4, sd 3,
    # half-width t(0.975, 2) 4.302653 x 3 / sqrt(3) = 7.452413
    assert lines[0]["label"] == "FSA offline − cRT control (offline, no fusion) (top1)"
    assert lines[0]["ci95"] == pytest.approx([4 - 7.452413, 4 + 7.452413], abs=1e-4)
    assert "![paired differences" in (report_dir(CONFIG, NOTES, runs) / "ablation.md").read_text()


def test_forest_plot_with_one_note_has_points_and_no_intervals(runs, monkeypatch):
    drawn = recording_forest(monkeypatch)
    data = build_report(CONFIG, ["seed1"], runs, echo=False)
    assert [line["ci95"] for line in drawn[0]] == [None] * len(data["paired"])
    assert [line["mean"] for line in drawn[0]] == [d["mean"] for d in data["paired"]]
    assert cv2.imread(data["files"]["forest.png"]) is not None


def test_without_paired_differences_forest_png_is_left_out_and_said_so(runs):
    build_report(CONFIG, NOTES, runs, echo=False)
    out = report_dir(CONFIG, NOTES, runs)
    assert (out / "forest.png").is_file()
    for phase in ("phase_iii_offline", "phase_iii_offline-none"):  # phase I alone: nothing to pair
        for note in NOTES:
            (runs / "checkpoints" / phase / CONFIG / note / "results.json").unlink()
    data = build_report(CONFIG, NOTES, runs, echo=False)
    assert "forest.png" not in data["files"] and not (out / "forest.png").exists()  # the old one is gone too
    assert "no forest.png" in (out / "ablation.md").read_text()


def test_every_png_of_the_report_opens_at_a_sane_size(runs):
    data = build_report(CONFIG, NOTES, runs, echo=False)
    pngs = {name: path for name, path in data["files"].items() if name.endswith(".png")}
    assert sorted(pngs) == ["ablation.png", "confusion_ce.png", "confusion_control_offline.png",
                            "confusion_fsa_offline.png", "curves_ce.png", "curves_fsa_offline.png", "forest.png",
                            "per_class.png"]  # the control's single-step history draws no curves
    for name, path in pngs.items():
        image = cv2.imread(path)
        assert image is not None, name
        height, width = image.shape[:2]
        assert 200 <= height <= 2000 and 600 <= width <= 2000, (name, image.shape)
        assert image.std() > 10, f"{name} is nearly blank"
    markdown = (report_dir(CONFIG, NOTES, runs) / "ablation.md").read_text()
    assert "[FSA offline](confusion_fsa_offline.png)" in markdown and "[FSA offline](curves_fsa_offline.png)" in markdown


def test_figures_of_rows_that_left_the_report_are_removed(runs):
    build_report(CONFIG, NOTES, runs, echo=False)
    out = report_dir(CONFIG, NOTES, runs)
    for note in NOTES:
        add(runs / "checkpoints/phase_iii_offline" / CONFIG / note / "results.json", history=history(1))
    build_report(CONFIG, NOTES, runs, echo=False)
    assert not (out / "curves_fsa_offline.png").exists() and (out / "curves_ce.png").is_file()


# the 21 labels of a report of --suite full then tailcalibx, and four more arms on other backbones: 25 rows; the
# last one too long for a line
SUITE_LABELS = ["Phase I baseline (CE)", "Focal loss", "Class-balanced CE", "Balanced softmax", "Logit-adjusted loss",
                "LDAM-DRW", "CosineCE", "CBD (class-balanced distillation)", "Post-hoc logit adjustment",
                "tau-normalised classifier", "LWS (learned class scales)", "cRT (re-trained classifier)",
                "cRT control (offline, no fusion)", "FSA offline", "cRT control (online, no fusion)", "FSA online",
                "TailCalib (offline)", "TailCalibX (online)", "TailCalib (offline) on CosineCE",
                "TailCalibX (online) on CosineCE", "cRT (re-trained classifier) on CosineCE", "FSA offline on CosineCE",
                "FSA online on CosineCE", "tau-normalised classifier on CosineCE",
                "TailCalibX (online) on CBD (class-balanced distillation)"]
SUITE_GROUPS = (["baseline"] + ["losses"] * 5 + ["cosine"] * 2 + ["decoupled"] * 4 + ["FSA"] * 4 + ["TailCalib"] * 4
                + [None] * 4 + ["TailCalib"])


def suite_rows(classes: int = 4) -> list[Row]:
    """25 rows over three notes with distinct metrics; LDAM-DRW has no few-shot class (n/a) and Focal loss
    only one note of 'many' (a bar without an error bar)."""
    counts = [int(500 * 0.01 ** (c / (classes - 1))) for c in range(classes)]
    rows = []
    for k, (label, group) in enumerate(zip(SUITE_LABELS, SUITE_GROUPS)):
        runs = {}
        for j, note in enumerate(NOTES):
            runs[note] = {metric: 20.0 + k * 2.5 + m * 3 + j * (1 + k % 3)
                          for m, metric in enumerate(analysis.report.METRICS)}
            runs[note].update(per_class=[float((c * 7 + k + j) % 100) for c in range(classes)],
                              train_counts=counts, groups={"head": list(range(max(1, classes * 3 // 10)))})
            if label == "LDAM-DRW":
                runs[note]["few"] = None
            if label == "Focal loss" and note != "seed0":
                runs[note]["many"] = None
        rows.append(Row(label, f"phase_x{k}", id=f"x{k}", group=group, runs=runs))
    return rows


def drawn_figure(monkeypatch) -> list:
    """The figures the plots module saves, kept open (drawn again by the caller) to measure their texts."""
    import analysis.figure_kit

    figures = []
    real = analysis.figure_kit.save
    monkeypatch.setattr(analysis.figure_kit, "save", lambda fig, path: figures.append(fig) or real(fig, path))
    return figures


def visible_texts(fig) -> list:
    """Every text the figure shows (titles, axis and tick labels, legend entries, annotations), its extent in
    pixels after drawing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    canvas = FigureCanvasAgg(fig)  # pyplot detached the closed figure from its canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = []
    for axes in fig.axes:
        if not axes.axison:
            continue
        for axis in (axes.xaxis, axes.yaxis):  # the tick labels in view of a shown axis (a twin hides one)
            if axis.get_visible():
                low, high = sorted(axis.get_view_interval())
                texts += [label for tick in axis.get_major_ticks() if low <= tick.get_loc() <= high
                          for label in (tick.label1, tick.label2)]
                texts.append(axis.label)
        texts += [axes.title, *axes.texts]
    texts += [text for legend in fig.legends for text in legend.get_texts()]
    texts += [fig._suptitle] if fig._suptitle is not None else []
    texts = [t for t in texts if isinstance(t, Text) and t.get_visible() and t.get_text().strip()]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts]


def assert_readable(fig) -> None:
    """No two texts of the figure overlap, and each lies inside the figure."""
    texts = visible_texts(fig)
    width, height = fig.canvas.get_width_height()
    assert fig.get_size_inches() * fig.dpi == pytest.approx([width, height]) and texts  # whole pixels
    for text, box in texts:
        assert 0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height, f"{text!r} leaves the figure: {box}"
    for k, (text, box) in enumerate(texts):
        for other, other_box in texts[k + 1:]:
            assert not box.overlaps(other_box), f"{text!r} {box} overlaps {other!r} {other_box}"


def test_ablation_bars_are_the_rows_means_and_stds(tmp_path):
    from analysis.plots import bar_chart

    rows = suite_rows()
    drawn = bar_chart(tmp_path / "ablation.png", CONFIG, NOTES, rows, analysis.report.METRICS)
    metrics = [m for m in analysis.report.METRICS if any(row.stat(m).n for row in rows)]
    assert [(d["metric"], d["label"]) for d in drawn] == [(m, row.label) for m in metrics for row in rows]
    for d in drawn:
        stat = next(row for row in rows if row.label == d["label"]).stat(d["metric"])
        assert d["mean"] == (None if stat.mean is None else pytest.approx(stat.mean, abs=1e-9)), d
        assert d["std"] == (None if stat.std is None else pytest.approx(stat.std, abs=1e-9)), d
    by = {(d["label"], d["metric"]): d for d in drawn}
    assert by["LDAM-DRW", "few"] == {"label": "LDAM-DRW", "metric": "few", "mean": None, "std": None}  # n/a, no bar
    assert by["Focal loss", "many"]["mean"] == 20.0 + 2.5 + 3 and by["Focal loss", "many"]["std"] is None
    assert by["Focal loss", "top1"]["std"] == pytest.approx(2.0)  # 22.5, 24.5, 26.5
    # one note: bars without error bars
    single = bar_chart(tmp_path / "one.png", CONFIG, ["seed0"], [Row(r.label, r.run_name, runs={"seed0": r.runs["seed0"]})
                                                                 for r in rows[:3]], analysis.report.METRICS)
    assert all(d["std"] is None for d in single) and single[0]["mean"] == rows[0].runs["seed0"]["top1"]


def test_ablation_of_25_rows_has_no_overlapping_text_and_grows_in_height(tmp_path, monkeypatch):
    from analysis.plots import bar_chart

    figures = drawn_figure(monkeypatch)
    bar_chart(tmp_path / "ablation.png", CONFIG, NOTES, suite_rows(), analysis.report.METRICS)
    (fig,) = figures
    assert_readable(fig)
    labels = [t.replace("\n", " ") for t, _ in visible_texts(fig)]
    # each label on both lines of metric panels; the first row's also in the legend (its dashed line)
    assert [labels.count(label) for label in SUITE_LABELS] == [3] + [2] * 24
    assert "n/a" in labels and SUITE_LABELS[0] in [t.get_text() for t in fig.legends[0].get_texts()]
    # the row labels sit left of their panels, not on the bars
    first = fig.axes[0]
    boxes = [label.get_window_extent() for label in first.get_yticklabels()]
    assert max(box.x1 for box in boxes) <= first.get_window_extent().x0 and len(boxes) == 25
    # bars thick enough to see and tell apart: at least 10 pixels each, 25 (24 where n/a) to a panel
    bars = [[patch for patch in axes.patches if patch.get_width() > 0 and patch.get_height() < 1] for axes in fig.axes]
    assert [len(panel) for panel in bars] == [25, 25, 25, 24, 25, 25]
    assert min(patch.get_window_extent().height for panel in bars for patch in panel) >= 10
    assert "\n" in first.get_yticklabels()[-1].get_text()  # the long label wrapped, its row 1.7 rows high
    image = cv2.imread(str(tmp_path / "ablation.png"))
    assert image.shape == (1064, 900, 3)  # 100 + 2 lines x (45 + 25.7 rows x 17) pixels, 900 wide
    # five metrics (a smoke report has no many-shot class): the third column's x axis under its only panel
    bar_chart(tmp_path / "five.png", CONFIG, NOTES, suite_rows(), ("top1", "medium", "few", "head", "tail"))
    assert_readable(figures[1])
    texts = visible_texts(figures[1])
    assert [t for t, _ in texts].count("test accuracy (%)") == 3 and [t for t, _ in texts].count("100") == 3


def test_per_class_panels_of_25_rows_and_100_classes_are_fast_bounded_and_readable(tmp_path, monkeypatch):
    from analysis.detail_plots import per_class_chart

    figures = drawn_figure(monkeypatch)
    rows = suite_rows(classes=100)
    start = time.perf_counter()
    per_class_chart(tmp_path / "per_class.png", CONFIG, NOTES, rows)
    assert time.perf_counter() - start < 60  # about 10 s on a busy 2-core machine
    image = cv2.imread(str(tmp_path / "per_class.png"))
    assert image.shape == (1190, 1500, 3)  # 5 x 5 panels of 300 x 220 pixels, 90 pixels of title and legend
    assert (tmp_path / "per_class.png").stat().st_size < 1_000_000
    assert_readable(figures[0])
    for axes in figures[0].axes:  # a panel's class counts stay under it, apart from the next panel's
        inside = axes.get_window_extent()
        for label in axes.get_xticklabels():
            box = label.get_window_extent()
            assert inside.x0 - 1 <= box.x0 and box.x1 <= inside.x1 + 1, (label.get_text(), box, inside)


def test_forest_of_a_full_suite_has_no_overlapping_text(tmp_path, monkeypatch):
    from analysis.plots import forest_chart

    figures = drawn_figure(monkeypatch)
    rows = suite_rows()
    diffs = [d for row in rows[1:] for d in analysis.stats.paired_runs(row.label, row.runs, rows[0].label, rows[0].runs)]
    assert len(diffs) == 48  # top1 and tail of 24 rows against the first
    forest_chart(tmp_path / "forest.png", f"{CONFIG}: paired differences", diffs)
    assert_readable(figures[0])


def test_confusion_rows_are_recall_averaged_over_notes_in_training_count_order():
    from analysis.detail_plots import _class_order

    order = _class_order([5, 50, 20, 50])
    assert order == [1, 3, 2, 0]  # largest first, ties by class index (as the head / tail split)
    first = [[1, 1, 2], [0, 8, 2], [0, 0, 0]]   # class 2 has no test image in this run
    second = [[2, 0, 2], [5, 5, 0], [1, 1, 2]]
    matrix = recall_matrix([first, second], [1, 2, 0])  # columns too in the order class 1, 2, 0
    assert matrix[0] == pytest.approx([(0.8 + 0.5) / 2, (0.2 + 0) / 2, (0 + 0.5) / 2])      # true class 1
    assert matrix[1] == pytest.approx([0.25, 0.5, 0.25])                                    # class 2: second run only
    assert matrix[2] == pytest.approx([(0.25 + 0) / 2, (0.5 + 0.5) / 2, (0.25 + 0.5) / 2])  # true class 0
    assert recall_matrix([[[0, 0], [1, 1]]], [0, 1])[0] == [None, None]  # never tested: no row, not zeros


def test_confusion_png_of_100_classes_prints_no_cell_values(tmp_path, monkeypatch):
    import matplotlib.axes

    from analysis.detail_plots import confusion_chart

    texts = []
    real = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, *a, **k: texts.append(a) or real(self, *a, **k))
    size = 100
    confusion = [[10 if i == j else (1 if j == (i + 1) % size else 0) for j in range(size)] for i in range(size)]
    confusion_chart(tmp_path / "big.png", "100 classes", [confusion], list(range(500, 0, -5)), 30)
    assert texts == []
    image = cv2.imread(str(tmp_path / "big.png"))
    assert image is not None and image.shape == (660, 760, 3)
    confusion_chart(tmp_path / "small.png", "4 classes", [[[8, 2, 0, 0], [1, 7, 2, 0], [0, 3, 6, 1], [2, 2, 2, 4]]],
                    COUNTS, 2)
    assert len(texts) == 12  # every cell with a share of at least 0.005: 16 cells less the four zeros


def test_forest_of_variants_names_the_row_once(tmp_path, monkeypatch):
    from analysis.report import build_variant_report

    drawn = recording_forest(monkeypatch)
    for k, note in enumerate(NOTES):
        write_results(tmp_path, "phase_i", note, top1=60.0 + k, tail=20.0)
        write_results(tmp_path, "phase_i", f"lr05-{note}", top1=61.0 + 2 * k, tail=22.0)
    data = build_variant_report(CONFIG, ["default", "lr05"], [0, 1, 2], tmp_path, echo=False)
    assert [line["label"] for line in drawn[0]] == ["Phase I baseline (CE): lr05 − default (top1)",
                                                    "Phase I baseline (CE): lr05 − default (tail)"]
    assert [line["ci95"] for line in drawn[0]] == [d["ci95"] for d in data["paired"]]


def test_grad_cam_grid_has_a_colour_bar_and_labels_drawn_once():
    import numpy as np

    from fsa.visualization import colour_bar_width, label_panel, render_grid

    images = np.full((2, 32, 32, 3), 128, dtype=np.uint8)
    cams = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4).repeat(2, axis=0)
    grid = render_grid(images, cams, 0.8, 0.2, panel=128, titles=["7:star #271"] * 2, subtitles=["pred circle"] * 2)
    width = colour_bar_width(128)
    assert grid.shape == (256, 4 * 128 + width, 3)
    bar = grid[:, 4 * 128:]
    column = bar[:, 3 + max(6, width // 4) // 2]  # down the middle of the colour strip: JET from CAM 1 to 0
    coloured = [px for px in column.astype(int) if px.max() - px.min() > 60]  # the strip, not text or white
    assert coloured[0][2] > 100 and coloured[0][0] < 50     # top: red (BGR), CAM 1
    assert coloured[-1][0] > 100 and coloured[-1][2] < 50   # bottom: blue, CAM 0
    # a label is white text on a darkened band, drawn once: no black outline pixels (a second, thicker black
    # copy under the text read as ghosted double text)
    panel = np.full((128, 128, 3), 128, dtype=np.uint8)
    label_panel(panel, "specific M>=0.8")
    band = panel[:16, :100]
    assert band.min() >= 128 * 0.35 - 1 and band.max() >= 250
