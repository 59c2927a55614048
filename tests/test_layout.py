"""The package layering of docs/ARCHITECTURE.md, read from the module-level imports (no imports run):
scripts -> analysis -> engine -> fsa / models / datasets -> utils, and no import cycle."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("utils", "datasets", "models", "fsa", "engine", "analysis")
# what each package may import at module level (besides itself)
ALLOWED = {
    "utils": set(),
    "models": {"utils"},
    "datasets": {"utils"},
    "fsa": {"utils", "models", "datasets"},
    "engine": {"utils", "models", "datasets", "fsa"},
    "analysis": {"utils", "engine"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, *, inside_functions: bool = False) -> set[str]:
    """Project modules imported at module level (not under TYPE_CHECKING), and with `inside_functions`
    also those imported inside functions (deferred imports still tie the modules together)."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in (ast.walk(tree) if inside_functions else tree.body):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ([node] if isinstance(node, (ast.Import, ast.ImportFrom)) else []):
            names = [a.name for a in sub.names] if isinstance(sub, ast.Import) else [sub.module or ""]
            if isinstance(sub, ast.ImportFrom) and sub.module in PACKAGES:  # from utils import distributed
                names += [f"{sub.module}.{a.name}" for a in sub.names]
            found |= {n for n in names if n.split(".")[0] in PACKAGES}
    return found


def project_modules(*, inside_functions: bool = False) -> dict[str, set[str]]:
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in top_level_imports(path, inside_functions=inside_functions)
                       if m in modules and m != name}
    return graph


def test_packages_import_only_the_layers_below_them():
    wrong = [f"{name} imports {dep}" for name, deps in project_modules().items() for dep in deps
             if dep.split(".")[0] != name.split(".")[0] and dep.split(".")[0] not in ALLOWED[name.split(".")[0]]]
    assert not wrong, wrong


def test_no_import_cycle():
    """No cycle, counting the imports inside functions too (a deferred import only hides a cycle)."""
    graph = project_modules(inside_functions=True)
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            pytest.fail("import cycle: " + " -> ".join(trail[trail.index(node):] + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(graph[node]):
            visit(dep, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_the_checker_sees_a_cycle(monkeypatch):
    """The cycle check is not vacuous: the old engine.phase_iii <-> phase_iii_features pair is caught."""
    graph = project_modules(inside_functions=True)
    graph["engine.phase_iii"] = graph["engine.phase_iii"] | {"engine.phase_iii_features"}
    monkeypatch.setitem(globals(), "project_modules", lambda **_: graph)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()


def test_every_output_folder_is_ignored_by_git():
    """Each folder a run writes (every phase's of every method and backbone, reports, visualizations) is
    in .gitignore, so that `git add -A` after a run never commits checkpoints or feature stores."""
    import shutil
    import subprocess

    from engine.methods import METHODS, phase_ii_folder
    from utils.run_dir import RunPaths

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    phases = {arm.folder for arm in METHODS.arms()} | {phase_ii_folder(m) for m in METHODS.stage("phase_i")}
    paths = {str(folder.relative_to(ROOT) / "x") for phase in phases
             for folder in RunPaths(phase, "cfg", "note", ROOT).folders}
    paths |= {"reports/cfg/ablation.md", "visualizations/cfg/note/x.png"}
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *sorted(paths)], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert sorted(paths - set(ignored)) == []
