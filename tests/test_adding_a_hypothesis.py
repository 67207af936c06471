"""The page in hypotheses/README.md ("Adding a hypothesis") checked against the suite: each family declared in
fixtures/families.py has the file, the marker line and the single primary the page asks for, its marker is
registered, the report labels it from its entry, and the claims are ordered by it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fixtures.families import FAMILIES, HYPOTHESES
from tests.helpers import README

ROOT = Path(__file__).resolve().parents[1]


def _section() -> str:
    text = README.read_text()
    m = re.search(r"^## Adding a hypothesis$(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, "hypotheses/README.md lost its 'Adding a hypothesis' section"
    return m.group(1)


def test_the_page_names_where_a_family_is_declared():
    page = _section()
    assert "`fixtures/families.py`" in page and "`FAMILIES`" in page and "Family(marker, label, title, module, doc)" in page
    # the page's Family(...) example has the fields of the real dataclass, in order
    fields = re.search(r"Family\((\w+), (\w+), (\w+), (\w+), (\w+)\)", page).groups()  # type: ignore[union-attr]
    assert fields == tuple(FAMILIES[0].__dataclass_fields__)


@pytest.mark.parametrize("family", FAMILIES, ids=[f.marker for f in FAMILIES])
def test_each_family_is_what_the_page_says(family, pytestconfig):
    path = ROOT / "hypotheses" / family.module
    assert path.is_file(), f"{family.marker}: no hypotheses/{family.module}"
    src = path.read_text()
    mark = re.search(r"^pytestmark = \[(.*)\]$", src, flags=re.M)
    assert mark and f"pytest.mark.{family.marker}" in mark.group(1).split(", ")[0], family.marker
    assert len(re.findall(r"^@pytest\.mark\.primary$", src, flags=re.M)) == 1, f"{family.module}: one primary"
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    assert family.marker in registered
    assert HYPOTHESES[family.marker] == (family.label, family.title)


def test_the_example_family_would_be_new():
    """The page's example (late_readout, H5) collides with no declared family."""
    assert "late_readout" not in HYPOTHESES and "H5" not in {f.label for f in FAMILIES}
    assert not (ROOT / "hypotheses" / "test_late_readout.py").exists()
