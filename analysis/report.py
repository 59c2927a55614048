"""The ablation report of one config, orchestrated. ``build_report`` collects the finished runs of a note set
into rows (``analysis.rows``: a row per arm of the method table, ``engine.methods.METHODS.arms()``, then any
other phase III folder), refuses runs that do not belong together (``analysis.checks``), takes means, paired
differences (``analysis.stats``) and training costs (``analysis.costs``), and writes
``reports/<config>/<notes_folder(notes)>/``: the figures (``analysis.plots``, ``analysis.detail_plots``), then ablation.md, ablation.csv
and report.json (``analysis.render``; report.json last, as it marks a complete report); ``is_up_to_date`` tells
whether building it again would change anything. ``build_variant_report`` sets variants (each a
``pipeline.py --note``) run over the same seeds side by side, in ``reports/<config>/<variants_folder>/``. The
command line is ``report.py``, whose ``--help`` describes each file.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from analysis.checks import check_phase_i_sources, check_settings_agree, variant_settings_differences
from analysis.costs import row_cost
from analysis.detail_plots import confusion_chart, curves_chart, has_curves, per_class_chart
from analysis.plots import bar_chart, forest_chart
from analysis.render import (REPORT_FORMAT, ablation_csv, ablation_markdown, files_text, notes_text, report_json,
                             variants_markdown, variants_report_json)
from analysis.rows import METRICS, Row, code_versions, collect, paired_differences
from analysis.stats import VARIANT_AT, PairedDifference, paired_runs
from engine.methods import METHODS
from utils.config import config_name
from utils.errors import UserError
from utils.json_files import read_results, write_json_atomic
from utils.layout import Layout, fitted_folder_name, output_root, seed_notes

__all__ = ["build_report", "run", "report_dir", "is_up_to_date", "variant_notes",
           "variants_folder", "variants_report_dir", "variant_differences", "build_variant_report"]

FIGURE_PATTERNS = ("forest.png", "confusion_*.png", "curves_*.png")  # figures a report writes only when it has data


def report_dir(config: str, notes: list[str], root: Path | None = None) -> Path:
    """``reports/<config>/<notes_folder(notes)>/`` under ``root``: the folder of one note set's report."""
    return Layout(output_root() if root is None else Path(root)).report_dir(config_name(config), notes)


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
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
    lines += _forest(out, f"{config}: paired differences ({notes_text(notes)})", diffs, files)
    lines += ["", "![per-class accuracy, one panel per row](per_class.png)"]
    confusions, curves = [], []
    for row in rows:
        data = row.confusions()
        if data is not None:
            counts, matrices = data
            name = f"confusion_{row.key}.png"
            confusion_chart(out / name, f"{config}: {row.label}, confusion matrix, rows normalised to recall "
                                        f"({notes_text([n for n in notes if n in row.runs], 'mean')})",
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


# ------------------------------------------------------------------------------------------------
# The report of a note set
# ------------------------------------------------------------------------------------------------
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


def _write(out: Path, markdown: str, csv_text: str, data: dict, echo: bool) -> None:
    """Write ablation.md, ablation.csv and report.json into ``out``; report.json last: it marks a complete
    report (``is_up_to_date``)."""
    (out / "ablation.md").write_text(markdown)
    (out / "ablation.csv").write_text(csv_text)
    write_json_atomic(out / "report.json", data)
    if echo:
        print(markdown, flush=True)
        print(f"report written to {out}/ ({files_text(data['files'])})", flush=True)


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
    costs = {row.run_name: row_cost(row, root) for row in rows}
    versions = code_versions(rows, notes)
    out = report_dir(config, notes, root)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: str(out / name) for name in ("ablation.md", "ablation.csv")}
    figures = _figures(out, config, notes, rows, diffs, files)
    files["report.json"] = str(out / "report.json")
    data = report_json(config, notes, rows, files, costs, diffs, versions)
    _write(out, ablation_markdown(config, notes, rows, costs, diffs, versions, figures),
           ablation_csv([(row, None, notes, costs[row.run_name]) for row in rows]), data, echo)
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
    current = {(row.run_name, note): src for row in collect(config, notes, root) for note, src in row.sources.items()}
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


def variant_notes(variant: str, seeds: list[int] | None) -> list[str]:
    """The notes ``pipeline.py`` gives a variant: ``--note VARIANT`` (no --note for ``default``), with
    ``--seeds``: ``VARIANT-seedS`` (``seedS`` for ``default``); without: the note ``VARIANT`` itself."""
    return seed_notes(None if variant == DEFAULT_VARIANT else variant, seeds)


def variants_folder(variants: list[str], seeds: list[int] | None) -> str:
    """The report folder of variants side by side: the variants in the order given (the first is the
    reference) joined with ',', then '@' and the seed notes joined with '+' (``default,lr05@seed0+seed1``);
    neither character can be in a note, so it never meets a note set's folder. Shortened like
    ``notes_folder``."""
    return fitted_folder_name(",".join(variants) + ("@" + "+".join(f"seed{s}" for s in seeds) if seeds else ""))


def variants_report_dir(config: str, variants: list[str], seeds: list[int] | None, root: Path | None = None) -> Path:
    return Layout(output_root() if root is None else Path(root)).reports_dir(config_name(config)) / variants_folder(variants, seeds)


def _only(rows: list[Row], notes: list[str]) -> list[Row]:
    """The rows restricted to the runs of ``notes`` (rows without any left out)."""
    kept = [replace(row, runs={n: r for n, r in row.runs.items() if n in notes},
                    sources={n: s for n, s in row.sources.items() if n in notes}) for row in rows]
    return [row for row in kept if row.runs]


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

            out += paired_runs(f"{row.label}{VARIANT_AT}{variant}", by_seed(variant), f"{row.label}{VARIANT_AT}{reference}",
                           by_seed(reference))
    return out


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
    seeds_text = f"seeds {', '.join(map(str, seeds))}" if seeds else "one run per variant"
    figures = _forest(out, f"{config}: each row's variant − {variants[0]} ({seeds_text})", diffs, files)
    files["report.json"] = str(out / "report.json")
    costs = {(row.run_name, v): row_cost(row, root, variant_notes_) for row in rows for v, variant_notes_ in notes.items()}
    settings = variant_settings_differences(config, rows, notes, root)
    data = variants_report_json(config, seeds, notes, rows, costs, diffs, settings, versions, files)
    _write(out, variants_markdown(config, rows, notes, seeds_text, settings, versions, diffs, figures),
           ablation_csv([(row, v, ns, costs[(row.run_name, v)]) for row in rows
                         for v, ns in notes.items() if any(n in row.runs for n in ns)]), data, echo)
    return data
