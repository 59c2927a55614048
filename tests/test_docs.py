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


def python_sources() -> list[Path]:
    return [py for py in sorted(REPO.rglob("*.py")) if ".git" not in py.parts]


def test_cited_documents_exist():
    """Markdown links between the docs, and the documents named in code (`docs/USAGE.md`, or a bare
    `README.md` / `CONFIG.md`: the repository's root or docs/), are files of this repository."""
    cited: set[tuple[Path, str]] = set()
    for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", md.read_text()):
            cited.add((md.parent, target))
    unknown: list[str] = []
    for py in python_sources():
        text = py.read_text()
        for target in re.findall(r"\b(docs/[A-Z_]+\.md)\b", text):
            cited.add((REPO, target))
        for name in re.findall(r"(?<![\w/])([A-Z_]+\.md)\b", text):
            if not any((folder / name).is_file() for folder in (REPO, REPO / "docs")):
                unknown.append(f"{py.relative_to(REPO)}: {name}")
    missing = sorted(f"{base}/{target}" for base, target in cited if not (base / target).is_file())
    assert not missing, missing
    assert not unknown, f"documents that are not in the repository: {unknown}"


def method_items() -> dict[int, set[int]]:
    """docs/METHOD.md's sections (``## N. Title``) and the numbers of each one's items (``M. **Name.**``)."""
    items: dict[int, set[int]] = {}
    section = None
    for line in (REPO / "docs" / "METHOD.md").read_text().splitlines():
        if heading := re.match(r"## (\d+)\. ", line):
            section = int(heading.group(1))
            items[section] = set()
        elif section is not None and (item := re.match(r"(\d+)\. \*\*", line)):
            items[section].add(int(item.group(1)))
    return items


def test_method_citations_resolve():
    """Every ``METHOD.md N.M`` (item M of section N) and ``METHOD.md section N`` in the code exists."""
    items = method_items()
    assert items.get(2) == set(range(1, 8)), items  # the parser reads the FSA definitions
    dangling = []
    for py in python_sources():
        for cited in re.finditer(r"METHOD\.md\s+(?:section\s+)?(\d+)(?:\.(\d+))?", py.read_text()):
            section, item = int(cited.group(1)), cited.group(2)
            if section not in items or (item is not None and int(item) not in items[section]):
                dangling.append(f"{py.relative_to(REPO)}: {cited.group(0)}")
    assert not dangling, dangling
