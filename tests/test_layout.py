"""The package layering of docs/ARCHITECTURE.md, read from the imports (no imports run): scripts -> app ->
analysis -> engine -> fsa / models / datasets -> utils, counting the imports inside functions and under
TYPE_CHECKING too (a deferred or type-only import still ties the modules together); no import cycle between
modules (importing a module also imports its parent packages) nor between packages."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("utils", "datasets", "models", "fsa", "engine", "analysis", "app")
# what each package may import (besides itself)
ALLOWED = {
    "utils": set(),
    "models": {"utils"},
    "datasets": {"utils"},
    "fsa": {"utils", "models", "datasets"},
    "engine": {"utils", "models", "datasets", "fsa"},
    "analysis": {"utils", "engine"},
    "app": {"utils", "models", "datasets", "fsa", "engine", "analysis"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, *, inside_functions: bool = True) -> set[str]:
    """Project modules `path` imports: at module level, and with `inside_functions` anywhere (inside functions,
    classes and `if TYPE_CHECKING:` blocks)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in (ast.walk(tree) if inside_functions else tree.body):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.module in PACKAGES:  # from utils import distributed
                names += [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def project_modules(*, inside_functions: bool = True) -> dict[str, set[str]]:
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        own_packages = _packages_of(name)
        graph[name] = {m for imported in imported_modules(path, inside_functions=inside_functions)
                       for m in _packages_of(imported) | {imported} if m in modules} - own_packages - {name}
    return graph


def _packages_of(module: str) -> set[str]:
    """The packages above `module` (importing it runs their __init__ first)."""
    parts = module.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts))}


def package_graph(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """package -> the other packages its modules import."""
    graph = {package: set() for package in PACKAGES}
    for name, deps in modules.items():
        graph[name.split(".")[0]] |= {d.split(".")[0] for d in deps} - {name.split(".")[0]}
    return graph


def test_packages_import_only_the_layers_below_them():
    """Module-level imports and those inside functions alike."""
    wrong = [f"{name} imports {dep}" for name, deps in project_modules().items() for dep in deps
             if dep.split(".")[0] != name.split(".")[0] and dep.split(".")[0] not in ALLOWED[name.split(".")[0]]]
    assert not wrong, wrong


def test_engine_imports_neither_the_report_nor_the_app():
    graph = package_graph(project_modules())
    assert not graph["engine"] & {"analysis", "app"} and not graph["analysis"] & {"app"}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, trail: list[str]) -> list[str] | None:
        if state.get(node) == 1:
            return trail[trail.index(node):] + [node]
        if state.get(node) == 2:
            return None
        state[node] = 1
        for dep in sorted(graph[node]):
            if cycle := visit(dep, trail + [node]):
                return cycle
        state[node] = 2
        return None

    return next((c for node in sorted(graph) if (c := visit(node, []))), None)


def test_no_import_cycle():
    """No cycle of modules, counting the imports inside functions too (a deferred import only hides a cycle),
    and none of packages (a package circle that no single pair of modules shows)."""
    modules = project_modules()
    for graph in (modules, package_graph(modules)):
        if cycle := _find_cycle(graph):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_a_cycle(monkeypatch):
    """The cycle check is not vacuous: the old engine.phase_iii <-> phase_iii_features pair is caught."""
    graph = project_modules()
    graph["engine.phase_iii"] = graph["engine.phase_iii"] | {"engine.phase_iii_features"}
    monkeypatch.setitem(globals(), "project_modules", lambda **_: graph)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()


def test_the_checkers_see_a_deferred_import_and_a_package_circle(tmp_path):
    """An import inside a function or under TYPE_CHECKING counts, and a circle of packages is a cycle even when
    no two modules import each other."""
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from analysis.rows import Row\n"
                      "def f():\n    from analysis import report\n")
    assert imported_modules(source) == {"analysis", "analysis.report", "analysis.rows"}
    assert _find_cycle(package_graph({"engine.a": {"analysis.b"}, "analysis.b": {"engine.c"}, "engine.c": set()}))


def test_every_output_folder_is_ignored_by_git():
    """Each folder a run writes (every phase's of every method and backbone, reports, visualizations) is
    in .gitignore, so that `git add -A` after a run never commits checkpoints or feature stores."""
    import shutil
    import subprocess

    from engine.methods import METHODS
    from utils.layout import RunPaths

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    phases = {arm.folder for arm in METHODS.arms()} | {m.phase_ii_folder for m in METHODS.backbones()}
    paths = {str(folder.relative_to(ROOT) / "x") for phase in phases
             for folder in RunPaths(phase, "cfg", "note", ROOT).folders}
    paths |= {"reports/cfg/ablation.md", "visualizations/cfg/note/x.png"}
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *sorted(paths)], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert sorted(paths - set(ignored)) == []


def test_no_code_outside_the_method_table_dispatches_on_a_method_id():
    """Runners, the report, the pipeline and the sweep ask a method (its class and fields), never compare its id:
    a new method is then one file and one registration (docs/ARCHITECTURE.md, "The method table")."""
    import re

    comparison = re.compile(r"\.id\s*(==|!=|(not\s+)?in\b)|(==|!=)\s*\w+(\.\w+)*\.id\b|\.kind\s*==\s*\"(maps|features|decoupled)\"")
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for package in PACKAGES for path in (ROOT / package).rglob("*.py")
             if path.parent.name != "methods" and path.name != "method_table.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if comparison.search(line)]
    assert not found, found
