"""The shape of the package: no import circles, and the HTTP face reads the node without importing the agent.

The graph is read from the source (ast), so an import inside a function or under ``TYPE_CHECKING`` counts as
much as one at the top: a circle held together by function-local imports is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "node_agent"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its source, parent packages included (importing
    ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.add(source)
            # ``from . import x`` and ``from .pkg import mod`` import modules, not only names.
            targets.update(f"{source}.{alias.name}" for alias in node.names)
    found: set[str] = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in known and candidate != name and not name.startswith(candidate + "."):
                found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path (first module repeated at the end), or None."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if color.get(nxt, black) == grey:
                return stack[stack.index(nxt):] + [nxt]
            if color.get(nxt) == white and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        color[node] = black
        return None

    for start in sorted(graph):
        if color[start] == white and (cycle := visit(start)):
            return cycle
    return None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert {"node_agent.agent", "node_agent.job_runner", "node_agent.node_view"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", ["node_agent.http_api", "node_agent.compat", "node_agent.node_view",
                                    "node_agent.job_runner", "node_agent.job_loop", "node_agent.registration"])
def test_the_parts_do_not_import_the_composition_root(module):
    assert "node_agent.agent" not in import_graph()[module]


def test_the_walk_sees_imports_inside_functions_and_type_checking(tmp_path):
    # The detector itself: a circle made only of a function-local import and a TYPE_CHECKING one is found.
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    (pkg / "c.py").write_text("import node_agent.b\n")
    mods = {"node_agent": pkg / "__init__.py", "node_agent.a": pkg / "a.py", "node_agent.b": pkg / "b.py",
            "node_agent.c": pkg / "c.py"}
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    # A module's own parent packages are already being imported when it runs: not an edge.
    assert graph["node_agent.a"] == {"node_agent.b"} and graph["node_agent.c"] == {"node_agent.b"}
    assert find_cycle(graph) == ["node_agent.a", "node_agent.b", "node_agent.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_the_client_loads_no_scheduler_server_code():
    # The agent's client reads the scheduler's wire shapes (scheduler.schemas) and nothing else of it: no HTTP
    # server, no store, no database engine in an agent that only talks to a scheduler.
    import subprocess
    import sys

    code = ("import sys, node_agent.scheduler_client; "
            "print(sorted(m for m in sys.modules if m.startswith('node_agent.scheduler')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent).stdout
    loaded = set(ast.literal_eval(out))
    for server_side in ("node_agent.scheduler.server", "node_agent.scheduler.sqlstore", "node_agent.scheduler.db"):
        assert server_side not in loaded, sorted(loaded)
    assert "node_agent.scheduler.schemas" in loaded
