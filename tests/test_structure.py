"""The package's shape: no import cycles among its modules, no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2_jax"
MAX_FUNCTION_LINES = 80


def imports(path: Path) -> set[str]:
    """The gpt2_jax modules ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gpt2_jax":
                out |= {a.name for a in node.names}
            elif node.module.startswith("gpt2_jax."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("gpt2_jax."):
                    out.add(a.name.split(".")[1])
    return out


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: imports(p) & set(modules) - {name} for name, p in modules.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first search (each reported once)."""
    found, seen = [], set()

    def visit(node, path):
        for nxt in sorted(g[node]):
            if nxt in path:
                cycle = path[path.index(nxt) :]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append([*cycle, nxt])
            elif len(path) < len(g):
                visit(nxt, [*path, nxt])

    for start in sorted(g):
        visit(start, [start])
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_gpt2_jax_modules():
    assert cycles(graph()) == []


def test_errors_is_a_leaf():
    assert graph()["errors"] == set()


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert long == []
