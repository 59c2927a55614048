"""The ablation report of one config: every method's selected-model test numbers side by side.

    python report.py --config smoke                                      # reports/smoke/default/
    python report.py --config cifar10-LT_resnet18 --notes seed0 seed1 seed2  # .../seed0+seed1+seed2/
    python report.py --config smoke --variants default lr05 --seeds 0 1  # .../default,lr05@seed0+seed1/

Reads ``checkpoints/<phase>/<config>/<note>/results.json`` of every finished run and writes
``reports/<config>/<notes>/``, one folder per note set (``notes_folder``: ``default``,
``seed0+seed1+seed2``), so that the reports of other note sets stay:

    ablation.md     the table (also printed), with a note on what the numbers are, the code versions
                    of the runs (``code_versions``: named when they mix commits or uncommitted changes),
                    the training cost, the paired differences (each method minus its control and its
                    phase I backbone, per note, mean and 95% t-interval over notes, whether it excludes 0)
                    and the figures
    ablation.csv    one line per row (its report.json id, mean and std of each metric and training cost in
                    separate columns; empty cell = absent / undefined)
    ablation.png    one panel per metric, a horizontal bar per row (mean, error bar = sample std over notes)
    forest.png      every paired difference: mean, 95% t-interval, a line at 0 (points only with one note)
    per_class.png   one panel per row: per-class accuracy, classes by training count, shot groups coloured
    confusion_<id>.png, curves_<id>.png
                    per row: the confusion matrix (recall, mean over notes) and each note's curves
    report.json     everything above, machine-readable (``paired``, ``code_versions``), plus the source files

``--variants A B --seeds ...`` (``build_variant_report``) sets variants, each a note (``pipeline.py --note``)
run over the same seeds, side by side: a column group per variant, and each row's paired difference
``B - A`` by seed, in ``reports/<config>/<variants_folder>/``.

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
from dataclasses import dataclass, field, replace
from pathlib import Path

from analysis.plots import bar_chart, confusion_chart, curves_chart, forest_chart, has_curves, per_class_chart
from engine.artifacts import check_provenance, sha256_file
from engine.methods import METHODS
from utils.config import config_differences, config_name, read_yaml
from utils.errors import UserError
from utils.run_dir import (MAX_NAME_LENGTH, RunPaths, load_results, output_root, read_results, seed_notes,
                           write_json_atomic)

__all__ = ["METRICS", "REPORT_DIR", "discover_rows", "collect", "check_settings_agree", "check_phase_i_sources",
           "build_report", "format_value", "run", "notes_folder", "report_dir", "is_up_to_date", "code_versions",
           "paired_differences", "variant_notes", "variants_folder", "variants_report_dir", "variant_differences",
           "build_variant_report"]

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
    return _folder_name("+".join(sorted(set(notes))))


def _folder_name(joined: str) -> str:
    """``joined`` itself, or past MAX_NAME_LENGTH characters a readable prefix and a hash of the whole."""
    if len(joined) <= MAX_NAME_LENGTH:
        return joined
    digest = hashlib.sha256(joined.encode()).hexdigest()[:NOTES_HASH_LENGTH]
    return f"{joined[:MAX_NAME_LENGTH - NOTES_HASH_LENGTH - 1]}-{digest}"


def report_dir(config: str, notes: list[str], root: Path | None = None) -> Path:
    """``reports/<config>/<notes_folder(notes)>/`` under ``root``: the folder of one note set's report."""
    root = output_root() if root is None else Path(root)
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
    def caption(self) -> str:
        """``method − reference (metric)``; one row in two variants as ``row: variant − variant (metric)``."""
        row, at, variant = self.method.rpartition(VARIANT_AT)
        reference_row, _, reference_variant = self.reference.rpartition(VARIANT_AT)
        if at and row == reference_row:
            return f"{row}: {variant} − {reference_variant} ({self.metric})"
        return f"{self.method} − {self.reference} ({self.metric})"

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
        out += _paired(a.label, a.runs, b.label, b.runs)
    return out


def _paired(method: str, runs: dict[str, dict], reference: str, reference_runs: dict[str, dict]) -> list[PairedDifference]:
    """``method - reference`` for each ``PAIRED_METRICS`` over the pairing keys (notes, or seeds across
    variants) where both runs have that metric; metrics with no such pair are left out."""
    out = []
    for metric in PAIRED_METRICS:
        per_note = {key: float(runs[key][metric]) - float(reference_runs[key][metric])
                    for key in runs if key in reference_runs
                    and _is_number(runs[key].get(metric)) and _is_number(reference_runs[key].get(metric))}
        if per_note:
            out.append(PairedDifference(method, reference, metric, per_note))
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

    @property
    def key(self) -> str:
        """The row in file names (``confusion_<key>.png``): its method-table id, else its run folder."""
        return self.id or self.phase

    def stat(self, metric: str, notes: list[str] | None = None) -> Stat:
        """``metric`` over the row's runs (only those of ``notes`` when given)."""
        values = [float(r[metric]) for note, r in self.runs.items()
                  if (notes is None or note in notes) and _is_number(r.get(metric))]
        return Stat(values)

    def head_size(self) -> int | None:
        """How many classes the head holds (``groups.head`` of the first run that records it)."""
        return next((len(r["groups"]["head"]) for r in self.runs.values()
                     if isinstance((r.get("groups") or {}).get("head"), list)), None)

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


def discover_rows(config: str, root: Path | None = None) -> list[Row]:
    """Empty rows of the method table's arms (phase I methods, then each phase III method on each
    backbone), then every other ``checkpoints/phase_iii_*/<config>`` folder (label = folder)."""
    root = output_root() if root is None else Path(root)
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


def collect(config: str, notes: list[str], root: Path | None = None) -> list[Row]:
    """Rows with at least one finished run among ``notes``; the others are omitted.

    A ``results.json`` that exists but cannot be read, or whose metrics (``METRICS``, ``COST_KEYS``) are
    present but not finite numbers, is a UserError naming every such file: a table that silently lacks a
    seed, or shows a string as absent, would be taken for the complete result."""
    root = output_root() if root is None else Path(root)
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


def check_settings_agree(config: str, notes: list[str], rows: list[Row], root: Path | None = None) -> None:
    """UserError naming the runs and keys unless every run has the ``SHARED_SETTINGS`` of the first run that
    records them and every run of a row the ``ROW_SETTINGS`` of the row's first: a mean over notes, or a
    paired difference, of runs on other data or models would read as one experiment."""
    root = output_root() if root is None else Path(root)
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


def check_phase_i_sources(config: str, notes: list[str], rows: list[Row], root: Path | None = None) -> None:
    """UserError naming the runs and the fix unless every phase III run of the method table still pairs with
    the phase I run the report shows for its note: phase III's own provenance check
    (``engine.artifacts.check_provenance``) of the phase II outputs it was trained on against the phase I
    checkpoint it records (``phase_i_checkpoint``) and that phase I run's config.yaml, and the checkpoint's
    content against the sha256 the run recorded (``phase_i_checkpoint_sha256``: catches phase I and phase II
    both re-run after it)."""
    root = output_root() if root is None else Path(root)
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


def _row_cost(row: Row, root: Path, notes: list[str] | None = None) -> dict[str, Stat]:
    """A row's training cost over notes (only ``notes`` when given): each ``COST_KEYS`` value of its own runs,
    and as ``total_<key>`` the same plus that of every run its model was built from (backbone, teachers),
    read once per run."""
    totals: dict[str, list[float]] = {key: [] for key in COST_KEYS}
    for note, run in row.runs.items():
        if notes is not None and note not in notes:
            continue
        upstream = _upstream_results(run, root)
        if upstream is None:
            continue
        parts = [run, *upstream]
        for key in COST_KEYS:
            if all(_is_number(r.get(key)) for r in parts):
                totals[key].append(sum(float(r[key]) for r in parts))
    return {**{key: row.stat(key, notes) for key in COST_KEYS}, **{f"total_{key}": Stat(totals[key]) for key in COST_KEYS}}


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


SHORT_COMMIT = 12  # hex digits of a commit as the report shows it


def code_versions(rows: list[Row], notes: list[str]) -> dict:
    """Which code made each run (``results.json["provenance"]``: ``git_commit``, ``git_dirty``), grouped by
    version: ``{"mixed": bool, "versions": [{"commit", "short", "dirty", "runs": {note: [row keys]}}]}``. A run
    without provenance (made before it was recorded) has commit None: unknown, not an error. Mixed: more
    than one version, or uncommitted changes (a dirty tree pins no code), so that rows or notes may differ
    by code as well as by method or seed."""
    versions: dict[tuple[str | None, bool | None], dict[str, list[str]]] = {}
    for row in rows:
        for note, run in row.runs.items():
            recorded = run.get("provenance") if isinstance(run.get("provenance"), dict) else {}
            commit = recorded.get("git_commit") if isinstance(recorded.get("git_commit"), str) else None
            dirty = recorded.get("git_dirty") if isinstance(recorded.get("git_dirty"), bool) else None
            versions.setdefault((commit or None, dirty), {}).setdefault(note, []).append(row.key)
    return {"mixed": len(versions) > 1 or any(dirty for _, dirty in versions),
            "versions": [{"commit": commit, "short": commit[:SHORT_COMMIT] if commit else "unknown", "dirty": dirty,
                          "runs": {note: runs[note] for note in notes if note in runs}}
                         for (commit, dirty), runs in versions.items()]}


def _version_text(version: dict) -> str:
    if version["commit"] is None:
        return "unknown (no provenance in results.json: runs made before it was recorded)"
    tree = {True: " + uncommitted changes", False: " (clean tree)", None: " (tree state not recorded)"}
    return f"`{version['short']}`{tree[version['dirty']]}"


def _versions_markdown(versions: dict, rows: list[Row]) -> list[str]:
    """One line when every run comes from one version; a section listing each version's notes and rows
    when they are mixed."""
    if not versions["mixed"]:
        only = versions["versions"][0]
        return ["", f"Code: every run from commit {_version_text(only)}." if only["commit"] else
                f"Code version of the runs: {_version_text(only)}."]
    labels = {row.key: row.label for row in rows}
    per_note = {note: sum(1 for row in rows if note in row.runs) for row in rows for note in row.runs}
    lines = ["", "## Code versions", "",
             f"The runs of this report come from {len(versions['versions'])} code version(s) (results.json "
             f"`provenance`)" + (", some with uncommitted changes" if any(v["dirty"] for v in versions["versions"])
                                 else "") +
             ": differences between rows or notes may come from code changes as well as from the methods.", ""]
    for version in versions["versions"]:
        where = "; ".join(f"{note}: " + ("all rows" if len(keys) == per_note[note] else
                                          ", ".join(labels[k] for k in keys))
                          for note, keys in version["runs"].items())
        lines.append(f"- {_version_text(version)}: {where}")
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
              diffs: list[PairedDifference], versions: dict, figures: list[str]) -> str:
    several = len(notes) > 1
    if several:
        shown = (f"mean ± sample standard deviation over the notes {', '.join(f'`{n}`' for n in notes)} "
                 f"(n = number of notes with a finished run of that row; no ± when n = 1)")
    else:
        shown = f"one run per row, note `{notes[0]}`"
    parts = [
        f"# Ablation: `{config}`",
        "",
        _markdown_table(rows, several),
        "",
        f"Test accuracy (%) of each run's **selected model** (the top-level numbers of its `results.json`): "
        f"{_selection_text(rows)}; the test images never select anything. Shown: {shown}.",
        "",
        _groups_text(rows),
    ]
    parts += _versions_markdown(versions, rows)
    parts += _cost_markdown(rows, costs)
    parts += _paired_markdown(diffs)
    parts += figures
    missing = [f"{row.label}: {', '.join(n for n in notes if n not in row.runs)}"
               for row in rows if row.n < len(notes)]
    if missing:
        parts += ["", "No finished run for: " + "; ".join(missing) + "."]
    parts += ["", "Run folders: " + ", ".join(f"{row.label} = `checkpoints/{row.phase}/{config}/<note>`" for row in rows) + "."]
    return "\n".join(parts) + "\n"


def _groups_text(rows: list[Row]) -> str:
    hr = _hr_values(rows)
    hr_text = f" (hr = {', '.join(f'{v:g}' for v in hr)})" if hr else ""
    return (f"Groups from the training counts: many > 100, medium 20..100, few < 20 images per class; head = the "
            f"fewest largest classes holding a share hr of the training samples{hr_text}, tail = the rest. "
            f"{ABSENT} = the group has no class in this training set (absent, not 0).")


def _paired_markdown(diffs: list[PairedDifference], title: str = "method − reference, same note = same seed",
                     pairing: str = "two runs of the same note (seed, data subset and phase I backbone)") -> list[str]:
    if not diffs:
        return []
    lines = ["", f"## Paired differences (percentage points, {title})", "",
             "| method | reference | metric | per note | mean | 95% t-interval | reading |",
             "|:---|:---|:---|:---|---:|:---:|:---|"]
    for d in diffs:
        per_note = ", ".join(f"{note} {value:+.2f}" for note, value in d.per_note.items())
        interval = "—" if d.interval is None else f"[{d.interval[0]:+.2f}, {d.interval[1]:+.2f}]"
        lines.append(f"| {d.method} | {d.reference} | {d.metric} | {per_note} | {d.mean:+.2f} | {interval} | "
                     f"{d.verdict()} |")
    lines += ["", f"Each difference pairs {pairing}; the interval is mean ± t(0.975, n−1) · sd / √n over the pairs "
              f"where both runs finished. An interval that includes 0 means this many seeds cannot tell the two "
              f"apart."]
    return lines


def _csv(lines: list[tuple[Row, str | None, list[str], dict[str, Stat]]]) -> str:
    """One CSV line per ``(row, variant or None, notes, cost)``: the row's report.json id (empty for a folder
    the method table does not know), its notes, each metric's and each training cost's mean and std over
    them; the ``variant`` column only when some line has one."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    with_variant = any(variant is not None for _, variant, _, _ in lines)
    costs = [*COST_KEYS, *(f"total_{key}" for key in COST_KEYS)]
    writer.writerow(["id", "method", "phase", *(["variant"] if with_variant else []), "n", "notes",
                     *(f"{m}_{s}" for m in (*METRICS, *costs) for s in ("mean", "std"))])
    for row, variant, notes, cost in lines:
        present = [n for n in notes if n in row.runs]
        cells = [row.id or "", row.label, row.phase, *([variant] if with_variant else []), len(present),
                 " ".join(present)]
        for stat in [row.stat(m, notes) for m in METRICS] + [cost[key] for key in costs]:
            cells += ["" if stat.mean is None else f"{stat.mean:.4f}", "" if stat.std is None else f"{stat.std:.4f}"]
        writer.writerow(cells)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
FIGURE_PATTERNS = ("forest.png", "confusion_*.png", "curves_*.png")  # figures a report writes only when it has data


def _confusions(row: Row) -> tuple[list[int], list[list[list[int]]]] | None:
    """``(train_counts, confusion matrices of the notes)`` of a row: the ``confusion`` of each run whose
    shape fits the first run's class count; None without any."""
    counts = next((list(r["train_counts"]) for r in row.runs.values() if r.get("train_counts")), None)
    if not counts:
        return None
    size = len(counts)
    matrices = [r["confusion"] for r in row.runs.values()
                if isinstance(r.get("confusion"), list) and len(r["confusion"]) == size
                and all(isinstance(line, list) and len(line) == size and all(map(_is_number, line))
                        for line in r["confusion"])]
    return (counts, matrices) if matrices else None


def _forest(out: Path, title: str, diffs: list[PairedDifference], files: dict[str, str]) -> list[str]:
    """forest.png of ``diffs`` (added to ``files``) and its markdown lines; without differences, a line
    saying why there is none."""
    if not diffs:
        return ["", "No paired differences (no method and its reference finished for the same note): no forest.png."]
    forest_chart(out / "forest.png", title, diffs)
    files["forest.png"] = str(out / "forest.png")
    return ["", "![paired differences: mean and 95% t-interval per line](forest.png)"]


def _figures(out: Path, config: str, notes: list[str], rows: list[Row], diffs: list[PairedDifference],
             files: dict[str, str]) -> list[str]:
    """Write the figures of a note-set report into ``out`` (each added to ``files``) and return the markdown
    lines that show or link them; figures of an earlier build that this one does not write are removed."""
    for pattern in FIGURE_PATTERNS:
        for old in out.glob(pattern):
            old.unlink()
    bar_chart(out / "ablation.png", config, notes, rows, METRICS)
    per_class_chart(out / "per_class.png", config, notes, rows)
    files.update({name: str(out / name) for name in ("ablation.png", "per_class.png")})
    lines = ["", "## Figures"]
    lines += _forest(out, f"{config}: paired differences ({_notes_text(notes)})", diffs, files)
    lines += ["", "![per-class accuracy, one panel per row](per_class.png)"]
    confusions, curves = [], []
    for row in rows:
        data = _confusions(row)
        if data is not None:
            counts, matrices = data
            name = f"confusion_{row.key}.png"
            confusion_chart(out / name, f"{config}: {row.label}, confusion matrix, rows normalised to recall "
                                        f"({_notes_text([n for n in notes if n in row.runs], 'mean')})",
                            matrices, counts, row.head_size())
            files[name] = str(out / name)
            confusions.append(f"[{row.label}]({name})")
        trained = {note: run for note, run in row.runs.items() if has_curves(run)}
        if trained:
            name = f"curves_{row.key}.png"
            curves_chart(out / name, f"{config}: {row.label}", trained)
            files[name] = str(out / name)
            curves.append(f"[{row.label}]({name})")
    if confusions:
        lines += ["", "Confusion matrices (rows: true class normalised to recall, mean over the notes; classes by "
                      "training count): " + ", ".join(confusions) + "."]
    if curves:
        lines += ["", "Training and evaluation curves (each note's `history`; rows chosen, not trained, have none): "
                      + ", ".join(curves) + "."]
    return lines


def _files_text(files: dict[str, str]) -> str:
    """The files of a report, each per-row figure kind counted rather than listed."""
    per_row = {kind: sum(1 for name in files if name.startswith(f"{kind}_")) for kind in ("confusion", "curves")}
    named = [name for name in files if not any(name.startswith(f"{kind}_") for kind in per_row)]
    return ", ".join(named + [f"{n} {kind}_<row>.png" for kind, n in per_row.items() if n])


def _notes_text(notes: list[str], how: str = "") -> str:
    if len(notes) == 1:
        return f"note {notes[0]}"
    return f"{how + ' over ' if how else ''}{len(notes)} notes: {', '.join(notes)}"


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
REPORT_FORMAT = 2  # bumped when a report gains files or keys, so that is_up_to_date rebuilds older ones


def _row_json(row: Row, notes: list[str], cost: dict[str, Stat]) -> dict:
    """A row of report.json over ``notes``: its metrics, training cost and source files."""
    return {
        "notes": [n for n in notes if n in row.runs],
        "missing_notes": [n for n in notes if n not in row.runs],
        "metrics": {m: row.stat(m, notes).as_dict() for m in METRICS},
        # training cost: its own, and with the runs its model was built from (backbone, teachers)
        "cost": {key: stat.as_dict() for key, stat in cost.items()},
        "sources": {n: src for n, src in row.sources.items() if n in notes},
    }


def _report_json(config: str, notes: list[str], rows: list[Row], files: dict, costs: dict[str, dict[str, Stat]],
                 diffs: list[PairedDifference], versions: dict) -> dict:
    out_rows = []
    for row in rows:
        per_class = row.per_class()
        own = _row_json(row, notes, costs[row.phase])
        out_rows.append({
            "id": row.id,
            "group": row.group,
            "label": row.label,
            "phase": row.phase,
            "n": row.n,
            "notes": own["notes"],
            "missing_notes": own["missing_notes"],
            "metrics": own["metrics"],
            "per_class": None if per_class is None else {"train_counts": per_class[0], "accuracy": per_class[1]},
            "cost": own["cost"],
            "sources": own["sources"],
        })
    return {
        "format": REPORT_FORMAT,
        "config": config,
        "notes": notes,
        "evaluation": "selected",
        "numbers": NUMBERS,
        "metrics": list(METRICS),
        "rows": out_rows,
        "paired": [d.as_dict() for d in diffs],
        "code_versions": versions,
        "files": files,
    }


NUMBERS = ("test accuracy (%) of each run's selected model (results.json top level; checkpoint_selection: best "
           "validation score, or final without a validation split); mean and sample std (ddof 1) over notes; null = "
           "absent group or undefined std")


def _collect_checked(config: str, notes: list[str], root: Path) -> list[Row]:
    """The rows of ``notes`` (``collect``), refusing an empty report and runs that do not pair with their phase
    I run (``check_phase_i_sources``)."""
    rows = collect(config, notes, root)
    if not rows:
        looked = ", ".join(f"checkpoints/{m.folder}/{config}/<note>" for m in list(METHODS)[:4])
        raise UserError(
            f"No finished run of config '{config}' for note(s) {', '.join(notes)} (looked for results.json with "
            f"finished: true in {looked}, ...). Run the phases first, e.g. python pipeline.py --config {config}"
            + ("" if notes == ["default"] else " (or pass the notes the runs were made with: --notes NOTE ...)") + "."
        )
    check_phase_i_sources(config, notes, rows, root)
    return rows


def build_report(config: str, notes: list[str], root: Path | None = None, *, echo: bool = True,
                 pairs: list[tuple[str, str]] = ()) -> dict:
    """Write the report of ``config`` over ``notes`` to ``report_dir(config, notes)`` under ``root``; ``pairs``:
    further ``(row id, reference row id)`` paired differences beyond the method table's. Runs that do not
    belong together are refused before anything is written (``check_settings_agree``,
    ``check_phase_i_sources``)."""
    root = output_root() if root is None else Path(root)
    config = config_name(config)
    notes = list(dict.fromkeys(notes))
    if not notes:
        raise UserError("--notes needs at least one note name (e.g. --notes default).")
    rows = _collect_checked(config, notes, root)
    check_settings_agree(config, notes, rows, root)
    diffs = paired_differences(rows, list(pairs))
    costs = {row.phase: _row_cost(row, root) for row in rows}
    versions = code_versions(rows, notes)
    out = report_dir(config, notes, root)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: str(out / name) for name in ("ablation.md", "ablation.csv")}
    figures = _figures(out, config, notes, rows, diffs, files)
    files["report.json"] = str(out / "report.json")
    markdown = _markdown(config, notes, rows, costs, diffs, versions, figures)
    (out / "ablation.md").write_text(markdown)
    (out / "ablation.csv").write_text(_csv([(row, None, notes, costs[row.phase]) for row in rows]))
    data = _report_json(config, notes, rows, files, costs, diffs, versions)
    write_json_atomic(out / "report.json", data)  # written last: it marks a complete report
    if echo:
        print(markdown, flush=True)
        print(f"report written to {out}/ ({_files_text(files)})", flush=True)
    return data


def is_up_to_date(config: str, notes: list[str], root: Path | None = None) -> bool:
    """Whether the ``report.json`` of ``report_dir(config, notes)`` was made, in this report format, for these
    notes from exactly the finished runs that exist now, after each of them finished, and its files are all
    there (so regenerating it would change nothing)."""
    root = output_root() if root is None else Path(root)
    out = report_dir(config, notes, root)
    path = out / "report.json"
    saved = read_results(path)
    if not saved or saved.get("format") != REPORT_FORMAT or saved.get("notes") != list(dict.fromkeys(notes)):
        return False
    if not all((out / name).is_file() for name in saved.get("files", {})):
        return False
    current = {(row.phase, note): src for row in collect(config, notes, root) for note, src in row.sources.items()}
    recorded = {(row["phase"], note): src for row in saved.get("rows", []) for note, src in row.get("sources", {}).items()}
    if current != recorded:
        return False
    made = path.stat().st_mtime
    return all(Path(src).stat().st_mtime <= made for src in current.values())


def run(config: str, notes: list[str], pairs: list[tuple[str, str]] = ()) -> dict:
    """``report.py``: the report of ``config`` over ``notes`` in the working directory."""
    return build_report(config, notes, pairs=pairs)


# ------------------------------------------------------------------------------------------------
# Variants side by side
# ------------------------------------------------------------------------------------------------
DEFAULT_VARIANT = "default"  # the runs of pipeline.py without --note
VARIANT_AT = " @ "  # a row in a variant: "FSA offline @ lr05"


def variant_notes(variant: str, seeds: list[int] | None) -> list[str]:
    """The notes ``pipeline.py`` gives a variant: ``--note VARIANT`` (no --note for ``default``), with
    ``--seeds``: ``VARIANT-seedS`` (``seedS`` for ``default``); without: the note ``VARIANT`` itself."""
    return seed_notes(None if variant == DEFAULT_VARIANT else variant, seeds)


def variants_folder(variants: list[str], seeds: list[int] | None) -> str:
    """The report folder of variants side by side: the variants in the order given (the first is the
    reference) joined with ',', then '@' and the seed notes joined with '+' (``default,lr05@seed0+seed1``);
    neither character can be in a note, so it never meets a note set's folder. Shortened like
    ``notes_folder``."""
    return _folder_name(",".join(variants) + ("@" + "+".join(f"seed{s}" for s in seeds) if seeds else ""))


def variants_report_dir(config: str, variants: list[str], seeds: list[int] | None, root: Path | None = None) -> Path:
    root = output_root() if root is None else Path(root)
    return Path(root) / REPORT_DIR / config_name(config) / variants_folder(variants, seeds)


def _only(rows: list[Row], notes: list[str]) -> list[Row]:
    """The rows restricted to the runs of ``notes`` (rows without any left out)."""
    kept = [replace(row, runs={n: r for n, r in row.runs.items() if n in notes},
                    sources={n: s for n, s in row.sources.items() if n in notes}) for row in rows]
    return [row for row in kept if row.runs]


def _variant_settings(config: str, rows: list[Row], notes: dict[str, list[str]], root: Path) -> dict[str, list[str]]:
    """For each variant after the first, the saved config.yaml keys (seed and data location aside) in which
    some row's first run differs from the same row's first run of the first variant."""
    reference, *others = notes
    out = {}
    for variant in others:
        keys: set[str] = set()
        for row in rows:
            pair = [next((n for n in notes[v] if n in row.runs), None) for v in (reference, variant)]
            if None in pair:
                continue
            saved = [RunPaths(row.phase, config, n, Path(root)).checkpoint_dir / "config.yaml" for n in pair]
            if all(path.is_file() for path in saved):
                keys.update(config_differences(read_yaml(saved[0]), read_yaml(saved[1])))
        out[variant] = sorted(k for k in keys if k != "seed" and k.split(".")[-1] not in DATA_LOCATION)
    return out


def variant_differences(rows: list[Row], notes: dict[str, list[str]], seeds: list[int] | None) -> list[PairedDifference]:
    """For each variant after the first and each row: ``variant - first variant`` of the row, for each
    ``PAIRED_METRICS``, paired by seed (the runs of the two variants with the same seed; without seeds, the
    one run of each)."""
    keys = [f"seed{s}" for s in seeds] if seeds else ["single run"]
    reference, *others = notes
    out = []
    for variant in others:
        for row in rows:
            def by_seed(v: str) -> dict[str, dict]:
                return {key: row.runs[note] for key, note in zip(keys, notes[v]) if note in row.runs}

            out += _paired(f"{row.label}{VARIANT_AT}{variant}", by_seed(variant), f"{row.label}{VARIANT_AT}{reference}",
                           by_seed(reference))
    return out


def _variants_table(rows: list[Row], notes: dict[str, list[str]]) -> str:
    header = ["method"] + [f"{v}: {m}" for v in notes for m in (*METRICS, "n")]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [row.label]
        for variant_notes_ in notes.values():
            n = sum(1 for note in variant_notes_ if note in row.runs)
            cells += [format_value(row.stat(m, variant_notes_), True, n) for m in METRICS] + [str(n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_variant_report(config: str, variants: list[str], seeds: list[int] | None = None, root: Path | None = None,
                         *, echo: bool = True) -> dict:
    """Variants (each the runs of ``pipeline.py --note VARIANT [--seeds ...]``) side by side in one table, a
    column group per variant, with each row's paired difference ``variant - first variant`` by seed (95%
    t-interval as ``paired_differences``), written to ``variants_report_dir``: ablation.md, ablation.csv (a
    line per row and variant), forest.png, report.json. Each variant's runs must agree in settings among
    themselves (``check_settings_agree``); across variants they differ by design, and the report names the
    saved settings in which they do."""
    root = output_root() if root is None else Path(root)
    config = config_name(config)
    variants = list(dict.fromkeys(variants))
    if len(variants) < 2:
        raise UserError(f"--variants needs two or more variants to set side by side, got {' '.join(variants) or 'none'} "
                        f"(for one variant's report: --notes NOTE ...).")
    seeds = list(dict.fromkeys(seeds)) if seeds else None
    notes = {v: variant_notes(v, seeds) for v in variants}
    every_note = [n for variant_notes_ in notes.values() for n in variant_notes_]
    rows = _collect_checked(config, every_note, root)
    if empty := [v for v, ns in notes.items() if not any(n in row.runs for row in rows for n in ns)]:
        raise UserError(
            f"No finished run of variant(s) {', '.join(empty)} of config '{config}' (looked for the notes "
            f"{'; '.join(f'{v}: ' + ', '.join(notes[v]) for v in empty)}, as pipeline.py --note VARIANT"
            f"{' --seeds ...' if seeds else ''} names them; variant default = no --note).")
    for variant_notes_ in notes.values():
        check_settings_agree(config, variant_notes_, _only(rows, variant_notes_), root)
    diffs = variant_differences(rows, notes, seeds)
    versions = code_versions(rows, every_note)
    out = variants_report_dir(config, variants, seeds, root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "forest.png").unlink(missing_ok=True)  # an earlier build's, when this one has no differences
    files = {name: str(out / name) for name in ("ablation.md", "ablation.csv")}
    reference = variants[0]
    seeds_text = f"seeds {', '.join(map(str, seeds))}" if seeds else "one run per variant"
    figures = _forest(out, f"{config}: each row's variant − {reference} ({seeds_text})", diffs, files)
    files["report.json"] = str(out / "report.json")
    costs = {(row.phase, v): _row_cost(row, root, variant_notes_) for row in rows for v, variant_notes_ in notes.items()}
    settings = _variant_settings(config, rows, notes, root)
    parts = [f"# Variants: `{config}`, {', '.join(f'`{v}`' for v in variants)} ({seeds_text})", "",
             _variants_table(rows, notes), "",
             f"Test accuracy (%) of each run's **selected model**: {_selection_text(rows)}. Each column group is one "
             f"variant, mean ± sample standard deviation over its notes (n: notes with a finished run): "
             + "; ".join(f"`{v}` = {', '.join(f'`{n}`' for n in ns)}" for v, ns in notes.items()) + ".",
             "", _groups_text(rows), "",
             f"Saved settings (each run's config.yaml, seed aside) that differ from `{reference}`: "
             + "; ".join(f"`{v}`: {', '.join(keys) or 'none found'}" for v, keys in settings.items()) + "."]
    parts += _versions_markdown(versions, rows)
    parts += _paired_markdown(diffs, f"variant − `{reference}` of the same row, same seed = pair",
                              "the runs of one row in two variants with the same seed")
    parts += figures
    parts += ["", "Training cost per row and variant: ablation.csv (`variant` column)."]
    markdown = "\n".join(parts) + "\n"
    (out / "ablation.md").write_text(markdown)
    (out / "ablation.csv").write_text(_csv([(row, v, ns, costs[(row.phase, v)]) for row in rows
                                            for v, ns in notes.items() if any(n in row.runs for n in ns)]))
    data = {
        "format": REPORT_FORMAT, "config": config, "variants": variants, "seeds": seeds, "notes": notes,
        "reference": reference, "evaluation": "selected", "numbers": NUMBERS, "metrics": list(METRICS),
        "rows": [{"id": row.id, "group": row.group, "label": row.label, "phase": row.phase,
                  "variants": {v: _row_json(row, ns, costs[(row.phase, v)]) for v, ns in notes.items()}}
                 for row in rows],
        "paired": [d.as_dict() for d in diffs], "settings_differ": settings, "code_versions": versions,
        "files": files,
    }
    write_json_atomic(out / "report.json", data)  # written last: it marks a complete report
    if echo:
        print(markdown, flush=True)
        print(f"report written to {out}/ ({_files_text(files)})", flush=True)
    return data
