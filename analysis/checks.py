"""The checks that keep runs which do not belong together out of one report. ``check_settings_agree``:
every run shares the training data and class counts, and the runs of a row its model section (the saved
``config.yaml``), so that a mean or a paired difference never mixes other data or models.
``check_phase_i_sources``: every phase III run still pairs with the phase I run it was trained from (phase
III's own provenance check), that of its note or of the note it recorded as ``upstream_note`` (a sweep
point's runs read the phase I / II of a base note). ``variant_settings_differences`` names the saved settings
in which variants, set side by side by design, differ.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from analysis.rows import Row, rerun_command, under_root
from engine.phase_ii_outputs import check_provenance, sha256_file
from engine.methods import METHODS
from utils.config import config_differences, config_name, read_yaml
from utils.errors import UserError
from utils.layout import RunPaths, output_root

# the saved settings every run of a report shares (only the seed may differ): its training data and class
# counts; the notes of one row also share its model section (rows differ there by design, e.g. a cosine
# classifier, LDAM's fixed scale)
SHARED_SETTINGS = ("dataset", "train_counts")
ROW_SETTINGS = ("model",)
# dataset keys that say where the files are and whether to fetch them, not what the data is
DATA_LOCATION = ("root", "download")


def _report_command(config: str, notes: list[str]) -> str:
    return shlex.join(["python", "report.py", "--config", config, "--notes", *notes])


def _saved_config_path(row: Row, config: str, note: str, root: Path) -> Path:
    return RunPaths(row.run_name, config, note, Path(root)).checkpoint_dir / "config.yaml"


def _settings(config: str, row: Row, note: str, run: dict, root: Path) -> dict:
    """The settings of a run that must agree (``SHARED_SETTINGS``, ``ROW_SETTINGS``): the sections of its saved
    ``config.yaml`` (phase I runs; phases II / III take theirs from their phase I run and save none) and the
    ``train_counts`` of its results.json; what the run does not record is left out."""
    path = _saved_config_path(row, config, note, root)
    try:
        saved = read_yaml(path) if path.is_file() else {}
    except UserError as exc:
        raise UserError(f"{str(exc).rstrip('.')}; it is the saved config of a run of this report, which must be read "
                        f"to check the run's settings against the others. Rewrite it with: "
                        f"{rerun_command(row.run_name, config, note)}") from exc
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
                folder = RunPaths(row.run_name, config, note, Path(root)).checkpoint_dir
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
    the phase I run it read: that of its note, or of the note it recorded as ``upstream_note`` (made with
    ``--upstream-note``, as a sweep point's runs are). Phase III's own provenance check
    (``engine.phase_ii_outputs.check_provenance``) of the phase II outputs it was trained on against the phase I
    checkpoint it records (``phase_i_checkpoint``) and that phase I run's config.yaml, and the checkpoint's
    content against the sha256 the run recorded (``phase_i_checkpoint_sha256``: catches phase I and phase II
    both re-run after it)."""
    root = output_root() if root is None else Path(root)
    config = config_name(config)
    # one check per (phase II folder, phase I checkpoint): it hashes the checkpoint, and the runs of one note
    # share both, so their failure is told once, followed by each such run
    reasons: dict[tuple[Path, Path], str | None] = {}
    hashes: dict[Path, str] = {}  # checkpoint -> sha256, each file hashed once
    stale: dict[tuple[str, str, Path, str], list[str]] = {}  # (note, upstream note, checkpoint, reason) -> the runs
    for row in rows:
        arm = METHODS.by_folder(row.run_name)
        if arm is None or arm.method.stage != "phase_iii":
            continue  # a folder the method table does not know: no known phase II folder, and never paired
        for note, run in row.runs.items():
            upstream = run.get("upstream_note") or note  # the note whose phase I run and phase II outputs it read
            phase_i = RunPaths(arm.backbone.folder, config, upstream, Path(root))
            recorded = under_root(run.get("phase_i_checkpoint") or phase_i.best, root)
            # the file phase III itself checks (read_phase_ii): the recorded one, else the run's best_model.pt
            checkpoint = recorded if recorded.is_file() else phase_i.best
            if not checkpoint.is_file():
                continue  # no phase I model left (checkpoints deleted): none that could differ
            key = (RunPaths(arm.phase_ii, config, upstream, Path(root)).features_dir, checkpoint)
            if key not in reasons:
                reasons[key] = _provenance_failure(*key, phase_i.checkpoint_dir / "config.yaml")
            reason = reasons[key]
            recorded_sha = run.get("phase_i_checkpoint_sha256")  # recorded by phase III runs since it exists
            if not reason and recorded_sha and recorded_sha != hashes.setdefault(checkpoint, sha256_file(checkpoint)):
                # phase I and phase II were both re-run after this run: they agree, and this run is the stale one
                reason = (f"the phase III run was trained from a phase I checkpoint with other content (sha256 "
                          f"{recorded_sha[:12]}...) than this file has now")
            if reason:
                folder = RunPaths(row.run_name, config, note, Path(root)).checkpoint_dir
                upstream_args = ("--upstream-note", upstream) if upstream != note else ()
                stale.setdefault((note, upstream, checkpoint, reason), []).append(
                    f"row '{row.label}' ({folder}): {rerun_command(row.run_name, config, note, *upstream_args)}")
    if stale:
        stale_notes = {note for note, *_ in stale}
        kept = [n for n in notes if n not in stale_notes]
        groups = " ".join(f"Note '{note}'{_read_from(note, upstream)}, phase I checkpoint {checkpoint}: {reason}; then "
                          f"rerun each phase III run trained from it: {'; '.join(runs)}."
                          for (note, upstream, checkpoint, reason), runs in stale.items())
        raise UserError(
            f"{sum(map(len, stale.values()))} phase III run(s) no longer pair with the phase I run the report shows "
            f"for their note (phase III's provenance check fails: that phase I model changed after they were trained, "
            f"or the phase II outputs that record which model they used are gone), so their numbers and paired "
            f"differences would mix different phase I models. {groups}"
            + (f" Or build the report without note(s) {', '.join(n for n in notes if n in stale_notes)}: "
               f"{_report_command(config, kept)}." if kept else "")
        )


def _read_from(note: str, upstream: str) -> str:
    """Where the runs of ``note`` read their phase I / II, when not from ``note`` itself."""
    return "" if upstream == note else f" (its phase III runs read the phase I / II of note '{upstream}')"


def variant_settings_differences(config: str, rows: list[Row], notes: dict[str, list[str]],
                                 root: Path) -> dict[str, list[str]]:
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
            saved = [_saved_config_path(row, config, n, root) for n in pair]
            if all(path.is_file() for path in saved):
                keys.update(config_differences(read_yaml(saved[0]), read_yaml(saved[1])))
        out[variant] = sorted(k for k in keys if k != "seed" and k.split(".")[-1] not in DATA_LOCATION)
    return out
