"""The package's modules import each other without a circle, lazy (in-function) imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import shadowgraft

ROOT = Path(shadowgraft.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its text (top level or inside functions).

    ``from . import x`` counts as an import of the submodule ``x`` when there
    is one, else of the package. Edges to an enclosing package are left out:
    Python runs a package's ``__init__`` before any of its submodules, and
    ``shadowgraft/__init__.py`` defines ``__version__`` (the one name taken
    from it) before it imports anything.
    """
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                found = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
                targets = found if found else [mod]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                if t in mods and t != name and not name.startswith(t + "."):
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (c := visit(v)):
            return c
    return None


def test_the_walk_sees_known_edges():
    g = import_graph()
    assert "shadowgraft.hub" in g["shadowgraft.checkpoint"]  # a lazy import inside a function
    assert "shadowgraft.verify" in g["shadowgraft.publish"]
    assert "shadowgraft.commands.apply" in g["shadowgraft.cli"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_only_entry_points_import_the_cli():
    # The entry module sits on top: commands and library code never reach up into it.
    g = import_graph()
    users = sorted(m for m, deps in g.items() if "shadowgraft.cli" in deps)
    assert users == ["shadowgraft.__main__", "shadowgraft.train.__main__"]
