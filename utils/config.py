"""YAML configs: one file per (phase, experiment), inheritance, `--opts` overrides, strict schema.

A config file may start with `inherit: <name>` (another config of the same phase, or a path) so
that e.g. the imbalance-10/50/200 variants are a few lines each. The merged result is checked
against the phase's schema (`utils.schema`): unknown keys and wrong types are errors naming the
key, a key that moved (`utils.schema.MOVED_KEYS`) is an error naming its new place, and the defaults
fill in everything the file leaves out. Phase II and III configs are optional: for a config NAME
without configs/<phase>/NAME.yaml those phases run with the defaults (and --opts), so a config
name needs a phase II / III file only where it changes a setting.
"""
from __future__ import annotations

import copy
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml

from utils.distributed import first_process
from utils.errors import UserError
from utils.layout import check_run_name
from utils.fields import Field
from utils.schema import MOVED_KEYS, SCHEMAS, fit_schedule, validate_values

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_ROOT = REPO_ROOT / "configs"
CONFIG_PHASES = ("phase_i", "phase_ii", "phase_iii")  # the folders under configs/
OPTIONAL_CONFIG_PHASES = ("phase_ii", "phase_iii")  # a NAME without a file there means the defaults


def available_configs(phase: str) -> list[str]:
    """Names of the shipped configs of a phase (file stems under configs/<phase>/)."""
    return sorted(p.stem for p in (CONFIG_ROOT / phase).glob("*.yaml"))


def resolve_config_path(name_or_path: str, phase: str) -> Path:
    """`NAME` -> configs/<phase>/NAME.yaml; anything that names an existing file is used as is."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate.resolve()
    shipped = CONFIG_ROOT / phase / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(available_configs(phase)) or "(none)"
    raise UserError(
        f"Unknown config '{name_or_path}' for {phase}: there is no file configs/{phase}/"
        f"{name_or_path}.yaml and no YAML file at that path. Available {phase} configs: {names}."
    )


def config_path(name_or_path: str, phase: str) -> Path | None:
    """The file `load_config` reads: as `resolve_config_path`, but None for a NAME (not a path) of an
    optional phase that has no configs/<phase>/NAME.yaml, i.e. that phase runs with the defaults."""
    if (phase in OPTIONAL_CONFIG_PHASES and not name_or_path.endswith((".yaml", ".yml"))
            and not (CONFIG_ROOT / phase / f"{name_or_path}.yaml").is_file()):
        return None
    return resolve_config_path(name_or_path, phase)


def config_name(name_or_path: str) -> str:
    """The name a run is filed under: the config's file stem (checked to be a safe folder name)."""
    if name_or_path.endswith((".yaml", ".yml")):
        stem = Path(name_or_path).stem
        try:
            return check_run_name(stem, "the config name")
        except UserError as exc:
            raise UserError(f"The config file {name_or_path} files its runs under its name '{stem}', which cannot "
                            f"name a folder: rename the file to letters, digits, '_', '-' and '.' "
                            f"(e.g. my-experiment.yaml).") from exc
    return check_run_name(name_or_path, "--config")


# A config is a few dozen keys: these bounds only stop hostile or broken files (a YAML "billion laughs"
# expands aliases exponentially; deep nesting exhausts the recursion of PyYAML's composer).
MAX_CONFIG_BYTES = 1 << 20
MAX_NESTING = 32
MAX_INHERIT_DEPTH = 16


def _check_yaml_events(text: str, source: str) -> None:
    """Refuse anchors / aliases and nesting deeper than `MAX_NESTING`, from PyYAML's event stream (its
    parser is iterative, so this check cannot itself run out of stack or memory)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise UserError(f"{source} uses a YAML anchor or alias ('&name' / '*name'), which configs do not take: "
                            f"they can expand a small file into gigabytes. Write the values out, or share settings with "
                            f"'inherit: <config>'.")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_NESTING:
                raise UserError(f"{source} nests lists / mappings more than {MAX_NESTING} levels deep; a config is a "
                                f"few sections of plain values. Fix the file (look for unclosed '[' or '{{').")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def safe_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load` of a config text (a file or an --opts value) after the checks above; a UserError
    naming `source` and the position for a syntax error."""
    try:
        _check_yaml_events(text, source)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(
            f"YAML syntax error in {source} at {where}: {problem}. Fix the file (check indentation "
            f"and the 'key: value' form) and run again."
        ) from exc


def read_yaml(path: Path) -> dict:
    """The mapping a YAML config file holds (empty file: {}); a UserError for a file that cannot be
    read, is too large, is not UTF-8 text, is unsafe or malformed YAML, or is not a mapping."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UserError(f"Config file {path} is {path.stat().st_size} bytes; a config is a few KB (limit "
                            f"{MAX_CONFIG_BYTES} bytes). Check that --config names the right file.")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserError(f"Cannot read config file {path}: {exc.strerror or exc}.") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"Config file {path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}). "
                        f"Save it as UTF-8, or check that --config names a YAML file.") from exc
    data = safe_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"Config file {path} must hold a mapping of keys to values, not {type(data).__name__}.")
    return data


def deep_merge(base: dict, override: dict) -> dict:
    """`override` wins; nested mappings are merged key by key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_with_inheritance(path: Path, phase: str, chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()  # './a.yaml' inherited from a.yaml is a.yaml: a cycle, not an ever-longer path
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise UserError(f"Config inheritance cycle: {cycle}. Remove one of the 'inherit:' lines.")
    if len(chain) >= MAX_INHERIT_DEPTH:
        raise UserError(f"Config {chain[0]} inherits through more than {MAX_INHERIT_DEPTH} files "
                        f"({' -> '.join(p.name for p in chain[:4])} -> ...). Shorten the 'inherit:' chain.")
    data = read_yaml(path)
    _refuse_moved_keys(data, phase, str(path))
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"'inherit' in {path} must be a config name or path, got {parent!r}.")
    parent_path = (path.parent / parent) if parent.endswith((".yaml", ".yml")) else resolve_config_path(parent, phase)
    return deep_merge(_load_with_inheritance(parent_path, phase, (*chain, path)), data)


def _sets(values: dict, dotted: str) -> bool:
    """Whether the nested `values` hold the dotted key (with any value, null included)."""
    node: Any = values
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _refuse_moved_keys(values: dict, phase: str, source: str) -> None:
    """A key that left the phase's schema is an error that says where the setting lives now."""
    for (moved_phase, dotted), new_place in MOVED_KEYS.items():
        if moved_phase == phase and _sets(values, dotted):
            raise UserError(f"{dotted} moved: {new_place}. Remove it from {source}.")


def parse_opts(opts: list[str] | None) -> dict:
    """`["train.lr=0.01", "model.arch=resnet20"]` -> nested dict (values parsed as YAML scalars)."""
    result: dict = {}
    for item in opts or []:
        if "=" not in item:
            raise UserError(f"--opts entry '{item}' is not of the form key.sub=value (e.g. train.lr=0.01).")
        dotted, raw = item.split("=", 1)
        try:
            value = safe_yaml(raw, f"the --opts value of '{dotted}'") if raw != "" else None
        except UserError as exc:
            raise UserError(f"--opts value for '{dotted}' is not a valid YAML value: {raw[:80]!r}. {exc}") from exc
        node = result
        keys = dotted.strip().split(".")
        if any(not k for k in keys):
            raise UserError(f"--opts key '{dotted}' is malformed (empty part between dots).")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise UserError(f"--opts sets both '{key}' and a key below it.")
        node[keys[-1]] = value
    return result


def _dotted(schema: dict, prefix: str = "") -> list[str]:
    """Every key of a schema, dotted, sections included (``train``, ``train.lr``, ...)."""
    out: list[str] = []
    for key, spec in schema.items():
        out.append(f"{prefix}{key}")
        if isinstance(spec, dict):
            out += _dotted(spec, f"{prefix}{key}.")
    return out


def close_keys(dotted: str, keys: list[str], cutoff: float = 0.75) -> list[str]:
    """The keys of `keys` a mistyped dotted key most likely meant, best first (at most 3): by the whole
    path (``train.lrr`` -> ``train.lr``) or by its last part, wherever it lives (``lr`` -> ``train.lr``)."""
    leaf = dotted.rsplit(".", 1)[-1]

    def score(key: str) -> float:
        return max(difflib.SequenceMatcher(None, dotted, key).ratio(),
                   difflib.SequenceMatcher(None, leaf, key.rsplit(".", 1)[-1]).ratio())

    # not the sections the key is in (dataset.synthetic for dataset.synthetic.size); stable: schema order breaks ties
    scored = sorted(((score(k), k) for k in keys if not dotted.startswith(f"{k}.")), key=lambda pair: -pair[0])
    best = scored[0][0] if scored else 0.0
    # only the best matches: a close second guess helps, a list of every '*.lr' under 'train.lrr' does not
    return [key for value, key in scored if value >= max(cutoff, best - 0.05)][:3]


def did_you_mean(keys: list[str]) -> str:
    """`` Did you mean 'a'?`` (or 'a', 'b' or 'c') for the keys of `close_keys`; "" for none."""
    if not keys:
        return ""
    quoted = [f"'{k}'" for k in keys]
    return f" Did you mean {quoted[0] if len(quoted) == 1 else ', '.join(quoted[:-1]) + ' or ' + quoted[-1]}?"


def apply_schema(values: dict, schema: dict, prefix: str = "", *, whole: dict | None = None) -> dict:
    """Fill defaults, reject unknown keys, check types. Returns a new, complete dict. `whole`: the phase's
    schema that `schema` is a section of (for the keys an unknown key may have meant; default `schema`)."""
    whole = schema if whole is None else whole
    out: dict = {}
    for key in values:
        if key not in schema:
            where = f"section '{prefix[:-1]}'" if prefix else "the top level"
            known = ", ".join(sorted(schema))
            guess = did_you_mean(close_keys(f"{prefix}{key}", _dotted(whole)))
            raise UserError(f"Unknown config key '{prefix}{key}' in {where}.{guess} Valid keys there: {known}.")
    for key, spec in schema.items():
        path = f"{prefix}{key}"
        if isinstance(spec, dict):
            given = values.get(key, {})
            if given is None:
                given = {}
            if not isinstance(given, dict):
                raise UserError(f"Config key '{path}' must be a section (a mapping), got {given!r}.")
            out[key] = apply_schema(given, spec, prefix=f"{path}.", whole=whole)
        else:
            assert isinstance(spec, Field)
            out[key] = spec.coerce(values[key], path) if key in values else copy.deepcopy(spec.default)
    return out


def load_config(name_or_path: str, phase: str, opts: list[str] | None = None, *, saved: bool = False) -> dict:
    """Read, inherit, override, validate; a phase II / III NAME without a file is the defaults + `opts`
    (`config_path`). Raises UserError for every user mistake.

    A request for a run has its phase I decay epochs fitted to train.epochs (`utils.schema.fit_schedule`:
    defaults scaled, said once on stderr; stated ones that are never reached refused). `saved`: the
    config.yaml a run wrote, read as it ran (it states every key, so nothing would be scaled; a run made
    before the rule may hold milestones past its epochs, which must not make it unreadable)."""
    if phase not in SCHEMAS:
        raise ValueError(f"unknown phase {phase}")
    path = config_path(name_or_path, phase)
    raw = {} if path is None else _load_with_inheritance(path, phase)
    overrides = parse_opts(opts)
    _refuse_moved_keys(overrides, phase, "--opts")
    given = deep_merge(raw, overrides)
    cfg = apply_schema(given, SCHEMAS[phase])
    validate_values(cfg, phase)
    if phase == "phase_i" and not saved:
        _say_once(fit_schedule(cfg, lambda dotted: _sets(given, dotted)))
    return cfg


_SAID: set[str] = set()


def _say_once(note: str | None) -> None:
    """A note about a loaded config, on stderr once per process (the pipeline loads a config many times),
    by the first process of a torchrun job only."""
    if note and note not in _SAID and first_process():
        _SAID.add(note)
        print(f"note: {note}", file=sys.stderr)


def config_text(cfg: dict) -> str:
    """A resolved config as the YAML a run saves (config.yaml) and --print-config prints."""
    return yaml.safe_dump(cfg, sort_keys=False)


def dump_config(cfg: dict, path: Path) -> None:
    path.write_text(config_text(cfg))


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    keys = sorted(set(a) | set(b))
    diffs: list[str] = []
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            diffs.append(f"{prefix}{key}")
    return diffs


def get_dotted(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        node = node[key]
    return node
