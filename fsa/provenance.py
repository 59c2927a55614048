"""Which phase I checkpoint and config a phase II output folder was made from.

Phase II writes ``features/<config>/<note>/provenance.json``; phase III calls
:func:`check_provenance` before it trusts the confusing classes, the split or the feature store,
so that retraining phase I (or editing its config) cannot silently pair new weights with stale
phase II outputs.

``provenance.json``::

    {"format": "fsa-lt-provenance/1", "config": NAME, "note": NOTE,
     "phase_i_checkpoint": {"path": ..., "sha256": ..., "bytes": ...},
     "phase_i_config": {"path": ..., "sha256": ...},     # sha256 of the config.yaml file content
     "phase_ii_config": {...resolved phase II config...},
     "features_dir": ..., "created": ISO time, "torch": version}
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

import torch

from utils.cli import script_command
from utils.errors import UserError

__all__ = ["PROVENANCE_FILE", "sha256_file", "phase_ii_command", "make_provenance", "write_provenance",
           "read_provenance", "check_provenance"]

PROVENANCE_FILE = "provenance.json"
FORMAT = "fsa-lt-provenance/1"


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def phase_ii_command(config: str, note: str, *, overwrite: bool = False) -> str:
    return script_command("phase_ii_extract_feature.py", config, note, *(["--overwrite"] if overwrite else []))


def make_provenance(*, config: str, note: str, checkpoint_path: Path, phase_i_config_path: Path,
                    phase_ii_config: dict, features_dir: Path) -> dict:
    checkpoint_path, phase_i_config_path = Path(checkpoint_path), Path(phase_i_config_path)
    return {
        "format": FORMAT,
        "config": config,
        "note": note,
        "phase_i_checkpoint": {
            "path": str(checkpoint_path.resolve()),
            "sha256": sha256_file(checkpoint_path),
            "bytes": checkpoint_path.stat().st_size,
        },
        "phase_i_config": {"path": str(phase_i_config_path.resolve()), "sha256": sha256_file(phase_i_config_path)},
        "phase_ii_config": phase_ii_config,
        "features_dir": str(Path(features_dir).resolve()),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }


def write_provenance(features_dir: Path, provenance: dict) -> Path:
    path = Path(features_dir) / PROVENANCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(provenance, indent=2) + "\n")
    tmp.replace(path)
    return path


def _names(features_dir: Path, provenance: dict | None) -> tuple[str, str]:
    if provenance and provenance.get("config"):
        return str(provenance["config"]), str(provenance.get("note", "default"))
    features_dir = Path(features_dir)
    return features_dir.parent.name or "NAME", features_dir.name or "default"


def read_provenance(features_dir: Path | str) -> dict:
    """The parsed ``provenance.json``; a missing or unreadable file is a UserError naming phase II."""
    features_dir = Path(features_dir)
    path = features_dir / PROVENANCE_FILE
    config, note = _names(features_dir, None)
    if not path.is_file():
        raise UserError(
            f"No phase II outputs in {features_dir} ({PROVENANCE_FILE} missing). Run phase II first: "
            f"{phase_ii_command(config, note, overwrite=(features_dir / 'results.json').is_file())}"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); rerun {phase_ii_command(config, note, overwrite=True)}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not an FSA-LT provenance file; rerun {phase_ii_command(config, note, overwrite=True)}")
    return data


def check_provenance(features_dir: Path | str, phase_i_checkpoint_path: Path | str,
                     phase_i_config_path: Path | str) -> dict:
    """Raise UserError unless the phase II outputs in ``features_dir`` were made from exactly this
    phase I checkpoint file and this phase I ``config.yaml`` (compared by sha256 of the bytes);
    also refuse an unfinished phase II. Returns the provenance dict."""
    features_dir = Path(features_dir)
    prov = read_provenance(features_dir)
    config, note = _names(features_dir, prov)
    rerun = phase_ii_command(config, note, overwrite=True)
    results = features_dir / "results.json"
    try:
        finished = bool(json.loads(results.read_text()).get("finished"))
    except (OSError, json.JSONDecodeError):
        finished = False
    if not finished:
        raise UserError(f"phase II in {features_dir} did not finish (no finished results.json): rerun {rerun}")
    for key, path, what in (("phase_i_checkpoint", phase_i_checkpoint_path, "checkpoint"),
                            ("phase_i_config", phase_i_config_path, "config")):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"phase I {what} {path} does not exist; cannot check it against the phase II outputs "
                            f"in {features_dir}.")
        recorded = prov.get(key, {}).get("sha256")
        if recorded != sha256_file(path):
            raise UserError(
                f"phase II outputs were made from a different phase I {what}: {features_dir} was computed from "
                f"{prov.get(key, {}).get('path', '?')}, whose content differs from {path} (retrained or edited "
                f"since). Rerun {rerun}"
            )
    return prov
