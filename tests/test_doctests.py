"""The short examples in the library's docstrings run as doctests: every module of ``mech`` is searched, so an
example added anywhere is checked, and one that drifts from the code fails here."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mech

MODULES = sorted(m.name for m in pkgutil.walk_packages(mech.__path__, "mech.") if not m.name.endswith("__main__"))
# the entry points whose examples a newcomer reads first: each must carry at least one
WITH_EXAMPLES = ("mech.stats",)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    res = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert res.failed == 0, f"{res.failed} of {res.attempted} docstring examples in {name} failed (run python -m " \
                            f"doctest -v {name.replace('.', '/')}.py)"
    if name in WITH_EXAMPLES:
        assert res.attempted > 0, f"{name} lost its docstring examples"
