#!/usr/bin/env python3
"""Print the import graph of tierd's own packages and fail on a cycle.

    python scripts/import_graph.py            # the graph, then "no import cycles" (exit 0)
    python scripts/import_graph.py --quiet    # only the cycles, if any

Packages, by import name: ``tierd`` (tierd/), ``tierd_client`` (client/), ``tierd_integration``
(model_integration/). Each module's source is parsed (nothing is imported, so no optional
dependency is needed). Every ``import`` statement counts, wherever it is: at the top, inside a
function (a lazy import) or under ``if TYPE_CHECKING:``, since each is a dependency a reader has
to follow. An edge goes to the module named: ``from tierd import protocol`` is an edge to
``tierd.protocol``, ``from tierd.predict import make_predictor`` one to the package
``tierd.predict``. Importing a submodule runs its parent package's ``__init__`` too, but that is not
counted as an edge: a package that re-exports its submodules would otherwise be a cycle with each.

Exit status: 0 without cycles, 1 with one or more (each printed as ``a -> b -> a``), 2 on a
source file that does not parse.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: import name -> folder, as pyproject's package-dir mapping installs them
PACKAGES = {"tierd": "tierd", "tierd_client": "client", "tierd_integration": "model_integration"}


def modules(root: Path) -> dict[str, Path]:
    """Every module of the packages, by dotted name (a package by its own name, for __init__)."""
    out: dict[str, Path] = {}
    for name, folder in PACKAGES.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = [name, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    parts = module.split(".")
    if not is_package:
        parts.pop()
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # the longest known prefix: "tierd.predict.base.X" is the module tierd.predict.base
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path a -> ... -> a) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # recursive: the graph has a few hundred nodes at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, comp) for comp in sorted(components)]


def _cycle_in(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, by breadth-first search."""
    members = set(comp)
    start = comp[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in a strongly connected component {comp}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quiet", action="store_true", help="print only the cycles")
    ap.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this script's)")
    args = ap.parse_args(argv)
    mods = modules(args.root)
    known = set(mods)
    try:
        graph = {m: imports_of(m, p, known) for m, p in mods.items()}
    except SyntaxError as e:
        print(f"import_graph: cannot parse {e.filename}: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        for m in sorted(graph):
            print(f"{m} -> {', '.join(sorted(graph[m])) or '(nothing of ours)'}")
    found = cycles(graph)
    if not found:
        if not args.quiet:
            print(f"\n{len(graph)} modules, {sum(map(len, graph.values()))} imports, no import cycles")
        return 0
    print(f"\n{len(found)} import cycle(s):", file=sys.stderr)
    for c in found:
        print("  " + " -> ".join(c), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
