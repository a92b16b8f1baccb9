"""The package's shape stays as DESIGN.md says: no import circle (type-only and function-level
imports count: a back-reference is a dependency that runs upward), config (a package of schema modules) and dist.py
import nothing else from the package, and no module grows past what one reader holds in mind."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "launcher"
MAX_LINES = 360


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every package module `name` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "launcher" or target.startswith("launcher.")):
                continue
            for alias in node.names:  # `from . import x` names a module; `from .x import f` names x
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    found.discard(name)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as a list of modules (first == last), or []."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if n == "launcher":  # the package itself: its __init__ imports lazily, by attribute
                continue
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_the_graph_is_read_from_the_code() -> None:
    graph = _graph()
    # spot checks that the parser sees relative, nested and function-level imports
    assert "launcher.checkpoint.format" in graph["launcher.checkpoint.manager"]
    assert "launcher.config" in graph["launcher.checkpoint.manager"]
    assert "launcher.launch.worker" in graph["launcher.launch.local"]
    assert "launcher.trainer" in graph["launcher"]  # the lazy __getattr__ import
    assert "launcher.rundir.files" in graph["launcher.cli.checks"]  # a function-level import


def test_a_circle_is_found_when_there_is_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package() -> None:
    circle = _cycle(_graph())
    assert not circle, "import circle: " + " -> ".join(circle)


@pytest.mark.parametrize("leaf", ["launcher.config", "launcher.device.dist"])
def test_leaves_import_nothing_from_the_package(leaf: str) -> None:
    """A leaf may be a package (config: its schema modules); nothing it imports lies outside it."""
    graph = _graph()
    inside = {m for m in graph if m == leaf or m.startswith(f"{leaf}.")}
    assert inside and all(graph[m] <= inside for m in inside), {m: graph[m] - inside for m in inside}


def test_no_module_is_too_long() -> None:
    long = {name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_top_level_holds_the_entries_and_folders_only() -> None:
    """Everything but the public API (Trainer), the commands (__main__, export) lives in a folder of
    its concern (docs/ARCHITECTURE.md): a module dropped at the top fails here."""
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "export.py", "trainer.py"], top
    folders = sorted(p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == ["checkpoint", "cli", "conf", "config", "device", "fit", "launch", "observe", "recipes",
                       "rundir"], folders
