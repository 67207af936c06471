"""The negative control: SmolLM2-135M-Instruct (llama architecture, in the registry) does not refuse, so the
suite must not find a refusal mechanism in it. Its baseline claims come out NOT supported and no downstream
claim (H1-H4) comes out supported; none is an error. The same command a researcher runs:

    make hypotheses PYTEST_ARGS="--model smollm2-135m-instruct"
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.realmodel
@pytest.mark.slow
def test_suite_finds_no_refusal_mechanism_in_a_model_that_does_not_refuse(pytester: pytest.Pytester, tmp_path: Path,
                                                                           monkeypatch):
    monkeypatch.setenv("MECH_REPORTS_DIR", str(tmp_path))
    monkeypatch.delenv("MECH_MODEL", raising=False)
    result = pytester.runpytest_subprocess(
        str(ROOT / "hypotheses"), "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
        "--model", "smollm2-135m-instruct", "--verdict-exit", "-p", "no:cacheprovider", "-q", "--tb=line",
        timeout=1800)
    assert result.ret == 0, result.stdout.str()[-3000:]  # every claim got a verdict; none is an error
    findings = json.loads((tmp_path / "findings.json").read_text())
    assert findings["model"]["name"] == "smollm2-135m-instruct" and findings["run"]["complete"]
    claims = findings["claims"]
    base = {c["id"].split("::")[1]: c for c in claims if c["hypothesis"] == "baseline"}  # by claim id
    assert base["test_harmful_refusal_rate"]["verdict"] == "NOT supported"
    assert base["test_harmful_refusal_rate"]["statistic"] < 0.2  # it refuses almost nothing
    assert base["test_score_separates"]["verdict"] == "NOT supported"
    assert not [c["id"] for c in base.values() if c["verdict"] == "supported"], "a baseline claim holds for a non-refuser"
    downstream = [c for c in claims if c["hypothesis"] != "baseline"]
    assert len(downstream) >= 10
    supported = [c["id"] for c in downstream if c["verdict"] == "supported"]
    assert not supported, f"a mechanism that is not there passed: {supported}"
    assert all(c["verdict"] in ("NOT supported", "not tested") for c in downstream)
    assert all(c["message"] for c in downstream if c["verdict"] == "not tested")
    assert os.path.exists(tmp_path / "hypotheses.html")
