"""The three layers (issue 27, item 3; DESIGN "Three layers, imports pointing down only"): the library (``mech/``)
imports nothing from the suite (``fixtures/``, ``hypotheses/``), the runner (``runner/``) or the tests, at module
level or inside a function; the suite imports nothing from the runner. Read from the source (AST), so an import
that only runs on some path is caught too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, at module level) of every absolute import in a file; module level means outside
    any function (in an ``if``/``try`` block or a class body it still runs on import)."""
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, not in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.lineno, child.module, not in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def _upward(package: str, above: tuple[str, ...], module_level: bool) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no {package}/**/*.py"
    return [f"{f.relative_to(ROOT)}:{line} imports {mod}" for f in files for line, mod, top in _imports(f)
            if mod.split(".")[0] in above and top == module_level]


@pytest.mark.parametrize("module_level", [True, False], ids=["module-level", "in-function"])
def test_the_library_imports_nothing_above_it(module_level: bool) -> None:
    assert _upward("mech", ("fixtures", "hypotheses", "runner", "tests", "conftest"), module_level) == []


@pytest.mark.parametrize("package", ["fixtures", "hypotheses"])
def test_the_suite_imports_nothing_of_the_runner(package: str) -> None:
    assert _upward(package, ("runner",), True) + _upward(package, ("runner",), False) == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom fixtures.config import x\n\ndef g():\n    import runner.replicate.main\n"
                 "    from . import y\n\nif True:\n    import hypotheses\n")
    assert _imports(f) == [(1, "os", True), (2, "fixtures.config", True), (5, "runner.replicate.main", False),
                           (9, "hypotheses", True)]
