"""docs/CONFIG.md, the config reference, generated from the schema (`utils.schema`): every key of every
phase with its type, default and allowed values (choices or range). The schema is the one source; a test
fails when the file is stale.

    python -m utils.config_doc           # rewrite docs/CONFIG.md
    python -m utils.config_doc --check   # exit 1 if docs/CONFIG.md differs from the schema
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.fields import Field
from utils.schema import SCHEMAS, schema_fields

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"
_TITLES = {"phase_i": "Phase I (`configs/phase_i/NAME.yaml`)",
           "phase_ii": "Phase II (`configs/phase_ii/NAME.yaml`, optional)",
           "phase_iii": "Phase III (`configs/phase_iii/NAME.yaml`, optional)"}
_TYPES = {bool: "bool", int: "int", float: "float", str: "str", list: "list"}


def _type(field: Field) -> str:
    kinds = " or ".join(_TYPES.get(t, t.__name__) for t in field.types)
    if field.item_type is not None:
        kinds = f"list of {_TYPES[field.item_type]}"
    return kinds + (" or null" if field.nullable else "")


def _allowed(field: Field) -> str:
    parts = []
    choices = field.allowed()
    if choices is not None:
        parts.append(", ".join(f"`{c}`" for c in choices))
    if field.range is not None:
        parts.append(("each " if field.item_type is not None else "") + field.range.text().replace("in ", ""))
    if float in field.types or field.item_type is float:
        parts.append("finite")
    if field.hint:
        parts.append(field.hint)
    return "; ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The whole of docs/CONFIG.md."""
    out = [
        "# Config reference",
        "",
        "Generated from `utils/schema.py` by `python -m utils.config_doc`; do not edit by hand (a test fails",
        "when this file and the schema disagree). Phase III's method sections (`decoupled`, `fusion`,",
        "`tailcalib`) are declared by their methods in `engine/methods/`. A config file states only what differs from these defaults,",
        "may start with `inherit: NAME`, and any key can be set on the command line with",
        "`--opts key.sub=value`. Phase II and III configs hold only their own settings: dataset and model",
        "come from the phase I run. Every number is checked against its range before anything runs; NaN and",
        "infinity are never accepted. What the settings mean: [USAGE.md](USAGE.md), [DATA.md](DATA.md).",
        "",
    ]
    for phase in SCHEMAS:
        out += [f"## {_TITLES[phase]}", "", "| key | type | default | allowed |", "|---|---|---|---|"]
        for key, field in schema_fields(phase).items():
            default = "null" if field.default is None else repr(field.default).replace("'", "")
            out.append(f"| `{key}` | {_type(field)} | `{_cell(default)}` | {_cell(_allowed(field))} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/CONFIG.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python -m utils.config_doc", file=sys.stderr)
            sys.exit(1)
        return
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
