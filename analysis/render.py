"""The report's text files from collected rows, their statistics and costs: the markdown of ``ablation.md``
(the table, what the numbers are, the code versions, the training cost, the paired differences), the lines
of ``ablation.csv``, the content of ``report.json``, and the same three for variants set side by side. Pure
functions of their arguments: they read no run and write no file (``analysis.report`` does), so that the same
rows always give the same bytes.
"""
from __future__ import annotations

import csv
import io

from analysis.costs import cost_markdown
from analysis.rows import COST_KEYS, METRICS, Row
from analysis.stats import ABSENT, PairedDifference, Stat, is_finite_number

REPORT_FORMAT = 2  # bumped when a report gains files or keys, so that is_up_to_date rebuilds older ones
NUMBERS = ("test accuracy (%) of each run's selected model (results.json top level; checkpoint_selection: best "
           "validation score, or final without a validation split); mean and sample std (ddof 1) over notes; null = "
           "absent group or undefined std")


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


def notes_text(notes: list[str], how: str = "") -> str:
    """``note seed0``, or ``[how over ]3 notes: seed0, seed1, seed2`` (figure titles)."""
    if len(notes) == 1:
        return f"note {notes[0]}"
    return f"{how + ' over ' if how else ''}{len(notes)} notes: {', '.join(notes)}"


def files_text(files: dict[str, str]) -> str:
    """The files of a report, each per-row figure kind counted rather than listed."""
    per_row = {kind: sum(1 for name in files if name.startswith(f"{kind}_")) for kind in ("confusion", "curves")}
    named = [name for name in files if not any(name.startswith(f"{kind}_") for kind in per_row)]
    return ", ".join(named + [f"{n} {kind}_<row>.png" for kind, n in per_row.items() if n])


# ------------------------------------------------------------------------------------------------
# ablation.md
# ------------------------------------------------------------------------------------------------
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


def _groups_text(rows: list[Row]) -> str:
    values = {r.get("groups", {}).get("hr") for row in rows for r in row.runs.values()}
    hr = sorted(v for v in values if is_finite_number(v))
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


def ablation_markdown(config: str, notes: list[str], rows: list[Row], costs: dict[str, dict[str, Stat]],
                      diffs: list[PairedDifference], versions: dict, figures: list[str]) -> str:
    """ablation.md of one note set; ``figures``: the markdown lines that show the figures written."""
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
    parts += cost_markdown(rows, costs)
    parts += _paired_markdown(diffs)
    parts += figures
    missing = [f"{row.label}: {', '.join(n for n in notes if n not in row.runs)}"
               for row in rows if row.n < len(notes)]
    if missing:
        parts += ["", "No finished run for: " + "; ".join(missing) + "."]
    parts += ["", "Run folders: " + ", ".join(f"{row.label} = `checkpoints/{row.run_name}/{config}/<note>`" for row in rows) + "."]
    return "\n".join(parts) + "\n"


def _variants_table(rows: list[Row], notes: dict[str, list[str]]) -> str:
    header = ["method"] + [f"{v}: {m}" for v in notes for m in (*METRICS, "n")]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [row.label]
        for variant_notes in notes.values():
            n = sum(1 for note in variant_notes if note in row.runs)
            cells += [format_value(row.stat(m, variant_notes), True, n) for m in METRICS] + [str(n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variants_markdown(config: str, rows: list[Row], notes: dict[str, list[str]], seeds_text: str,
                      settings: dict[str, list[str]], versions: dict, diffs: list[PairedDifference],
                      figures: list[str]) -> str:
    """ablation.md of variants side by side (``notes``: variant -> its notes, the first the reference)."""
    variants = list(notes)
    reference = variants[0]
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
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------
# ablation.csv and report.json
# ------------------------------------------------------------------------------------------------
def ablation_csv(lines: list[tuple[Row, str | None, list[str], dict[str, Stat]]]) -> str:
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
        cells = [row.id or "", row.label, row.run_name, *([variant] if with_variant else []), len(present),
                 " ".join(present)]
        for stat in [row.stat(m, notes) for m in METRICS] + [cost[key] for key in costs]:
            cells += ["" if stat.mean is None else f"{stat.mean:.4f}", "" if stat.std is None else f"{stat.std:.4f}"]
        writer.writerow(cells)
    return buf.getvalue()


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


def report_json(config: str, notes: list[str], rows: list[Row], files: dict, costs: dict[str, dict[str, Stat]],
                diffs: list[PairedDifference], versions: dict) -> dict:
    """report.json of one note set."""
    out_rows = []
    for row in rows:
        per_class = row.per_class()
        own = _row_json(row, notes, costs[row.run_name])
        out_rows.append({
            "id": row.id,
            "group": row.group,
            "label": row.label,
            "phase": row.run_name,
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


def variants_report_json(config: str, seeds: list[int] | None, notes: dict[str, list[str]], rows: list[Row],
                         costs: dict[tuple[str, str], dict[str, Stat]], diffs: list[PairedDifference],
                         settings: dict[str, list[str]], versions: dict, files: dict) -> dict:
    """report.json of variants side by side (``costs`` by (run folder, variant))."""
    variants = list(notes)
    return {
        "format": REPORT_FORMAT, "config": config, "variants": variants, "seeds": seeds, "notes": notes,
        "reference": variants[0], "evaluation": "selected", "numbers": NUMBERS, "metrics": list(METRICS),
        "rows": [{"id": row.id, "group": row.group, "label": row.label, "phase": row.run_name,
                  "variants": {v: _row_json(row, ns, costs[(row.run_name, v)]) for v, ns in notes.items()}}
                 for row in rows],
        "paired": [d.as_dict() for d in diffs], "settings_differ": settings, "code_versions": versions,
        "files": files,
    }
