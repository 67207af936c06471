"""The walkthrough in hypotheses/README.md ("Adding a claim") run as written: its fixture and claim code
blocks are taken from the README, added to a copy of the suite's plugins, and run on a tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import readme_blocks

ROOT = Path(__file__).resolve().parents[1]
TINY_SET = ["--set", "min_refusals=0", "--set", "gate_open=true", "--set", "n_bootstrap=200"]


def _blocks() -> list[str]:
    return readme_blocks("Adding a claim")  # the other sections' blocks belong to their own pages


@pytest.mark.slow
def test_the_readme_walkthrough_runs(tiny_qwen2, pytester: pytest.Pytester, tmp_path: Path, monkeypatch):
    """The README's walkthrough claim runs on a tiny model. The model is the session's ``tiny_qwen2``, built before
    ``pytester`` starts: pytester unloads every module a test imports when it ends, and transformers' lazily
    imported modules register torch operators that cannot be registered twice (a later test building a model
    would fail with "Only a single TORCH_LIBRARY can be used ...")."""
    fixture_code, claim_code = _blocks()
    pytester.makepyfile(extra_fixtures="import pytest\n"
                        "from fixtures.common import ids, require_gate\n"
                        "from fixtures.h1_circuit import claim_k, top_heads\n\n" + fixture_code)
    pytester.makeconftest(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('mech_root_conftest', {str(ROOT / 'conftest.py')!r})\n"
        "root = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(root)\n"
        "pytest_plugins = [p for p in root.pytest_plugins if p != 'pytester'] + ['extra_fixtures']\n"
        "pytest_configure = root.pytest_configure\n")
    pytester.makepyfile(test_zero="import numpy as np\nimport pytest\nfrom mech.stats import bootstrap_ci\n\n"
                        "pytestmark = [pytest.mark.localized_circuit]\n\n" + claim_code)
    tiny = tiny_qwen2
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{pytester.path}")
    monkeypatch.setenv("MECH_REPORTS_DIR", str(tmp_path / "reports"))
    result = pytester.runpytest_subprocess("test_zero.py", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(pytester.path),
                                           "--model", str(tmp_path / "m"), "--cache-dir", str(tmp_path / "cache"),
                                           "--max-new-tokens", "4", "-p", "no:cacheprovider", *TINY_SET, timeout=600)
    findings = json.loads((tmp_path / "reports" / "findings.partial.json").read_text())
    (c,) = findings["claims"]
    assert c["id"].endswith("test_zero_ablation_lowers_refusal") and c["hypothesis"] == "H1", c
    assert c["verdict"] in ("supported", "NOT supported"), (c["verdict"], c["message"], result.stdout.str()[-2000:])
    assert c["test"] == "Wilcoxon signed-rank, one-sided" and c["n"] > 0 and c["claim"].startswith("Exploratory.")
    assert findings["data_use"][c["id"]]["judge"]
