"""The package's import graph: no cycle of any kind, no import against the layering.

Every import counts: module-level, inside functions, under ``TYPE_CHECKING``.
The layering (docs/ARCHITECTURE.md, "Layers"): each top-level package may
import only the packages listed for it, besides itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "virtiofsd_py"
NAME = PACKAGE.name

#: Top-level package -> the other top-level packages it may import.
ALLOWED: dict[str, frozenset[str]] = {
    "host": frozenset(),
    "virtio": frozenset({"host"}),
    "fs": frozenset({"host"}),
    "confine": frozenset({"host"}),
    "vhost": frozenset({"virtio", "host"}),
    "fuse": frozenset({"fs", "host"}),
    # Fast operations: FUSE requests answered on a backend's own tables.
    "fastops": frozenset({"fuse", "fs", "host"}),
    "migration": frozenset({"fuse", "fs", "vhost", "virtio", "host"}),
    "testing": frozenset({"migration", "fuse", "fs", "vhost", "virtio", "confine", "host"}),
    "app": frozenset(
        {
            "testing",
            "migration",
            "fastops",
            "fuse",
            "fs",
            "vhost",
            "virtio",
            "confine",
            "host",
            "__init__",
        }
    ),
    # The package root re-exports the public names of the backend author's API.
    "__init__": frozenset({"fs", "fuse", "host"}),
    "__main__": frozenset({"app"}),
}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported(mod: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The package modules ``mod`` imports (the longest known prefix of each name)."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != mod and not mod.startswith(name + "."):
                yield name


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: set(imported(m, p, known)) for m, p in known.items()}


def layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read() -> None:
    edges = graph()
    assert f"{NAME}.fuse.dispatcher" in edges[f"{NAME}.app.daemon"]
    assert f"{NAME}.fs.api" in edges[f"{NAME}.fuse.dispatcher"]


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Imports of a package its layer may not import."""
    return [
        f"{m} -> {d}"
        for m, deps in sorted(edges.items())
        for d in sorted(deps)
        if layer(d) != layer(m) and layer(d) not in ALLOWED[layer(m)]
    ]


def test_no_upward_import() -> None:
    assert upward(graph()) == []


def test_upward_finder_finds_one() -> None:
    fs, fuse = f"{NAME}.fs.api", f"{NAME}.fuse.abi"
    assert upward({fs: {fuse}, fuse: {fs}}) == [f"{fs} -> {fuse}"]


def test_every_top_level_package_has_a_rule() -> None:
    assert {layer(m) for m in graph()} <= set(ALLOWED)
