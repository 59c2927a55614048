"""The grid of a sweep and the notes of its points. ``--grid KEY=V1,V2 ...`` (:func:`parse_grid`) takes
leaf keys of any phase's config, checked before anything runs (none the sweep sets itself or that changes the
data a point is scored on, each key once, two or more distinct values); the points are the product of the
values, in the order given, and each runs per seed as its own note (:class:`Notes`), ``sweep-<point>-seedN``
(``NOTE-sweep-<point>-seedN`` with ``--note NOTE``; without ``--seeds`` the note ``sweep-<point>``), e.g.
``sweep-lr0.001_iterations200-seed0``. A grid key that an arm does not read (a phase II / III key for a phase
I method, ``tailcalib.*`` for all but the TailCalib methods, ...: :func:`applies`) collapses for that arm: it
runs once for all the key's values.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace

from engine.methods import METHODS, SELECTING_KEYS, Method, PhaseIMethod
from utils.config import CONFIG_PHASES, close_keys, did_you_mean, get_dotted, load_config, parse_opts
from utils.errors import UserError
from utils.layout import check_run_name
from utils.schema import schema_keys

__all__ = ["GridKey", "parse_grid", "applies", "reading_methods", "Point", "point_text", "digest", "Notes",
           "restrict"]

UPSTREAM_PHASES = ("phase_i", "phase_ii")
# the only dataset keys a grid may vary: they change the training augmentation, not the images a point is
# trained on or scored on
_DATA_KEYS_ALLOWED = ("dataset.augment", "dataset.flip")


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridKey:
    key: str
    values: tuple[str, ...]      # as typed
    phases: tuple[str, ...]      # the config phases whose schema has the key
    label: str = ""              # its name in notes (the last part of the key, unless two keys share it)

    @property
    def upstream(self) -> bool:
        """Whether it changes phase I or phase II (then every phase III arm reads it through its backbone)."""
        return any(phase in UPSTREAM_PHASES for phase in self.phases)

    def items(self) -> list[str]:
        return [f"{self.key}={value}" for value in self.values]


def _split_values(text: str) -> list[str]:
    """``a,b,[1,2]`` -> ``['a', 'b', '[1,2]']``: commas inside brackets or quotes belong to the value."""
    values, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    return values + [current.strip()]


def _phases_of(key: str) -> list[str]:
    return [phase for phase in CONFIG_PHASES if key in schema_keys(phase)]


def _refuse_key(key: str) -> None:
    """A UserError for a grid key the sweep sets itself or that would change what the points are scored on."""
    if key == "seed":
        raise UserError("--grid seed: --seeds sets it; a sweep runs every point on the same seeds (--seeds 0 1 2) and "
                        "chooses by the mean over them. Drop seed from --grid.")
    if key == "finetune.generator" or key == "backbone" or key in SELECTING_KEYS:
        raise UserError(f"--grid {key}: it chooses the method, which --method (and --control) name; a sweep varies "
                        f"one method's settings. Drop {key} from --grid and pass the method id as --method "
                        f"(python -c \"from engine.methods import METHODS; print([m.id for m in METHODS])\").")
    if key == "phase":
        raise UserError("--grid phase: a sweep trains; drop phase from --grid.")
    if key.startswith("dataset.") and key not in _DATA_KEYS_ALLOWED:
        raise UserError(f"--grid {key}: the points must be trained on the same data and chosen on the same validation "
                        f"images, so a sweep does not vary dataset settings (of the dataset section only "
                        f"{', '.join(_DATA_KEYS_ALLOWED)}, which change the training augmentation). Set {key} with "
                        f"--opts, or sweep each dataset setting as its own sweep.")


def parse_grid(items: list[str], sources: dict[str, str], opts: list[str]) -> list[GridKey]:
    """The ``--grid KEY=V1,V2 ...`` of a sweep, checked: known keys of some phase's config (a leaf, not a
    section), none the sweep sets itself or that changes the data, each key once, not also in --opts, two or
    more distinct values (after the schema's coercion), each value valid for its phases."""
    if not items:
        raise UserError("--grid needs at least one KEY=V1,V2 (e.g. --grid finetune.lr=0.001,0.01).")
    opt_keys = {item.split("=", 1)[0].strip() for item in opts}
    keys: list[GridKey] = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--grid entry {item!r} is not of the form KEY=V1,V2 (e.g. finetune.lr=0.001,0.01).")
        key, raw = (part.strip() for part in item.split("=", 1))
        _refuse_key(key)
        phases = _phases_of(key)
        if not phases:
            known = sorted({k for phase in CONFIG_PHASES for k in schema_keys(phase)})
            sections = [k for k in known if k.startswith(f"{key}.")]
            hint = (f" It is a section: sweep one of its keys ({', '.join(sections[:6])}{', ...' if len(sections) > 6 else ''})."
                    if sections else did_you_mean(close_keys(key, known)))
            raise UserError(f"--grid {key}: no phase's config has this key.{hint} Every key: python pipeline.py --config "
                            f"NAME --print-config.")
        if any(k.key == key for k in keys):
            raise UserError(f"--grid {key} is given twice; give each key once with all its values (KEY=V1,V2,V3).")
        if key in opt_keys:
            raise UserError(f"--grid {key} is also set by --opts; a key is either swept (--grid) or fixed (--opts).")
        values = _split_values(raw)
        if any(not v for v in values):
            raise UserError(f"--grid {item}: an empty value; write the values separated by commas, e.g. {key}=0.001,0.01.")
        if len(values) < 2:
            raise UserError(f"--grid {item}: one value is no sweep. Give two or more values ({key}=V1,V2), or fix the "
                            f"key with --opts {key}={values[0]}.")
        resolved = []
        for value in values:
            parse_opts([f"{key}={value}"])  # its YAML syntax, with the phases' own message
            got = [get_dotted(load_config(sources[phase], phase, [f"{key}={value}"]), key) for phase in phases]
            resolved.append(json.dumps(got, sort_keys=True, default=str))
        if len(set(resolved)) < len(resolved):
            twice = [v for v, r in zip(values, resolved) if resolved.count(r) > 1]
            raise UserError(f"--grid {key}: the values {', '.join(twice)} are the same setting; give each value once.")
        keys.append(GridKey(key, tuple(values), tuple(phases)))
    leaves = [k.key.rsplit(".", 1)[-1] for k in keys]
    return [replace(k, label=leaf if leaves.count(leaf) == 1 else k.key) for k, leaf in zip(keys, leaves)]


def applies(method: Method, key: GridKey) -> bool:
    """Whether runs of ``method`` (on the CE backbone) read grid key ``key``: a phase I method reads phase I
    keys only; a phase III method reads every phase I / II key (through its backbone) and the phase III keys
    shared by all, and of the method sections only its own (``PhaseIIIMethod.reads``): a key of another
    method's section collapses for it."""
    if isinstance(method, PhaseIMethod):
        return "phase_i" in key.phases
    if key.upstream:
        return True
    section = key.key.split(".", 1)[0]
    return method.reads(section) or section not in {s.name for s in METHODS.sections()}


def reading_methods(key: GridKey) -> str:
    return ", ".join(m.id for m in METHODS if applies(m, key)) or "none"


# ------------------------------------------------------------------------------------------------
# Points and notes
# ------------------------------------------------------------------------------------------------
Point = tuple[tuple[str, str], ...]  # ((key, value as typed), ...) in grid order

_VALUE_CHARS = re.compile(r"[A-Za-z0-9.-]+")
POINT_ID_LENGTH = 60  # characters of a readable point id before it is shortened to a prefix and a hash


def digest(data: object, length: int = 8) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]


def point_text(point: Point) -> str:
    return ", ".join(f"{k}={v}" for k, v in point) or "(no grid key applies)"


@dataclass
class Notes:
    """The notes of a sweep: the base note of each seed, and each point's (over the keys that apply)."""

    note: str | None
    seeds: list[int] | None
    labels: dict[str, str]

    def seed_keys(self) -> list[int | None]:
        return list(self.seeds) if self.seeds else [None]

    @staticmethod
    def pair_key(seed: int | None) -> str:
        """The name of a seed in per-seed tables and paired differences."""
        return "default" if seed is None else f"seed{seed}"

    def base(self, seed: int | None) -> str:
        """The pipeline's note of a seed: ``seedN`` (``NOTE-seedN``), or ``NOTE`` / ``default`` without seeds."""
        if seed is None:
            return check_run_name(self.note or "default", "--note")
        return check_run_name(f"{self.note}-seed{seed}" if self.note else f"seed{seed}", "--note")

    def point_id(self, point: Point) -> str:
        """``lr0.001_iterations200``: each key's label and value; a value with other characters than letters,
        digits, '.' and '-', or an id past POINT_ID_LENGTH characters, gets a hash of the point."""
        parts, exact = [], True
        for key, value in point:
            clean = "-".join(_VALUE_CHARS.findall(value)).strip(".-") or "x"
            exact = exact and clean == value
            parts.append(f"{self.labels[key]}{clean}")
        text = "_".join(parts)
        if exact and len(text) <= POINT_ID_LENGTH:
            return text
        return f"{text[:POINT_ID_LENGTH - 9].rstrip('._-')}-{digest(point)}"

    def of(self, point: Point, seed: int | None) -> str:
        """The note of a point's runs for one seed (the base note for the empty point)."""
        if not point:
            return self.base(seed)
        core = f"{self.note}-sweep-{self.point_id(point)}" if self.note else f"sweep-{self.point_id(point)}"
        return check_run_name(core if seed is None else f"{core}-seed{seed}", "a sweep point's note")


def restrict(point: Point, keys: set[str]) -> Point:
    return tuple((k, v) for k, v in point if k in keys)
