"""The training cost of the report's rows: each run's own ``samples_seen`` and ``wall_time_s`` (``COST_KEYS``)
and, as ``total_<key>``, the same plus the cost of every run its model was built from (the phase I run a
phase III run started from, a distilled run's teachers, recursively), so that rows read as compute-matched or
not; and the markdown section that shows them. A run whose sources cannot all be read has an unknown total,
never one that counts them as 0.
"""
from __future__ import annotations

from pathlib import Path

from analysis.rows import COST_KEYS, Row, under_root
from analysis.stats import ABSENT, Stat, is_finite_number
from utils.json_files import read_results


def _upstream_results(run: dict, root: Path) -> list[dict] | None:
    """The finished runs a run's model was built from, recursively: the phase I run a phase III run started
    from (``phase_i_checkpoint``) and a distilled run's teachers (``teachers``). None when one of them has
    no readable results.json (its cost is then unknown, never taken as 0)."""
    sources = [run["phase_i_checkpoint"]] if run.get("phase_i_checkpoint") else []
    sources += list(run.get("teachers") or [])
    found: list[dict] = []
    for checkpoint in sources:
        results = read_results(under_root(checkpoint, root).parent / "results.json")
        upstream = _upstream_results(results, root) if results and results.get("finished") else None
        if upstream is None:
            return None
        found += [results, *upstream]
    return found


def row_cost(row: Row, root: Path, notes: list[str] | None = None) -> dict[str, Stat]:
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
            if all(is_finite_number(r.get(key)) for r in parts):
                totals[key].append(sum(float(r[key]) for r in parts))
    return {**{key: row.stat(key, notes) for key in COST_KEYS}, **{f"total_{key}": Stat(totals[key]) for key in COST_KEYS}}


def cost_markdown(rows: list[Row], costs: dict[str, dict[str, Stat]]) -> list[str]:
    """Each row's training cost (``row_cost``, by run folder): rows through the trained part (samples_seen)
    and wall time, its own and with the runs its model was built from; means over notes."""
    lines = ["", "## Training cost", "",
             "| method | rows trained on | wall time (s) | with backbone and teachers: rows | wall time (s) |",
             "|:---|---:|---:|---:|---:|"]

    def cell(stat: Stat, form: str) -> str:
        return ABSENT if stat.mean is None else format(stat.mean, form)

    for row in rows:
        cost = costs[row.run_name]
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
