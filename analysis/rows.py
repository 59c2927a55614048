"""Collecting the finished runs of a config into the report's rows. The rows come from the method table
(``engine.methods.METHODS.arms()``: every arm it knows, in its order and groups), then every other
``checkpoints/phase_iii_*/<config>`` folder as a row of its own; a ``Row`` holds, per note, the
``results.json`` of its finished run and where it was read. ``collect`` refuses results that exist but cannot
be read or hold a metric that is not a finite number, so that a table never silently lacks a run;
``code_versions`` groups the runs by the code version they recorded.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from analysis.stats import PairedDifference, Stat, is_finite_number, paired_runs
from engine.methods import METHODS
from utils.config import config_name
from utils.errors import UserError
from utils.json_files import load_results
from utils.layout import PHASE_III, Layout, RunPaths, output_root, stage_of

METRICS: tuple[str, ...] = ("top1", "many", "medium", "few", "head", "tail")
COST_KEYS = ("samples_seen", "wall_time_s")
SHORT_COMMIT = 12  # hex digits of a commit as the report shows it


@dataclass
class Row:
    label: str
    run_name: str              # its run folder under checkpoints/
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
        return self.id or self.run_name

    def stat(self, metric: str, notes: list[str] | None = None) -> Stat:
        """``metric`` over the row's runs (only those of ``notes`` when given)."""
        values = [float(r[metric]) for note, r in self.runs.items()
                  if (notes is None or note in notes) and is_finite_number(r.get(metric))]
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
            values = [float(r["per_class"][c]) for r in runs if is_finite_number(r["per_class"][c])]
            accuracy.append(statistics.fmean(values) if values else None)
        return counts, accuracy

    def confusions(self) -> tuple[list[int], list[list[list[int]]]] | None:
        """``(train_counts, confusion matrices of the notes)``: the ``confusion`` of each run whose shape fits
        the first run's class count; None without any."""
        counts = next((list(r["train_counts"]) for r in self.runs.values() if r.get("train_counts")), None)
        if not counts:
            return None
        size = len(counts)
        matrices = [r["confusion"] for r in self.runs.values()
                    if isinstance(r.get("confusion"), list) and len(r["confusion"]) == size
                    and all(isinstance(line, list) and len(line) == size and all(map(is_finite_number, line))
                            for line in r["confusion"])]
        return (counts, matrices) if matrices else None


def under_root(recorded: str | Path, root: Path) -> Path:
    """A path a run recorded: absolute, or relative to the working directory it ran in (the report's root)."""
    path = Path(recorded)
    return path if path.is_absolute() else Path(root) / path


def discover_rows(config: str, root: Path | None = None) -> list[Row]:
    """Empty rows of the method table's arms (phase I methods, then each phase III method on each
    backbone), then every other ``checkpoints/phase_iii_*/<config>`` folder (label = folder)."""
    root = output_root() if root is None else Path(root)
    rows = [Row(a.label, a.folder, a.id, a.group) for a in METHODS.arms()]
    known = {row.run_name for row in rows}
    others = dict.fromkeys(run for run, _ in Layout(root).runs(config) if stage_of(run) == PHASE_III and run not in known)
    return rows + [Row(run, run) for run in sorted(others)]


def rerun_command(run_name: str, config: str, note: str, *extra: str) -> str:
    """The command that writes ``checkpoints/<run_name>/<config>/<note>`` again from scratch; ``extra``: arguments
    the run was made with beyond its method's (e.g. its ``--upstream-note``)."""
    arm = METHODS.by_folder(run_name)
    if arm is None:
        return f"the command that made checkpoints/{run_name}/{config}/{note}, with --overwrite"
    return arm.command(config, note, *extra, "--overwrite")


def _not_numbers(results: dict) -> list[str]:
    """The metrics of a finished run that are present but neither a finite number nor null (absent group)."""
    return [f"{key} is {results[key]!r}" for key in (*METRICS, *COST_KEYS)
            if results.get(key) is not None and not is_finite_number(results[key])]


def collect(config: str, notes: list[str], root: Path | None = None) -> list[Row]:
    """Rows with at least one finished run among ``notes``; the others are omitted.

    A ``results.json`` that exists but cannot be read, or whose metrics (``METRICS``, ``COST_KEYS``) are
    present but not finite numbers, is a UserError naming every such file: a table that silently lacks a
    seed, or shows a string as absent, would be taken for the complete result."""
    root = output_root() if root is None else Path(root)
    config = config_name(config)
    rows, broken = [], []
    for row in discover_rows(config, root):
        run_name = row.run_name
        for note in notes:
            path = RunPaths(run_name, config, note, Path(root)).results
            try:
                results = load_results(path)
            except ValueError as exc:
                broken.append(f"{path} ({exc}; rewrite it with: {rerun_command(run_name, config, note)})")
                continue
            if results and results.get("finished") and results.get("mode") != "test":
                if bad := _not_numbers(results):
                    broken.append(f"{path} ({', '.join(bad)}: not a finite number or null; rewrite it with: "
                                  f"{rerun_command(run_name, config, note)})")
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


def paired_differences(rows: list[Row], extra: list[tuple[str, str]] = ()) -> list[PairedDifference]:
    """Every paired comparison of the method table (each method against its control, then against
    the phase I baseline), then the ``extra`` ``(row id, reference row id)`` pairs asked for, whose two rows
    share at least one note, for each ``PAIRED_METRICS``."""
    by_run = {row.run_name: row for row in rows}
    by_id = {row.id: row for row in rows if row.id}
    if unknown := sorted({i for pair in extra for i in pair} - set(by_id)):
        raise UserError(f"--pairs names row id(s) {', '.join(unknown)} that have no finished run in this report; "
                        f"the rows' ids: {', '.join(by_id)}. Write each pair as METHOD:REFERENCE, e.g. "
                        f"fsa_offline:crt.")
    pairs = [(arm.folder, reference.folder) for arm, reference in METHODS.paired()]
    pairs += [(by_id[a].run_name, by_id[b].run_name) for a, b in extra]
    out = []
    for a_run, b_run in dict.fromkeys(pairs):
        if a_run not in by_run or b_run not in by_run:
            continue
        a, b = by_run[a_run], by_run[b_run]
        out += paired_runs(a.label, a.runs, b.label, b.runs)
    return out
