"""The import rules of the three layers (``make lint``; tests/test_import_rules.py runs it too).

Layers, imports pointing down only: the library (``mech``) <- the suite (``fixtures``, ``hypotheses``, the root
``conftest.py``) <- the runner (``runner``). ``tests`` and ``benchmarks`` sit above all three.

1. **No upward import**: ``mech`` imports none of ``fixtures``, ``hypotheses``, ``runner``, ``tests``,
   ``benchmarks``; the suite imports none of ``runner``, ``tests``, ``benchmarks``; ``fixtures`` does not import
   ``hypotheses`` (the claims use the fixtures, never the other way round).
2. **No private name across modules**: ``from x import _y`` only inside ``x`` itself (a test reaches a private
   name through ``monkeypatch``, not through an import).
3. **No import cycle**, lazy ones included: the graph has an edge for every project import, at module level or
   inside a function (only ``if TYPE_CHECKING:`` blocks, never executed, are left out); every strongly connected
   component of more than one module is a cycle. ``from pkg import name`` is an edge to ``pkg`` (its
   ``__init__``), ``from pkg import submodule`` an edge to the submodule.

Usage: ``python scripts/check_imports.py [ROOT]``: one line per violation, exit 1 if there is any.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("mech", "fixtures", "hypotheses", "runner", "tests", "benchmarks")
# what each layer may not import (by top-level package)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "mech": ("fixtures", "hypotheses", "runner", "tests", "benchmarks"),
    "fixtures": ("hypotheses", "runner", "tests", "benchmarks"),
    "hypotheses": ("runner", "tests", "benchmarks"),
    "conftest": ("hypotheses", "runner", "tests", "benchmarks"),
}
# the replication runner and its tests are being moved out of mech/ (into runner/) on another branch, which also
# makes the names they share public; until that lands their private imports are not checked here
PRIVATE_EXEMPT: tuple[str, ...] = ()  # no exemptions: what crosses modules is public


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the importing file
    path: str  # the file, relative to the root
    line: int
    target: str  # dotted module imported (a submodule where ``from pkg import submodule``)
    names: tuple[str, ...]  # the names taken by ``from target import ...`` (empty for ``import target``)


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_files(root: Path) -> Iterator[Path]:
    for pkg in PACKAGES:
        if (root / pkg).is_dir():
            yield from sorted(p for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    if (root / "conftest.py").exists():
        yield root / "conftest.py"


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _is_module(root: Path, dotted: str) -> bool:
    p = root.joinpath(*dotted.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def imports_of(root: Path, file: Path) -> Iterator[Import]:
    rel = file.relative_to(root)
    me = module_name(rel)
    is_pkg = file.name == "__init__.py"
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(rel))

    def walk(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:  # the else branch runs
                    yield from walk(ast.Module(body=[sub], type_ignores=[]))
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            yield from walk(child)

    for node in walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    yield Import(me, str(rel), node.lineno, a.name, ())
            continue
        if node.level:  # relative: resolve against this module's package
            base = me.split(".") if is_pkg else me.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        if mod.split(".")[0] not in PACKAGES:
            continue
        plain = tuple(a.name for a in node.names if not _is_module(root, f"{mod}.{a.name}"))
        for a in node.names:
            if _is_module(root, f"{mod}.{a.name}"):
                yield Import(me, str(rel), node.lineno, f"{mod}.{a.name}", ())
        if plain or not node.names:
            yield Import(me, str(rel), node.lineno, mod, plain)


def _layer(module: str) -> str:
    return module.split(".")[0]


def check(root: Path) -> list[str]:
    """Every violation of the three rules under ``root``, one line each (``path:line: what``)."""
    root = root.resolve()
    imports = [imp for f in project_files(root) for imp in imports_of(root, f)]
    problems: list[str] = []
    for imp in imports:
        src, dst = _layer(imp.importer), _layer(imp.target)
        if dst in FORBIDDEN.get(src, ()):
            problems.append(f"{imp.path}:{imp.line}: upward import: {imp.importer} ({src}) imports {imp.target}")
        if imp.target != imp.importer and not imp.path.startswith(PRIVATE_EXEMPT):
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{imp.path}:{imp.line}: private import: {', '.join(private)} from {imp.target} "
                                "(make it public in its module, or keep it there)")
    return sorted(problems) + [f"import cycle: {' -> '.join(c)}" for c in cycles(imports)]


def cycles(imports: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a closed path through it."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.target != imp.importer:
            graph.setdefault(imp.importer, set()).add(imp.target)
            graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:  # recursion depth is bounded by the number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
                out.append(_closed_path(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def _closed_path(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``comp`` (breadth-first), for the message."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    problems = check(root)
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
