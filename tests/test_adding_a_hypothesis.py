"""The page in hypotheses/README.md ("Adding a hypothesis") built and checked: its family entry is added to a copy of
fixtures/families.py and its file run by the suite's plugins on a tiny model (the claim lands in findings.json under
the new label); each declared family has the file, the marker line and the single primary the page asks for, its
marker is registered and the report labels it from its entry."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from fixtures.families import FAMILIES, HYPOTHESES
from tests.helpers import README, readme_blocks

ROOT = Path(__file__).resolve().parents[1]
TINY_SET = ["--set", "min_refusals=0", "--set", "gate_open=true", "--set", "n_bootstrap=200"]


@pytest.mark.slow
def test_the_hypothesis_page_builds(tiny_qwen2, pytester: pytest.Pytester, tmp_path: Path, monkeypatch):
    """The new family's claim runs under its marker and is reported as H5 with its title. The model is the session's
    ``tiny_qwen2``, built before ``pytester`` starts (see tests/test_adding_a_claim.py for why)."""
    entry, claim_file = readme_blocks("Adding a hypothesis")
    shutil.copytree(ROOT / "fixtures", pytester.path / "fixtures", ignore=shutil.ignore_patterns("__pycache__"))
    fam = pytester.path / "fixtures" / "families.py"
    text = fam.read_text()
    close = text.index("\n)\n", text.index("FAMILIES: tuple"))  # the end of the FAMILIES tuple
    fam.write_text(text[:close] + "\n" + "".join("    " + line for line in entry.splitlines(True)).rstrip("\n")
                   + text[close:])
    pytester.makeconftest(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('mech_root_conftest', {str(ROOT / 'conftest.py')!r})\n"
        "root = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(root)\n"
        "pytest_plugins = [p for p in root.pytest_plugins if p != 'pytester']\n"
        "pytest_configure = root.pytest_configure\n")
    pytester.makepyfile(test_late_readout=claim_file)
    tiny = tiny_qwen2
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.setenv("PYTHONPATH", f"{pytester.path}{os.pathsep}{ROOT}")  # the edited fixtures/ first
    monkeypatch.setenv("MECH_REPORTS_DIR", str(tmp_path / "reports"))
    result = pytester.runpytest_subprocess("test_late_readout.py", "-m", "late_readout", "-c", str(ROOT / "pyproject.toml"),
                                           "--rootdir", str(pytester.path), "--model", str(tmp_path / "m"),
                                           "--cache-dir", str(tmp_path / "cache"), "--max-new-tokens", "4",
                                           "-p", "no:cacheprovider", *TINY_SET, timeout=600)
    out = result.stdout.str()
    findings = json.loads((tmp_path / "reports" / "findings.partial.json").read_text())
    (c,) = findings["claims"]
    assert c["id"].endswith("test_last_mlp_writes_refusal") and c["hypothesis"] == "H5" and c["primary"], (c, out[-2000:])
    assert c["verdict"] in ("supported", "NOT supported"), (c["verdict"], c["message"], out[-2000:])
    assert c["test"] == "Wilcoxon signed-rank, one-sided" and c["n"] > 0 and c["unit"] == "log-odds"


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
