"""Phase II's outputs as typed objects: the only module that reads or writes ``features/<config>/<note>/``.

Phase II writes its split and confusing classes through :func:`write_phase_ii` (``score_matrix.pt``,
``confusion.json``, ``split.json``, ``split_statistics.json``) and :func:`write_provenance`; later stages read
them with :func:`read_phase_ii` and :func:`open_store` (the feature store). Every JSON output is read by
:func:`read_phase_ii_json`, which checks the fields later stages use (:data:`PHASE_II_JSON`): a truncated or
malformed file is a UserError naming it and the phase II command that rewrites it. ``provenance.json`` (kept
here, not in a module of its own, because it is one of those checked outputs and every read checks it first)
records the sha256 of the phase I checkpoint and config the folder was made from, so that readers refuse
phase II outputs of another (retrained or edited) phase I run (:func:`check_provenance`)::

    {"format": "fsa-lt-provenance/1", "config": NAME, "note": NOTE,
     "phase_i_checkpoint": {"path": ..., "sha256": ..., "bytes": ...},
     "phase_i_config": {"path": ..., "sha256": ...},
     "phase_ii_config": {...resolved phase II config...}, "features_dir": ..., "created": ..., "torch": ...}
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from engine.artifacts import PhaseIRun, is_finite_number, is_int
from engine.methods import BASELINE, METHODS
from fsa.confusion import confusing_table
from fsa.feature_store import FeatureStore
from utils.cli import script_command
from utils.errors import UserError
from utils.json_files import read_results, write_json_atomic
from utils.layout import RESULTS_FILE, RunPaths, features_identity, output_root

__all__ = ["phase_ii_command", "phase_ii_paths", "PhaseIIOutputs", "write_phase_ii", "read_phase_ii",
           "read_phase_ii_json", "PHASE_II_JSON", "open_store", "explained_classes", "sha256_file", "make_provenance",
           "read_provenance", "check_provenance", "write_provenance", "STORE_DIR", "PROVENANCE_FILE"]

STORE_DIR = "store"
PROVENANCE_FILE = "provenance.json"
PROVENANCE_FORMAT = "fsa-lt-provenance/1"


def phase_ii_command(config: str, note: str, *, overwrite: bool = False, backbone: str = BASELINE,
                     opts: tuple[str, ...] = ()) -> str:
    """The phase II command of (config, note) on ``backbone``, with further ``opts`` (e.g. the user's own)."""
    opts = (*([] if METHODS.get(backbone).is_baseline else [f"backbone={backbone}"]), *opts)
    return script_command("phase_ii_extract_feature.py", config, note, *(["--overwrite"] if overwrite else []),
                          *(["--opts", *opts] if opts else []))


def phase_ii_paths(config: str, note: str, backbone: str = BASELINE, root: Path | None = None) -> RunPaths:
    """Phase II's run of (config, note) on phase I method ``backbone`` (features/ or features-<backbone>/)
    under ``root`` (default: the output root)."""
    return RunPaths(METHODS.get(backbone).phase_ii_folder, config, note, output_root() if root is None else Path(root))


def _none_if_nan(values: list[float]) -> list[float | None]:
    return [None if (v is None or math.isnan(v)) else float(v) for v in values]


def write_phase_ii(folder: Path, *, matrix: torch.Tensor, nf: int, hr: float, head: list[int], tail: list[int],
                   confusing: dict[int, list[int]], counts: list[int], names: list[str], statistics: dict,
                   ts: float, tg: float, cam: dict) -> None:
    """Phase II's split, confusing classes and split statistics (``statistics``: SplitStatistics.result();
    ``cam``: layer, method, shape)."""
    torch.save(matrix, folder / "score_matrix.pt")
    write_json_atomic(folder / "confusion.json", {
        "nf": nf,
        "rows": "true class (S[t, j] = mean softmax score of class j over the training samples of class t)",
        "tail": tail,
        "confusing": {str(t): c for t, c in confusing.items()},
        "confusing_names": {names[t]: [names[j] for j in c] for t, c in confusing.items()},
        "score_matrix": [[float(v) for v in row] for row in matrix.tolist()],
        "class_names": names,
    })
    write_json_atomic(folder / "split.json", {
        "hr": hr, "head": head, "tail": tail, "train_counts": list(counts), "class_names": names,
    })
    specific = _none_if_nan(statistics["specific"].cpu().tolist())
    generic = _none_if_nan(statistics["generic"].cpu().tolist())
    count = [int(c) for c in statistics["count"].cpu().tolist()]
    total = max(sum(count), 1)
    write_json_atomic(folder / "split_statistics.json", {
        "ts": ts, "tg": tg, "cam_layer": cam["layer"], "cam_method": cam["method"], "cam_shape": list(cam["shape"]),
        "specific": specific, "generic": generic, "count": count,
        "mean_specific": sum((s or 0.0) * c for s, c in zip(specific, count)) / total,
        "mean_generic": sum((g or 0.0) * c for g, c in zip(generic, count)) / total,
        "per_class": {names[i]: {"class": i, "specific": specific[i], "generic": generic[i], "count": count[i]}
                      for i in range(len(names))},
        "class_names": names,
    })


def _is_classes(value: Any, num_classes: int) -> bool:
    return isinstance(value, list) and all(is_int(c) and 0 <= c < num_classes for c in value)


def _is_donor_map(value: Any, data: dict, num_classes: int) -> bool:
    """``{"<class>": [nf class indices]}``, as confusing_table needs it."""
    return isinstance(value, dict) and all(
        key.isdigit() and int(key) < num_classes and _is_classes(donors, num_classes) and len(donors) == data.get("nf")
        for key, donors in value.items())


def _is_file_record(value: Any, *keys: str) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(k), str) for k in keys)


def _is_fraction(value: Any, *, open_low: bool = False) -> bool:
    return is_finite_number(value) and (0 < value if open_low else 0 <= value) and value <= 1


# file -> field -> (what it must be, check(value, whole file, number of classes)): what later stages read of
# each of phase II's JSON outputs ("{n}" in a description: the number of classes)
_Check = Callable[[Any, dict, int], bool]
PHASE_II_JSON: dict[str, dict[str, tuple[str, _Check]]] = {
    "split.json": {
        "hr": ("a number in (0, 1]", lambda v, d, n: _is_fraction(v, open_low=True)),
        "head": ("a list of class indices in [0, {n})", lambda v, d, n: _is_classes(v, n)),
        "tail": ("a list of class indices in [0, {n})", lambda v, d, n: _is_classes(v, n)),
    },
    "split_statistics.json": {
        "ts": ("a number in [0, 1]", lambda v, d, n: _is_fraction(v)),
        "tg": ("a number in [0, 1]", lambda v, d, n: _is_fraction(v)),
    },
    "confusion.json": {
        "nf": ("an integer >= 1", lambda v, d, n: is_int(v) and v >= 1),
        "confusing": ("a mapping from class index to nf class indices in [0, {n})", _is_donor_map),
    },
    PROVENANCE_FILE: {
        "format": (f"'{PROVENANCE_FORMAT}'", lambda v, d, n: v == PROVENANCE_FORMAT),
        "phase_i_checkpoint": ("a record with 'path' and 'sha256'",
                               lambda v, d, n: _is_file_record(v, "path", "sha256")),
        "phase_i_config": ("a record with 'sha256'", lambda v, d, n: _is_file_record(v, "sha256")),
    },
}


def _read_json(path: Path, rerun: str) -> dict:
    """The JSON object in ``path``; missing, unreadable, truncated or not an object: a UserError naming ``rerun``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"{path} is missing: phase II did not finish, or the file was removed. Rerun {rerun}") from exc
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON or not UTF-8 (a truncated or damaged file)
        raise UserError(f"{path} is unreadable or not valid JSON ({type(exc).__name__}: {exc}): the file is truncated "
                        f"or damaged. Rerun {rerun}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not the object phase II writes. Rerun {rerun}")
    return data


def read_phase_ii_json(folder: Path, name: str, num_classes: int = 0, provenance: dict | None = None) -> dict:
    """Phase II's JSON output ``name`` (a key of :data:`PHASE_II_JSON`) in ``folder``, checked to hold the
    fields later stages read (class indices in ``[0, num_classes)``); a missing, truncated or malformed
    file is a UserError naming it and the phase II command that rewrites it (named from ``provenance``
    when given, else from the folder)."""
    path = Path(folder) / name
    rerun = _rerun_phase_ii(Path(folder), provenance)
    data = _read_json(path, rerun)
    bad = [f"'{key}' must be {what.format(n=num_classes)}" for key, (what, ok) in PHASE_II_JSON[name].items()
           if not ok(data.get(key), data, num_classes)]
    if bad:
        raise UserError(f"{path} is not a valid phase II {name} ({'; '.join(bad)}): it is damaged or was edited. "
                        f"Rerun {rerun}")
    return data


@dataclass
class PhaseIIOutputs:
    """What later stages read from `features/<config>/<note>/`, checked against the phase I run."""

    folder: Path
    hr: float                # the head / tail share of the split (phase I's eval.hr)
    head: list[int]
    tail: list[int]
    ts: float                # CAM thresholds of the class-specific / class-generic split
    tg: float
    confusing: torch.Tensor  # [C, nf], -1 where a class has no confusing classes
    checkpoint: Path         # the phase I checkpoint they were computed from
    checkpoint_sha256: str   # its content (checked): a phase III run records it, so a report can check it too


def read_phase_ii(folder: Path, phase_i: PhaseIRun) -> PhaseIIOutputs:
    """Load phase II's split, thresholds and confusing classes, after checking they match phase I."""
    if not (folder / RESULTS_FILE).is_file():
        raise UserError(f"No phase II outputs in {folder}. Run phase II first: "
                        f"{phase_ii_command(phase_i.paths.config, phase_i.paths.note, backbone=phase_i.method.id)}")
    prov = read_provenance(folder)
    checkpoint = Path(prov["phase_i_checkpoint"]["path"])
    if not checkpoint.is_file():
        checkpoint = phase_i.paths.best
    check_provenance(folder, checkpoint, phase_i.config_path)
    num_classes = phase_i.bundle.num_classes
    split, thresholds, confusion = (read_phase_ii_json(folder, name, num_classes, prov)
                                    for name in ("split.json", "split_statistics.json", "confusion.json"))
    table = confusing_table({int(k): v for k, v in confusion["confusing"].items()}, num_classes, confusion["nf"])
    return PhaseIIOutputs(folder, float(split["hr"]), list(split["head"]), list(split["tail"]),
                          float(thresholds["ts"]), float(thresholds["tg"]), table, checkpoint,
                          prov["phase_i_checkpoint"]["sha256"])


def open_store(folder: Path, config: str, note: str, backbone: str = BASELINE) -> FeatureStore:
    """Phase II's feature store; a UserError naming the phase II command when it was not written (or
    its meta.json is damaged)."""
    store_dir = folder / STORE_DIR
    rerun = phase_ii_command(config, note, overwrite=True, backbone=backbone)
    if not (store_dir / "meta.json").is_file():
        raise UserError(f"Phase II stored no feature maps in {store_dir} (store.enabled was false or it did not finish), "
                        f"so this method has nothing to read. Rerun phase II with the store on: "
                        f"{rerun} --opts store.enabled=true")
    return FeatureStore(store_dir, rerun=rerun)


def explained_classes(folder: Path, num_classes: int) -> list[int]:
    """Every tail class of phase II's ``confusion.json`` followed by its confusing classes, each once
    (visualize's default classes); the caller checks provenance first."""
    data = read_phase_ii_json(folder, "confusion.json", num_classes)
    chosen: list[int] = []
    for tail, donors in data["confusing"].items():
        for c in [int(tail), *map(int, donors)]:
            if c not in chosen:
                chosen.append(c)
    return chosen


# ------------------------------------------------------------------------------------------------
# Provenance
# ------------------------------------------------------------------------------------------------
def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def make_provenance(*, config: str, note: str, checkpoint_path: Path, phase_i_config_path: Path,
                    phase_ii_config: dict, features_dir: Path, backbone: str = BASELINE) -> dict:
    checkpoint_path, phase_i_config_path = Path(checkpoint_path), Path(phase_i_config_path)
    return {
        "format": PROVENANCE_FORMAT,
        "config": config,
        "note": note,
        "backbone": backbone,
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


def _names(features_dir: Path, provenance: dict | None) -> tuple[str, str, str]:
    """(config, note, backbone) of a phase II folder, for the commands in messages: from its provenance,
    else from its place in the layout (a backbone the method table does not know: the baseline)."""
    if provenance and provenance.get("config"):
        return str(provenance["config"]), str(provenance.get("note", "default")), str(provenance.get("backbone", BASELINE))
    config, note, backbone = features_identity(features_dir, BASELINE)
    if backbone not in {m.id for m in METHODS.backbones()}:
        backbone = BASELINE
    return config or "NAME", note or "default", backbone


def _rerun_phase_ii(features_dir: Path, provenance: dict | None = None) -> str:
    """The phase II command that rewrites the outputs in ``features_dir``."""
    config, note, backbone = _names(features_dir, provenance)
    return phase_ii_command(config, note, overwrite=True, backbone=backbone)


def read_provenance(features_dir: Path | str) -> dict:
    """The parsed ``provenance.json``; a missing or unreadable file is a UserError naming phase II."""
    features_dir = Path(features_dir)
    path = features_dir / PROVENANCE_FILE
    if not path.is_file():
        config, note, backbone = _names(features_dir, None)
        raise UserError(
            f"No phase II outputs in {features_dir} ({PROVENANCE_FILE} missing). Run phase II first: "
            f"{phase_ii_command(config, note, overwrite=(features_dir / RESULTS_FILE).is_file(), backbone=backbone)}"
        )
    return read_phase_ii_json(features_dir, PROVENANCE_FILE)


def check_provenance(features_dir: Path | str, phase_i_checkpoint_path: Path | str,
                     phase_i_config_path: Path | str) -> dict:
    """Raise UserError unless the phase II outputs in ``features_dir`` were made from exactly this
    phase I checkpoint file and this phase I ``config.yaml`` (compared by sha256 of the bytes);
    also refuse an unfinished phase II. Returns the provenance dict."""
    features_dir = Path(features_dir)
    prov = read_provenance(features_dir)
    rerun = _rerun_phase_ii(features_dir, prov)
    results = read_results(features_dir / RESULTS_FILE)
    if not (results or {}).get("finished"):
        raise UserError(f"phase II in {features_dir} did not finish (no finished results.json): rerun {rerun}")
    for key, path, what in (("phase_i_checkpoint", phase_i_checkpoint_path, "checkpoint"),
                            ("phase_i_config", phase_i_config_path, "config")):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"phase I {what} {path} does not exist; cannot check it against the phase II outputs "
                            f"in {features_dir}.")
        recorded = prov[key]["sha256"]
        if recorded != sha256_file(path):
            raise UserError(
                f"phase II outputs were made from a different phase I {what}: {features_dir} was computed from "
                f"{prov[key].get('path', '?')}, whose content differs from {path} (retrained or edited "
                f"since). Rerun {rerun}"
            )
    return prov


def write_provenance(features_dir: Path, provenance: dict) -> None:
    write_json_atomic(Path(features_dir) / PROVENANCE_FILE, provenance)
