"""The ablation report of one config: every method's selected-model test numbers side by side.

    python report.py --config smoke                                      # reports/smoke/default/
    python report.py --config cifar10-LT_resnet18 --notes seed0 seed1 seed2  # .../seed0+seed1+seed2/

Reads ``checkpoints/<phase>/<config>/<note>/results.json`` of every finished run and writes
``reports/<config>/<notes>/``, one folder per note set (``notes_folder``: ``default``,
``seed0+seed1+seed2``), so that the reports of other note sets stay:

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

The report refuses, with an error naming the runs and the fix, what would print numbers of runs that do
not belong together: a ``results.json`` that exists but cannot be read, or holds a metric that is
neither a finite number nor null (absent); runs whose saved settings differ where they must agree
(``check_settings_agree``); a phase III run whose phase I run changed since it started from it
(``check_phase_i_sources``, phase III's own provenance check).
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from analysis.plots import bar_chart, per_class_chart
from engine.artifacts import check_provenance, sha256_file
from engine.methods import METHODS
from utils.config import config_differences, config_name, read_yaml
from utils.errors import UserError
from utils.run_dir import MAX_NAME_LENGTH, RunPaths, load_results, read_results, write_json_atomic

__all__ = ["METRICS", "REPORT_DIR", "discover_rows", "collect", "check_settings_agree", "check_phase_i_sources",
           "build_report", "format_value", "run", "notes_folder", "report_dir", "is_up_to_date"]

METRICS: tuple[str, ...] = ("top1", "many", "medium", "few", "head", "tail")
COST_KEYS = ("samples_seen", "wall_time_s")
PAIRED_METRICS: tuple[str, ...] = ("top1", "tail")
# two-sided 95% critical values of Student's t for 1..30 degrees of freedom
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)
REPORT_DIR = "reports"
NOTES_HASH_LENGTH = 12  # hex digits of the hash that ends a long note set's folder name
ABSENT = "—"


def notes_folder(notes: list[str]) -> str:
    """The report folder name of a note set: the note itself (``default``), or the sorted notes joined with
    '+' (``seed0+seed1+seed2``); past MAX_NAME_LENGTH characters a readable prefix of that joined name and a
    hash of the whole, so that no two note sets share a folder."""
    joined = "+".join(sorted(set(notes)))
    if len(joined) <= MAX_NAME_LENGTH:
        return joined
    digest = hashlib.sha256(joined.encode()).hexdigest()[:NOTES_HASH_LENGTH]
    return f"{joined[:MAX_NAME_LENGTH - NOTES_HASH_LENGTH - 1]}-{digest}"


def report_dir(config: str, notes: list[str], root: Path = Path(".")) -> Path:
    """``reports/<config>/<notes_folder(notes)>/`` under ``root``: the folder of one note set's report."""
    return Path(root) / REPORT_DIR / config_name(config) / notes_folder(notes)


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


def _not_numbers(results: dict) -> list[str]:
    """The metrics of a finished run that are present but neither a finite number nor null (absent group)."""
    return [f"{key} is {results[key]!r}" for key in (*METRICS, *COST_KEYS)
            if results.get(key) is not None and not _is_number(results[key])]


def collect(config: str, notes: list[str], root: Path = Path(".")) -> list[Row]:
    """Rows with at least one finished run among ``notes``; the others are omitted.

    A ``results.json`` that exists but cannot be read, or whose metrics (``METRICS``, ``COST_KEYS``) are
    present but not finite numbers, is a UserError naming every such file: a table that silently lacks a
    seed, or shows a string as absent, would be taken for the complete result."""
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
                if bad := _not_numbers(results):
                    broken.append(f"{path} ({', '.join(bad)}: not a finite number or null; rewrite it with: "
                                  f"{_rerun_command(phase, config, note)})")
                    continue
                row.runs[note] = results
                row.sources[note] = str(path)
        if row.runs:
            rows.append(row)
    if broken:
        raise UserError(
            f"cannot read the results.json of {len(broken)} run(s), so the report would silently lack them or show "
            f"them wrong: "
            f"{'; '.join(broken)}. Rerun each such run with --overwrite as shown, or delete its run folder if the "
            f"run should not count, then build the report again."
        )
    return rows


# the saved settings every run of a report shares (only the seed may differ): its training data and class
# counts; the notes of one row also share its model section (rows differ there by design, e.g. a cosine
# classifier, LDAM's fixed scale)
SHARED_SETTINGS = ("dataset", "train_counts")
ROW_SETTINGS = ("model",)
# dataset keys that say where the files are and whether to fetch them, not what the data is
DATA_LOCATION = ("root", "download")


def _report_command(config: str, notes: list[str]) -> str:
    return shlex.join(["python", "report.py", "--config", config, "--notes", *notes])


def _settings(config: str, row: Row, note: str, run: dict, root: Path) -> dict:
    """The settings of a run that must agree (``SHARED_SETTINGS``, ``ROW_SETTINGS``): the sections of its saved
    ``config.yaml`` (phase I runs; phases II / III take theirs from their phase I run and save none) and the
    ``train_counts`` of its results.json; what the run does not record is left out."""
    path = RunPaths(row.phase, config, note, Path(root)).checkpoint_dir / "config.yaml"
    try:
        saved = read_yaml(path) if path.is_file() else {}
    except UserError as exc:
        raise UserError(f"{str(exc).rstrip('.')}; it is the saved config of a run of this report, which must be read "
                        f"to check the run's settings against the others. Rewrite it with: "
                        f"{_rerun_command(row.phase, config, note)}") from exc
    settings = {key: saved[key] for key in (*SHARED_SETTINGS, *ROW_SETTINGS) if isinstance(saved.get(key), dict)}
    if "dataset" in settings:
        settings["dataset"] = {k: v for k, v in settings["dataset"].items() if k not in DATA_LOCATION}
    if run.get("train_counts") is not None:
        settings["train_counts"] = run["train_counts"]
    return settings


def check_settings_agree(config: str, notes: list[str], rows: list[Row], root: Path = Path(".")) -> None:
    """UserError naming the runs and keys unless every run has the ``SHARED_SETTINGS`` of the first run that
    records them and every run of a row the ``ROW_SETTINGS`` of the row's first: a mean over notes, or a
    paired difference, of runs on other data or models would read as one experiment."""
    config = config_name(config)
    shared: dict[str, tuple[str, object]] = {}  # key -> (which run, value) of the first run that records it
    differing, odd_notes = [], set()
    for row in rows:
        own: dict[str, tuple[str, object]] = {}
        for note, run in row.runs.items():
            where = f"{row.label}, note '{note}'"
            against: dict[str, list[str]] = {}
            for key, value in _settings(config, row, note, run, root).items():
                first = own if key in ROW_SETTINGS else shared
                if key not in first:
                    first[key] = (where, value)
                elif keys := config_differences({key: first[key][1]}, {key: value}):
                    against.setdefault(first[key][0], []).extend(keys)
            if against:
                odd_notes.add(note)
                folder = RunPaths(row.phase, config, note, Path(root)).checkpoint_dir
                differing.append(f"{where} ({folder}) differs from " + " and from ".join(
                    f"{other} in {', '.join(keys)}" for other, keys in against.items()))
    if differing:
        kept = [n for n in notes if n not in odd_notes]
        raise UserError(
            f"{len(differing)} run(s) of this report were made with other settings than the runs they would be "
            f"averaged or paired with (the saved config.yaml's dataset and model sections and the class counts must "
            f"agree; only the seed may differ): {'; '.join(differing)}. Report each setting on its own with the notes "
            f"that share it" + (f", e.g. {_report_command(config, kept)}" if kept else "") + ", or rerun the differing "
            f"runs with the settings of the others (--overwrite)."
        )


def _under_root(recorded: str | Path, root: Path) -> Path:
    """A path a run recorded: absolute, or relative to the working directory it ran in (the report's root)."""
    path = Path(recorded)
    return path if path.is_absolute() else Path(root) / path


def _provenance_failure(features_dir: Path, checkpoint: Path, phase_i_config: Path) -> str | None:
    """Why phase III's provenance check of ``features_dir`` against this phase I checkpoint and config fails;
    None when it passes."""
    try:
        check_provenance(features_dir, checkpoint, phase_i_config)
    except UserError as exc:
        return str(exc).rstrip(".")
    return None


def check_phase_i_sources(config: str, notes: list[str], rows: list[Row], root: Path = Path(".")) -> None:
    """UserError naming the runs and the fix unless every phase III run of the method table still pairs with
    the phase I run the report shows for its note: phase III's own provenance check
    (``engine.artifacts.check_provenance``) of the phase II outputs it was trained on against the phase I
    checkpoint it records (``phase_i_checkpoint``) and that phase I run's config.yaml, and the checkpoint's
    content against the sha256 the run recorded (``phase_i_checkpoint_sha256``: catches phase I and phase II
    both re-run after it)."""
    config = config_name(config)
    # one check per (phase II folder, phase I checkpoint): it hashes the checkpoint, and the runs of one note
    # share both, so their failure is told once, followed by each such run
    reasons: dict[tuple[Path, Path], str | None] = {}
    hashes: dict[Path, str] = {}  # checkpoint -> sha256, each file hashed once
    stale: dict[tuple[str, Path, str], list[str]] = {}  # (note, phase I checkpoint, reason) -> the runs
    for row in rows:
        arm = METHODS.by_folder(row.phase)
        if arm is None or arm.method.stage != "phase_iii":
            continue  # a folder the method table does not know: no known phase II folder, and never paired
        for note, run in row.runs.items():
            phase_i = RunPaths(arm.backbone.folder, config, note, Path(root))
            recorded = _under_root(run.get("phase_i_checkpoint") or phase_i.best, root)
            # the file phase III itself checks (read_phase_ii): the recorded one, else the run's best_model.pt
            checkpoint = recorded if recorded.is_file() else phase_i.best
            if not checkpoint.is_file():
                continue  # no phase I model left (checkpoints deleted): none that could differ
            key = (RunPaths(arm.phase_ii, config, note, Path(root)).features_dir, checkpoint)
            if key not in reasons:
                reasons[key] = _provenance_failure(*key, phase_i.checkpoint_dir / "config.yaml")
            reason = reasons[key]
            recorded_sha = run.get("phase_i_checkpoint_sha256")  # recorded by phase III runs since it exists
            if not reason and recorded_sha and recorded_sha != hashes.setdefault(checkpoint, sha256_file(checkpoint)):
                # phase I and phase II were both re-run after this run: they agree, and this run is the stale one
                reason = (f"the phase III run was trained from a phase I checkpoint with other content (sha256 "
                          f"{recorded_sha[:12]}...) than this file has now")
            if reason:
                folder = RunPaths(row.phase, config, note, Path(root)).checkpoint_dir
                stale.setdefault((note, checkpoint, reason), []).append(
                    f"row '{row.label}' ({folder}): {_rerun_command(row.phase, config, note)}")
    if stale:
        stale_notes = {note for note, _, _ in stale}
        kept = [n for n in notes if n not in stale_notes]
        groups = " ".join(f"Note '{note}', phase I checkpoint {checkpoint}: {reason}; then rerun each phase III run "
                          f"trained from it: {'; '.join(runs)}."
                          for (note, checkpoint, reason), runs in stale.items())
        raise UserError(
            f"{sum(map(len, stale.values()))} phase III run(s) no longer pair with the phase I run the report shows "
            f"for their note (phase III's provenance check fails: that phase I model changed after they were trained, "
            f"or the phase II outputs that record which model they used are gone), so their numbers and paired "
            f"differences would mix different phase I models. {groups}"
            + (f" Or build the report without note(s) {', '.join(n for n in notes if n in stale_notes)}: "
               f"{_report_command(config, kept)}." if kept else "")
        )


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
        results = read_results(_under_root(checkpoint, root).parent / "results.json")
        upstream = _upstream_results(results, root) if results and results.get("finished") else None
        if upstream is None:
            return None
        found += [results, *upstream]
    return found


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
    """Write the report of ``config`` over ``notes`` to ``report_dir(config, notes)`` under ``root``; ``pairs``:
    further ``(row id, reference row id)`` paired differences beyond the method table's. Runs that do not
    belong together are refused before anything is written (``check_settings_agree``,
    ``check_phase_i_sources``)."""
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
    check_settings_agree(config, notes, rows, root)
    check_phase_i_sources(config, notes, rows, root)
    diffs = paired_differences(rows, list(pairs))
    costs = {row.phase: _row_cost(row, root) for row in rows}
    out = report_dir(config, notes, root)
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
    """Whether the ``report.json`` of ``report_dir(config, notes)`` was made for these notes from exactly the
    finished runs that exist now, after each of them finished (so regenerating it would change nothing)."""
    out = report_dir(config, notes, root)
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
    """``report.py``: the report of ``config`` over ``notes`` in the working directory."""
    return build_report(config, notes, Path("."), pairs=pairs)
