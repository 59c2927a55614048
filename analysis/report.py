"""The ablation report of one config: every method's selected-model test numbers side by side.

    python report.py --config smoke                                  # note 'default'
    python report.py --config cifar10-LT_resnet18 --notes seed0 seed1 seed2

Reads ``checkpoints/<phase>/<config>/<note>/results.json`` of every finished run (one that exists
but cannot be read stops the report with an error naming it) and writes ``reports/<config>/``:

    ablation.md     the table (also printed), with a note on what the numbers are, then the paired
                    differences: each FSA run minus its same-mode cRT control and minus phase I, per
                    note, their mean and 95% t-interval over notes, and whether it excludes 0
    ablation.csv    one line per row; mean and std in separate columns, empty cell = absent / undefined
    ablation.png    grouped bar chart (mean, error bar = sample std over notes)
    per_class.png   per-class accuracy against training-class size (log x), one line per row
    report.json     everything above, machine-readable (``paired``), plus the source files

The numbers are the top-level ones of ``results.json``: the test evaluation of each run's selected
model (``checkpoint_selection``): the best validation score where the run has a validation split
(``dataset.val``), else the final evaluation. Test images never select anything.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from analysis.plots import bar_chart, per_class_chart
from engine.methods import METHODS
from utils.config import config_name
from utils.errors import UserError
from utils.run_dir import RunPaths, load_results, read_results, write_json_atomic

__all__ = ["METRICS", "REPORT_DIR", "discover_rows", "collect", "build_report", "format_value", "run",
           "report_dir", "is_up_to_date"]

METRICS: tuple[str, ...] = ("top1", "many", "medium", "few", "head", "tail")
PAIRED_METRICS: tuple[str, ...] = ("top1", "tail")
# two-sided 95% critical values of Student's t for 1..30 degrees of freedom
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)
REPORT_DIR = "reports"
ABSENT = "—"


def report_dir(config: str, root: Path = Path(".")) -> Path:
    return Path(root) / REPORT_DIR / config_name(config)


# ------------------------------------------------------------------------------------------------
# Collecting and aggregating
# ------------------------------------------------------------------------------------------------
@dataclass
class Stat:
    """A metric over notes: mean, sample std (None with fewer than 2 values), n, the values."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) >= 2 else None

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": self.values}


def t_critical_95(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, then the
    Cornish-Fisher expansion around the normal quantile, within 1e-4 of the exact value)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass
class PairedDifference:
    """``method - reference`` of one metric, note by note (only notes where both have the metric)."""

    method: str
    reference: str
    metric: str
    per_note: dict[str, float]

    @property
    def n(self) -> int:
        return len(self.per_note)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.per_note.values()) if self.per_note else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% t-interval of the mean difference (needs two or more notes)."""
        if self.n < 2:
            return None
        half = t_critical_95(self.n - 1) * statistics.stdev(self.per_note.values()) / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    def verdict(self) -> str:
        """One sentence a reader can quote."""
        if self.interval is None:
            return "one note only: no interval; run more seeds (--seeds 0 1 2)"
        low, high = self.interval
        if low > 0:
            return f"higher: the interval excludes 0 (+{low:.2f} to +{high:.2f} points)"
        if high < 0:
            return f"lower: the interval excludes 0 ({low:.2f} to {high:.2f} points)"
        return f"no difference shown: the interval includes 0 at n = {self.n}"

    def as_dict(self) -> dict:
        interval = self.interval
        return {"method": self.method, "reference": self.reference, "metric": self.metric, "n": self.n,
                "per_note": self.per_note, "mean": self.mean,
                "ci95": None if interval is None else list(interval),
                "excludes_zero": None if interval is None else (interval[0] > 0 or interval[1] < 0),
                "verdict": self.verdict()}


def paired_differences(rows: list["Row"], extra: list[tuple[str, str]] = ()) -> list[PairedDifference]:
    """Every paired comparison of the method table (each method against its control, then against
    the phase I baseline), then the ``extra`` ``(row id, reference row id)`` pairs asked for, whose two rows
    share at least one note, for each ``PAIRED_METRICS``."""
    by_phase = {row.phase: row for row in rows}
    by_id = {row.id: row for row in rows if row.id}
    if unknown := sorted({i for pair in extra for i in pair} - set(by_id)):
        raise UserError(f"--pairs names row id(s) {', '.join(unknown)} that have no finished run in this report; "
                        f"the rows' ids: {', '.join(by_id)}. Write each pair as METHOD:REFERENCE, e.g. "
                        f"fsa_offline:crt.")
    pairs = [(arm.folder, reference.folder) for arm, reference in METHODS.paired()]
    pairs += [(by_id[a].phase, by_id[b].phase) for a, b in extra]
    out = []
    for a_phase, b_phase in dict.fromkeys(pairs):
        if a_phase not in by_phase or b_phase not in by_phase:
            continue
        a, b = by_phase[a_phase], by_phase[b_phase]
        for metric in PAIRED_METRICS:
            per_note = {note: float(a.runs[note][metric]) - float(b.runs[note][metric])
                        for note in a.runs if note in b.runs
                        and _is_number(a.runs[note].get(metric)) and _is_number(b.runs[note].get(metric))}
            if per_note:
                out.append(PairedDifference(a.label, b.label, metric, per_note))
    return out


@dataclass
class Row:
    label: str
    phase: str                 # its run folder under checkpoints/
    id: str | None = None      # the method-table id (None: a run folder the table does not know)
    group: str | None = None
    runs: dict[str, dict] = field(default_factory=dict)  # note -> results.json of a finished run
    sources: dict[str, str] = field(default_factory=dict)  # note -> path of that results.json

    @property
    def n(self) -> int:
        return len(self.runs)

    def stat(self, metric: str) -> Stat:
        values = [float(r[metric]) for r in self.runs.values() if _is_number(r.get(metric))]
        return Stat(values)

    def per_class(self) -> tuple[list[int], list[float | None]] | None:
        """``(train_counts, per-class accuracy averaged over notes)``; None without per-class data."""
        runs = [r for r in self.runs.values() if r.get("per_class") and r.get("train_counts")]
        if not runs:
            return None
        counts = list(runs[0]["train_counts"])
        runs = [r for r in runs if len(r["per_class"]) == len(counts)]
        accuracy: list[float | None] = []
        for c in range(len(counts)):
            values = [float(r["per_class"][c]) for r in runs if _is_number(r["per_class"][c])]
            accuracy.append(statistics.fmean(values) if values else None)
        return counts, accuracy


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def discover_rows(config: str, root: Path = Path(".")) -> list[Row]:
    """Empty rows of the method table's arms (phase I methods, then each phase III method on each
    backbone), then every other ``checkpoints/phase_iii_*/<config>`` folder (label = folder)."""
    rows = [Row(a.label, a.folder, a.id, a.group) for a in METHODS.arms()]
    known = {row.phase for row in rows}
    ckpt_root = Path(root) / "checkpoints"
    if ckpt_root.is_dir():
        for folder in sorted(ckpt_root.glob("phase_iii_*")):
            if folder.name not in known and (folder / config).is_dir():
                rows.append(Row(folder.name, folder.name))
    return rows


def _rerun_command(phase: str, config: str, note: str) -> str:
    """The command that writes ``checkpoints/<phase>/<config>/<note>`` again from scratch."""
    arm = METHODS.by_folder(phase)
    if arm is None:
        return f"the command that made checkpoints/{phase}/{config}/{note}, with --overwrite"
    return arm.command(config, note, "--overwrite")


def collect(config: str, notes: list[str], root: Path = Path(".")) -> list[Row]:
    """Rows with at least one finished run among ``notes``; the others are omitted.

    A ``results.json`` that exists but cannot be read is a UserError naming every such file: a table
    that silently lacks a seed would be taken for the complete result."""
    config = config_name(config)
    rows, broken = [], []
    for row in discover_rows(config, root):
        phase = row.phase
        for note in notes:
            path = RunPaths(phase, config, note, Path(root)).results
            try:
                results = load_results(path)
            except ValueError as exc:
                broken.append(f"{path} ({exc}; rewrite it with: {_rerun_command(phase, config, note)})")
                continue
            if results and results.get("finished") and results.get("mode") != "test":
                row.runs[note] = results
                row.sources[note] = str(path)
        if row.runs:
            rows.append(row)
    if broken:
        raise UserError(
            f"cannot read the results.json of {len(broken)} run(s), so the report would silently lack them: "
            f"{'; '.join(broken)}. Rerun each such run with --overwrite as shown, or delete its run folder if the "
            f"run should not count, then build the report again."
        )
    return rows


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def format_value(stat: Stat, several_notes: bool, row_n: int) -> str:
    """``'71.25'``, ``'71.25 ± 1.30'``; the absent group ``'—'``; a metric with fewer values than
    the row has runs says so (``(n=2)``)."""
    if stat.n == 0:
        return ABSENT
    text = f"{stat.mean:.2f}"
    if several_notes and stat.std is not None:
        text += f" ± {stat.std:.2f}"
    if several_notes and stat.n != row_n:
        text += f" (n={stat.n})"
    return text


def _markdown_table(rows: list[Row], several: bool) -> str:
    header = ["method", *METRICS] + (["n"] if several else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    group: object = ()
    for row in rows:
        if row.group != group:  # a header row per method-table group (baseline, decoupled, FSA, TailCalib)
            group = row.group
            lines.append(f"| *{group or 'other'}* |" + " |" * (len(header) - 1))
        cells = [row.label, *(format_value(row.stat(m), several, row.n) for m in METRICS)]
        if several:
            cells.append(str(row.n))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _upstream_results(run: dict, root: Path) -> list[dict] | None:
    """The finished runs a run's model was built from, recursively: the phase I run a phase III run started
    from (``phase_i_checkpoint``) and a distilled run's teachers (``teachers``). None when one of them has
    no readable results.json (its cost is then unknown, never taken as 0)."""
    sources = [run["phase_i_checkpoint"]] if run.get("phase_i_checkpoint") else []
    sources += list(run.get("teachers") or [])
    found: list[dict] = []
    for checkpoint in sources:
        path = Path(checkpoint)
        results = read_results((path if path.is_absolute() else Path(root) / path).parent / "results.json")
        upstream = _upstream_results(results, root) if results and results.get("finished") else None
        if upstream is None:
            return None
        found += [results, *upstream]
    return found


COST_KEYS = ("samples_seen", "wall_time_s")


def _row_cost(row: Row, root: Path) -> dict[str, Stat]:
    """A row's training cost over notes: each ``COST_KEYS`` value of its own runs, and as ``total_<key>`` the
    same plus that of every run its model was built from (backbone, teachers), read once per run."""
    totals: dict[str, list[float]] = {key: [] for key in COST_KEYS}
    for run in row.runs.values():
        upstream = _upstream_results(run, root)
        if upstream is None:
            continue
        parts = [run, *upstream]
        for key in COST_KEYS:
            if all(_is_number(r.get(key)) for r in parts):
                totals[key].append(sum(float(r[key]) for r in parts))
    return {**{key: row.stat(key) for key in COST_KEYS}, **{f"total_{key}": Stat(totals[key]) for key in COST_KEYS}}


def _cost_markdown(rows: list[Row], costs: dict[str, dict[str, Stat]]) -> list[str]:
    """Each row's training cost (``_row_cost``, by run folder): rows through the trained part (samples_seen)
    and wall time, its own and with the runs its model was built from; means over notes."""
    lines = ["", "## Training cost", "",
             "| method | rows trained on | wall time (s) | with backbone and teachers: rows | wall time (s) |",
             "|:---|---:|---:|---:|---:|"]

    def cell(stat: Stat, form: str) -> str:
        return ABSENT if stat.mean is None else format(stat.mean, form)

    for row in rows:
        cost = costs[row.phase]
        cells = [cell(cost["samples_seen"], ",.0f"), cell(cost["wall_time_s"], ".1f"),
                 cell(cost["total_samples_seen"], ",.0f"), cell(cost["total_wall_time_s"], ".1f")]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines += ["", "Rows trained on: images (phase I), batch rows (FSA, cRT control: iterations x batch) or feature "
              "rows (TailCalib, LWS, cRT: epochs x rows) that passed through the trained part; 0 = chosen, not "
              "trained (post-hoc). The last two columns add the runs the row's model was built from: the phase I "
              "run a phase III row starts from, and a distilled run's teacher runs (CBD: its CosineCE teachers), so "
              "rows compare as compute-matched or not; phase II's extraction, shared by the offline rows, is not "
              "counted. — = not recorded. Mean over the notes."]
    return lines


def _selection_text(rows: list[Row]) -> str:
    ways = {(r.get("checkpoint_selection") or {}).get("by", "final") for row in rows for r in row.runs.values()}
    texts = {"val": "the evaluation with the best validation mean class accuracy (validation split held out, "
                    "`dataset.val`)",
             "final": "the final evaluation (no validation split: nothing selected)"}
    return "; ".join(f"{texts.get(w, w)}" for w in sorted(ways))


def _hr_values(rows: list[Row]) -> list[float]:
    values = {r.get("groups", {}).get("hr") for row in rows for r in row.runs.values()}
    return sorted(v for v in values if _is_number(v))


def _markdown(config: str, notes: list[str], rows: list[Row], costs: dict[str, dict[str, Stat]],
              diffs: list[PairedDifference]) -> str:
    several = len(notes) > 1
    if several:
        shown = (f"mean ± sample standard deviation over the notes {', '.join(f'`{n}`' for n in notes)} "
                 f"(n = number of notes with a finished run of that row; no ± when n = 1)")
    else:
        shown = f"one run per row, note `{notes[0]}`"
    hr = _hr_values(rows)
    hr_text = f" (hr = {', '.join(f'{v:g}' for v in hr)})" if hr else ""
    parts = [
        f"# Ablation: `{config}`",
        "",
        _markdown_table(rows, several),
        "",
        f"Test accuracy (%) of each run's **selected model** (the top-level numbers of its `results.json`): "
        f"{_selection_text(rows)}; the test images never select anything. Shown: {shown}.",
        "",
        f"Groups from the training counts: many > 100, medium 20..100, few < 20 images per class; head = "
        f"the fewest largest classes holding a share hr of the training samples{hr_text}, tail = the rest. "
        f"{ABSENT} = the group has no class in this training set (absent, not 0).",
    ]
    parts += _cost_markdown(rows, costs)
    parts += _paired_markdown(diffs)
    missing = [f"{row.label}: {', '.join(n for n in notes if n not in row.runs)}"
               for row in rows if row.n < len(notes)]
    if missing:
        parts += ["", "No finished run for: " + "; ".join(missing) + "."]
    parts += ["", "Run folders: " + ", ".join(f"{row.label} = `checkpoints/{row.phase}/{config}/<note>`" for row in rows) + "."]
    return "\n".join(parts) + "\n"


def _paired_markdown(diffs: list[PairedDifference]) -> list[str]:
    if not diffs:
        return []
    lines = ["", "## Paired differences (percentage points, method − reference, same note = same seed)", "",
             "| method | reference | metric | per note | mean | 95% t-interval | reading |",
             "|:---|:---|:---|:---|---:|:---:|:---|"]
    for d in diffs:
        per_note = ", ".join(f"{note} {value:+.2f}" for note, value in d.per_note.items())
        interval = "—" if d.interval is None else f"[{d.interval[0]:+.2f}, {d.interval[1]:+.2f}]"
        lines.append(f"| {d.method} | {d.reference} | {d.metric} | {per_note} | {d.mean:+.2f} | {interval} | "
                     f"{d.verdict()} |")
    lines += ["", "Each difference pairs two runs of the same note (seed, data subset and phase I backbone); the "
              "interval is mean ± t(0.975, n−1) · sd / √n over the notes where both runs finished. An interval "
              "that includes 0 means this many seeds cannot tell the two apart."]
    return lines


def _csv(rows: list[Row], notes: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "phase", "n", "notes", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std"))])
    for row in rows:
        cells = [row.label, row.phase, row.n, " ".join(n for n in notes if n in row.runs)]
        for m in METRICS:
            stat = row.stat(m)
            cells += ["" if stat.mean is None else f"{stat.mean:.4f}", "" if stat.std is None else f"{stat.std:.4f}"]
        writer.writerow(cells)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
def _report_json(config: str, notes: list[str], rows: list[Row], files: dict, costs: dict[str, dict[str, Stat]],
                 diffs: list[PairedDifference]) -> dict:
    out_rows = []
    for row in rows:
        per_class = row.per_class()
        out_rows.append({
            "id": row.id,
            "group": row.group,
            "label": row.label,
            "phase": row.phase,
            "n": row.n,
            "notes": [n for n in notes if n in row.runs],
            "missing_notes": [n for n in notes if n not in row.runs],
            "metrics": {m: row.stat(m).as_dict() for m in METRICS},
            "per_class": None if per_class is None else {"train_counts": per_class[0], "accuracy": per_class[1]},
            # training cost: its own, and with the runs its model was built from (backbone, teachers)
            "cost": {key: stat.as_dict() for key, stat in costs[row.phase].items()},
            "sources": row.sources,
        })
    return {
        "config": config,
        "notes": notes,
        "evaluation": "selected",
        "numbers": "test accuracy (%) of each run's selected model (results.json top level; checkpoint_selection: "
                   "best validation score, or final without a validation split); "
                   "mean and sample std (ddof 1) over notes; null = absent group or undefined std",
        "metrics": list(METRICS),
        "rows": out_rows,
        "paired": [d.as_dict() for d in diffs],
        "files": files,
    }


def build_report(config: str, notes: list[str], root: Path = Path("."), *, echo: bool = True,
                 pairs: list[tuple[str, str]] = ()) -> dict:
    """Write the report of ``config`` over ``notes`` to ``reports/<config>/`` under ``root``; ``pairs``: further
    ``(row id, reference row id)`` paired differences beyond the method table's."""
    config = config_name(config)
    notes = list(dict.fromkeys(notes))
    if not notes:
        raise UserError("--notes needs at least one note name (e.g. --notes default).")
    rows = collect(config, notes, root)
    if not rows:
        looked = ", ".join(f"checkpoints/{m.folder}/{config}/<note>" for m in list(METHODS)[:4])
        raise UserError(
            f"No finished run of config '{config}' for note(s) {', '.join(notes)} (looked for results.json with "
            f"finished: true in {looked}, ...). Run the phases first, e.g. python pipeline.py --config {config}"
            + ("" if notes == ["default"] else " (or pass the notes the runs were made with: --notes NOTE ...)") + "."
        )
    diffs = paired_differences(rows, list(pairs))
    costs = {row.phase: _row_cost(row, root) for row in rows}
    out = report_dir(config, root)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: str(out / name) for name in ("ablation.md", "ablation.csv", "ablation.png", "per_class.png", "report.json")}
    markdown = _markdown(config, notes, rows, costs, diffs)
    (out / "ablation.md").write_text(markdown)
    (out / "ablation.csv").write_text(_csv(rows, notes))
    bar_chart(out / "ablation.png", config, notes, rows, METRICS)
    per_class_chart(out / "per_class.png", config, notes, rows)
    data = _report_json(config, notes, rows, files, costs, diffs)
    write_json_atomic(out / "report.json", data)  # written last: it marks a complete report
    if echo:
        print(markdown, flush=True)
        print(f"report written to {out}/ (ablation.md, ablation.csv, ablation.png, per_class.png, report.json)", flush=True)
    return data


def is_up_to_date(config: str, notes: list[str], root: Path = Path(".")) -> bool:
    """Whether ``reports/<config>/report.json`` was made for these notes from exactly the finished
    runs that exist now, after each of them finished (so regenerating it would change nothing)."""
    out = report_dir(config, root)
    path = out / "report.json"
    saved = read_results(path)
    if not saved or saved.get("notes") != list(dict.fromkeys(notes)):
        return False
    if not all((out / name).is_file() for name in ("ablation.md", "ablation.csv", "ablation.png", "per_class.png")):
        return False
    current = {(row.phase, note): src for row in collect(config, notes, root) for note, src in row.sources.items()}
    recorded = {(row["phase"], note): src for row in saved.get("rows", []) for note, src in row.get("sources", {}).items()}
    if current != recorded:
        return False
    made = path.stat().st_mtime
    return all(Path(src).stat().st_mtime <= made for src in current.values())


def run(config: str, notes: list[str], pairs: list[tuple[str, str]] = ()) -> dict:
    return build_report(config, notes, Path("."), pairs=pairs)
