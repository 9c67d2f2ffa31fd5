"""The package's structure: no import cycle, and per-app state and exporters as leaves.

An edge is an import statement of one ``celery_resilience`` module by another, read
with ``ast``. The structure is what a module imports when it is imported: top-level
statements (inside a top-level ``try`` or ``if`` too), but not ``if TYPE_CHECKING:``
blocks, which never run, nor imports inside functions, which are deliberate lazy
imports (an optional extra, the built-in plugins loaded on first use). The implicit
import of a parent package is no edge either: every submodule import runs
``celery_resilience/__init__.py``, so a package that re-exports would always be in a
cycle. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else
to ``pkg``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "celery_resilience"

# What assembles a worker: its boot steps and their install().
WIRING = {"celery_resilience.worker", "celery_resilience.heartbeat"}
EXPORTERS = {
    "celery_resilience.exporters",
    "celery_resilience.exporters.otel",
    "celery_resilience.exporters.prometheus",
    "celery_resilience.exporters.prometheus_server",
}
# Leaves: what each may not import, even inside a function. The exporters are plugins
# on the observer hooks, so they need no per-app runtime and no plugin manager.
FORBIDDEN = {
    "celery_resilience.runtime": WIRING,
    **dict.fromkeys(EXPORTERS, WIRING | {"celery_resilience.runtime", "celery_resilience.plugins"}),
}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(body: list[ast.stmt], *, lazy: bool) -> Iterator[ast.stmt]:
    """The statements run at import (with ``lazy``, also those in functions and classes)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            if not _is_type_checking(node):
                yield from _statements(node.body + node.orelse, lazy=lazy)
        elif isinstance(node, ast.Try):
            handlers = [stmt for handler in node.handlers for stmt in handler.body]
            yield from _statements(node.body + handlers + node.orelse + node.finalbody, lazy=lazy)
        elif isinstance(node, (ast.With, ast.For, ast.While)) or (
            lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        ):
            yield from _statements(node.body, lazy=lazy)


def _imports(name: str, path: Path, modules: Mapping[str, Path], *, lazy: bool) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _statements(ast.parse(path.read_text()).body, lazy=lazy):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def import_graph(*, lazy: bool = False) -> dict[str, set[str]]:
    """Module name -> the package modules it imports."""
    modules = _modules()
    return {name: _imports(name, path, modules, lazy=lazy) for name, path in modules.items()}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    done: set[str] = set()
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in stack:
            return [*stack[stack.index(module) :], module]
        if module in done:
            return None
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            if cycle := visit(imported):
                return cycle
        stack.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return None


def test_cycle_finder_reports_a_cycle() -> None:
    """The check below can fail: a three-module loop is found and printed in order."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_the_package_imports() -> None:
    """The graph is read from the real files: the worker imports the runtime."""
    graph = import_graph()
    assert "celery_resilience.runtime" in graph["celery_resilience.worker"]
    assert "celery_resilience.exporters" in graph["celery_resilience.exporters.prometheus"]


def test_package_has_no_import_cycle() -> None:
    """No module of the package imports, at import time, a module that imports it back."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_runtime_and_exporters_do_not_import_the_worker_wiring() -> None:
    """Per-app state and the exporters never import the worker's wiring, even lazily."""
    graph = import_graph(lazy=True)
    assert FORBIDDEN.keys() <= graph.keys()
    found = sorted(
        f"{module} imports {imported}"
        for module, forbidden in FORBIDDEN.items()
        for imported in graph[module] & forbidden
    )
    assert not found, found
