"""JSON files of the runs (results.json and the phases' records): written atomically, read with a reason.

A reader sees the old file or the new one, never half of one; a file that exists but is not a JSON
object is an error with its reason (`load_results`) or, where a missing record only means "not done",
no record at all (`read_results`).
"""
from __future__ import annotations

import json
from pathlib import Path


def write_json_atomic(path: Path, data: dict, indent: int | None = 2) -> None:
    """Write `data` as JSON to a temporary file, then rename it over `path` (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=indent, sort_keys=False) + "\n")
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: leave no half-written file behind
        raise


def load_results(path: Path) -> dict | None:
    """The JSON object at `path`; None when there is no file; ValueError saying why when the file
    exists but is not a readable JSON object."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise ValueError(f"not readable as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    return data


def read_results(path: Path) -> dict | None:
    """The JSON object at `path`, or None when it is missing or unreadable (then the run counts as not done)."""
    try:
        return load_results(path)
    except ValueError:
        return None
