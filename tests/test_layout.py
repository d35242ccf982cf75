"""The package's layout holds: no import circle between its modules (imports inside functions count: a lazy
import is still a dependency), and no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "Common_Task" / "deeplense"
MAX_LINES = 80


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def imports_of(tree: ast.Module, names: set[str]) -> set[str]:
    """The package's modules ``tree`` imports anywhere in it: ``from .x import``, ``from . import x``,
    ``from deeplense.x import``, ``import deeplense.x``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 or base == "deeplense" or base.startswith("deeplense."):
                head = base.removeprefix("deeplense").lstrip(".").split(".")[0]
                if head:
                    found.add(head)
                else:  # from . import x, y
                    found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("deeplense.")}
    return found & names


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (or a module importing itself), by Tarjan."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_lazy_circle():
    """The finder itself: a circle closed only by an import inside a function is found."""
    a = ast.parse("from .b import x\n")
    b = ast.parse("def f():\n    from .a import y\n")
    c = ast.parse("import deeplense.a\n")
    graph = {name: imports_of(t, {"a", "b", "c"}) for name, t in (("a", a), ("b", b), ("c", c))}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(graph) == [["a", "b"]]


def test_no_import_circle_in_the_package():
    modules = _modules()
    graph = {name: imports_of(tree, set(modules)) - {name} for name, tree in modules.items()}
    assert cycles(graph) == [], "import circles (a -> ... -> a), lazy imports included"


def test_no_function_over_80_lines():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert long == []
