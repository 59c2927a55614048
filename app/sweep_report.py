"""The choice of a sweep's points and its report. Each swept arm's point is the one with the best mean over
the seeds of its runs' validation score, ``checkpoint_selection.val_mean_class_acc`` of results.json (mean
class accuracy on the validation split, the score every run already selects its checkpoint by); ties go to
the earlier point (:func:`select`). The report (``reports/<config>/<sweep folder>/``: sweep.md, sweep.json;
:func:`build_report`) shows every point's validation score, the test numbers of the chosen points only (the
others' stay in their results.json), and the paired difference chosen method - chosen control (and - each
``--against`` arm: its own run on the base notes) per seed with the 95% t-interval of ``analysis.report``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from app.sweep_grid import Notes, Point, digest, point_text
from app.sweep_plan import ArmRuns, Plan, Role, SweepSpec
from utils.errors import UserError
from utils.json_files import load_results, write_json_atomic
from utils.layout import MAX_NAME_LENGTH, Layout, RunPaths, output_root

__all__ = ["load_run_results", "Scored", "select", "sweep_folder", "report_dir", "build_report"]

SWEEP_FORMAT = "fsa-lt-sweep/1"
SELECTION_KEY = "val_mean_class_acc"  # in checkpoint_selection (engine.recorder.SELECTION_METRIC)


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_run_results(path: Path) -> dict | None:
    """A run's results.json; None when there is none; a UserError naming it when it cannot be read."""
    try:
        return load_results(path)
    except ValueError as exc:
        raise UserError(f"{path} cannot be read ({exc}); rerun that run with --overwrite, or delete its folder and "
                        f"run the sweep again.") from exc


@dataclass
class Scored:
    """One point of an arm: each seed's validation score and results.json."""

    point: Point
    val: dict[str, float]            # pair key (seed0, ...) -> checkpoint_selection.val_mean_class_acc
    sources: dict[str, str]          # pair key -> results.json path
    runs: dict[str, dict]            # pair key -> results.json (test numbers read only for the chosen point)

    @property
    def mean(self) -> float:
        return sum(self.val.values()) / len(self.val)


def _scores(plan_: Plan, arm_runs: ArmRuns) -> list[Scored]:
    """Every point of an arm with its runs' validation scores; a UserError for a run that is not finished or
    selected nothing on validation."""
    out = []
    for point in arm_runs.points:
        val, sources, runs = {}, {}, {}
        for pair, note in arm_runs.notes[point].items():
            path = RunPaths(arm_runs.role.arm.folder, plan_.name, note).results
            results = load_run_results(path)
            if not results or not results.get("finished"):
                raise UserError(f"{path}: no finished run for {arm_runs.role.id} at {point_text(point)} ({pair}); run the "
                                f"sweep command again to finish it.")
            selection = results.get("checkpoint_selection") or {}
            score = selection.get(SELECTION_KEY)
            if selection.get("by") != "val" or not _is_number(score):
                raise UserError(f"{path} selected nothing on validation (checkpoint_selection: {selection}), so its point "
                                f"cannot be chosen on validation: the run was made without a validation split. Rerun it "
                                f"with --overwrite, or give the sweep its own notes with --note NAME.")
            val[pair], sources[pair], runs[pair] = float(score), str(path), results
        out.append(Scored(point, val, sources, runs))
    return out


def select(scored: list[Scored]) -> Scored:
    """The point with the best mean validation score over the seeds; ties: the earlier point. Reads nothing
    but ``Scored.val``."""
    best = scored[0]
    for candidate in scored[1:]:
        if candidate.mean > best.mean:
            best = candidate
    return best


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
def sweep_folder(spec: SweepSpec, plan_: Plan) -> str:
    """``sweep-<method>-<grid key labels>-<hash>`` (``NOTE-sweep-...`` with --note): readable, and one folder per
    sweep (the hash covers method, control, against, grid, seeds, note and --opts)."""
    identity = {"method": spec.method, "roles": [(r.role, r.id) for r in plan_.roles], "grid": spec.grid,
                "seeds": spec.seeds, "note": spec.note, "opts": spec.opts}
    labels = "+".join(k.label for k in plan_.grid)
    head = f"{spec.note}-sweep-{spec.method}-{labels}" if spec.note else f"sweep-{spec.method}-{labels}"
    return f"{head[:MAX_NAME_LENGTH - 9].rstrip('._-+')}-{digest(identity)}"


def report_dir(spec: SweepSpec, plan_: Plan, root: Path | None = None) -> Path:
    return Layout(output_root() if root is None else Path(root)).reports_dir(plan_.name) / sweep_folder(spec, plan_)


def _val_text(values: list[float]) -> str:
    from analysis.stats import Stat

    stat = Stat(values)
    return f"{stat.mean:.2f}" + (f" ± {stat.std:.2f}" if stat.std is not None else "")


def _stat_json(values: dict[str, float]) -> dict:
    from analysis.stats import Stat

    return {**Stat(list(values.values())).as_dict(), "per_seed": values}


def build_report(spec: SweepSpec, plan_: Plan, root: Path | None = None, *, echo: bool = True) -> dict:
    """Choose each swept arm's point on validation, write sweep.md and sweep.json (test numbers of the chosen
    points only) into :func:`report_dir`, and return the JSON."""
    from analysis.render import _paired_markdown, format_value
    from analysis.rows import METRICS
    from analysis.stats import Stat, paired_runs

    out = report_dir(spec, plan_, root)
    scored = {arm_runs.role.id: _scores(plan_, arm_runs) for arm_runs in plan_.arms}
    chosen = {role_id: select(points) for role_id, points in scored.items()}
    seeds = [Notes.pair_key(s) for s in plan_.notes.seed_keys()]
    several = len(seeds) > 1

    def label(role: Role) -> str:
        point = chosen[role.id].point
        return f"{role.arm.label} ({point_text(point)})" if role.role != "against" else role.arm.label

    method = plan_.roles[0]
    diffs = []
    for role in plan_.roles[1:]:
        diffs += paired_runs(label(method), chosen[method.id].runs, label(role), chosen[role.id].runs)

    grid_text = "; ".join(f"`{k.key}` = {', '.join(k.values)}" for k in plan_.grid)
    seeds_text = ", ".join(seeds)
    parts = [f"# Sweep: `{plan_.name}`, {method.arm.label} (`{method.id}`)", "",
             f"`{spec.command()}`", "",
             f"Grid: {grid_text} ({len(plan_.points)} points), notes {seeds_text}. Each swept arm's point is the one with "
             f"the best **mean validation score** over the seeds (mean class accuracy on the validation split, "
             f"`checkpoint_selection.{SELECTION_KEY}` of each run's results.json: the score every run already selects "
             f"its checkpoint by; ties go to the earlier point). The control gets the same grid and the same rule. "
             f"Test images choose nothing: only the chosen points' test numbers are read, below.", "",
             "## Chosen points: test accuracy (%)", "",
             "| arm | id | chosen point | validation | " + " | ".join(METRICS) + " | n |",
             "|:---|:---|:---|---:|" + "---:|" * len(METRICS) + "---:|"]
    for role in plan_.roles:
        best = chosen[role.id]
        runs = list(best.runs.values())
        cells = [role.arm.label, f"`{role.id}`" + (" (not swept)" if role.role == "against" else ""),
                 point_text(best.point) if role.role != "against" else "its own run", _val_text(list(best.val.values())),
                 *(format_value(Stat([float(r[m]) for r in runs if _is_number(r.get(m))]), several, len(runs))
                   for m in METRICS), str(len(runs))]
        parts.append("| " + " | ".join(cells) + " |")
    parts += ["", f"Test accuracy of each chosen run's selected model (its results.json top level), mean ± sample sd over "
                  f"the notes; — = the group has no class. Every other point's test numbers stay in its own "
                  f"results.json (run folders in sweep.json) and are not shown: a table of them would invite choosing "
                  f"on test."
              + (" The --against rows are not swept: their own runs on the seeds' base notes."
                 if any(r.role == "against" for r in plan_.roles) else "")]
    parts += ["", "## Validation score of every point (mean class accuracy %)"]
    for arm_runs in plan_.swept:
        role = arm_runs.role
        collapsed = [k.key for k in plan_.grid if k.key not in role.keys]
        parts += ["", f"### {role.arm.label} (`{role.id}`, {role.role})", ""]
        if collapsed:
            parts += [f"{', '.join(f'`{k}`' for k in collapsed)} {'does' if len(collapsed) == 1 else 'do'} not apply to "
                      f"it: its grid collapses to {len(arm_runs.points)} point(s).", ""]
        parts += ["| point | mean ± sd | " + " | ".join(seeds) + " | |", "|:---|---:|" + "---:|" * len(seeds) + ":---|"]
        for point in scored[role.id]:
            mark = "**chosen**" if point is chosen[role.id] else ""
            parts.append(f"| {point_text(point.point)} | {_val_text(list(point.val.values()))} | "
                         + " | ".join(f"{point.val[s]:.2f}" for s in seeds) + f" | {mark} |")
    parts += _paired_markdown(diffs, "chosen method − chosen reference, same seed = pair",
                              "the two chosen runs of the same seed (same data, seed and, on a grid of phase III keys, "
                              "the same phase I backbone)")
    markdown = "\n".join(parts) + "\n"

    def arm_json(arm_runs: ArmRuns) -> dict:
        role = arm_runs.role
        best = chosen[role.id]
        return {
            "role": role.role, "id": role.id, "label": role.arm.label, "folder": role.arm.folder,
            "keys": list(role.keys), "collapsed": [k.key for k in plan_.grid if k.key not in role.keys],
            # every point: its validation score and where its runs are; no test number
            "points": [{"point": dict(s.point), "chosen": s is best, "notes": arm_runs.notes[s.point],
                        "upstream_notes": arm_runs.upstream.get(s.point, {}), "val": _stat_json(s.val),
                        "results": s.sources} for s in scored[role.id]],
            "chosen": {"point": dict(best.point), "notes": arm_runs.notes[best.point], "val": _stat_json(best.val),
                       "test": {m: Stat([float(r[m]) for r in best.runs.values() if _is_number(r.get(m))]).as_dict()
                                for m in METRICS},
                       "results": best.sources},
        }

    files = {"sweep.md": str(out / "sweep.md"), "sweep.json": str(out / "sweep.json")}
    data = {
        "format": SWEEP_FORMAT, "config": plan_.name, "command": spec.command(), "method": method.id,
        "control": next((r.id for r in plan_.roles if r.role == "control"), None),
        "against": [r.id for r in plan_.roles if r.role == "against"],
        "grid": {k.key: list(k.values) for k in plan_.grid}, "seeds": list(spec.seeds) if spec.seeds else None,
        "notes": seeds, "opts": list(spec.opts),
        "selection": f"the point with the best mean over the notes of checkpoint_selection.{SELECTION_KEY} (validation "
                     f"split); ties: the earlier point",
        "arms": [arm_json(a) for a in plan_.arms],
        "paired": [d.as_dict() for d in diffs],
        "files": files,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(markdown)
    write_json_atomic(out / "sweep.json", data)
    if echo:
        print(markdown, flush=True)
        print(f"sweep report written to {out}/ (sweep.md, sweep.json)", flush=True)
    return data
