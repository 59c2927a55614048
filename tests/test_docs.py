"""The documents that are generated or cited stay true: docs/CONFIG.md matches the schema, the README
stays a short front door, and every repository file a doc or docstring cites exists."""
import re
from pathlib import Path

from tests.helpers import REPO
from utils.config_doc import DOC, render
from utils.schema import SCHEMAS, schema_fields


def test_config_reference_is_generated_from_the_current_schema():
    assert DOC.read_text() == render(), "docs/CONFIG.md is stale: run python -m utils.config_doc"
    text = DOC.read_text()
    for phase in SCHEMAS:
        for key in schema_fields(phase):
            assert f"| `{key}` |" in text, key


def test_readme_is_short_and_has_a_contents_list():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, len(lines)
    assert any(line.startswith("## Contents") for line in lines)


def test_cited_documents_exist():
    """Markdown links between the docs, and `docs/...md` named in code, point at files of this repository."""
    cited: set[tuple[Path, str]] = set()
    for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", md.read_text()):
            cited.add((md.parent, target))
    for py in REPO.rglob("*.py"):
        if ".git" in py.parts:
            continue
        for target in re.findall(r"\b(docs/[A-Z_]+\.md)\b", py.read_text()):
            cited.add((REPO, target))
        assert "DESIGN.md" not in py.read_text() or py.name == "test_docs.py", f"{py} cites a DESIGN.md outside the repository"
    missing = sorted(f"{base}/{target}" for base, target in cited if not (base / target).is_file())
    assert not missing, missing
