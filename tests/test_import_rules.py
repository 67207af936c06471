"""scripts/check_imports.py (``make lint``): the layers' import rules hold for the project, and each rule catches
its violation (an upward import, a private name across modules, a cycle made of lazy in-function imports)."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
assert _spec is not None and _spec.loader is not None
check_imports = importlib.util.module_from_spec(_spec)
sys.modules["check_imports"] = check_imports  # its dataclass looks its module up
_spec.loader.exec_module(check_imports)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


def test_the_project_keeps_the_import_rules() -> None:
    assert check_imports.check(ROOT) == []


def test_each_rule_catches_its_violation(tmp_path: Path) -> None:
    _write(tmp_path, {
        "mech/__init__.py": "",
        "mech/up.py": "from fixtures.thing import helper\n",  # the library imports the suite
        "mech/priv.py": "from mech.lazy_a import _hidden\n",  # a private name across modules
        "mech/lazy_a.py": """\
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from mech.up import nothing  # never executed: no edge
            _hidden = 1
            def f():
                from mech.lazy_b import g  # lazy
                return g
            """,
        "mech/lazy_b.py": """\
            def g():
                import mech.lazy_a  # lazy, back: a cycle
                return mech.lazy_a
            """,
        "fixtures/__init__.py": "",
        "fixtures/thing.py": "from mech.priv import *\nhelper = 1\n",  # downward: fine
        "fixtures/claims.py": "import hypotheses.test_x\n",  # the fixtures import a claim file
        "hypotheses/test_x.py": "from fixtures.thing import helper\n",
    })
    problems = check_imports.check(tmp_path)
    assert problems == [
        "fixtures/claims.py:1: upward import: fixtures.claims (fixtures) imports hypotheses.test_x",
        "mech/priv.py:1: private import: _hidden from mech.lazy_a (make it public in its module, or keep it there)",
        "mech/up.py:1: upward import: mech.up (mech) imports fixtures.thing",
        "import cycle: mech.lazy_a -> mech.lazy_b -> mech.lazy_a",
    ]
    assert check_imports.main(["check_imports.py", str(tmp_path)]) == 1
    # a module importing a private name of its own and a package's submodule by ``from pkg import sub`` are fine
    _write(tmp_path / "ok", {"mech/__init__.py": "", "mech/sub.py": "_x = 1\n",
                             "mech/own.py": "from mech import sub\n_y = sub._x\n"})
    assert check_imports.check(tmp_path / "ok") == []
