"""The verdict rules: Holm across the primaries (an error counts as p = 1 in m, a NaN p as 1, a NOT-supported
primary cannot help the others), the correction within each exploratory family, the refusal gate on train and
validation prompts (and the switch that opens it), and the fields findings.json carries for them."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import false_discovery_control

from fixtures.common import BaselineRow, gate_from_baseline, require_gate
from fixtures.config import SuiteConfig
from fixtures.multiplicity import correct_exploratory, entering_p, family_of, holm_primaries
from mech.grading import Grade

ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.05


def _claim(nodeid: str, verdict: str, p: float | None, *, primary: bool = False, decided_on: str = "p_value",
           family_m: int = 1, nan: bool = False) -> dict[str, Any]:
    return {"id": nodeid, "hypothesis": "H1", "primary": primary, "verdict": verdict, "message": "", "p_value": p,
            "decided_on": decided_on, "family": family_of(nodeid, primary), "family_collected": family_m,
            "p_value_nan": nan}


def _findings(*claims: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in claims}


# ------------------------------------------------------------------------------------------- primaries


def test_an_error_primary_counts_as_p_one_in_m():
    """Two supported primaries at p = 0.02 and 0.03 pass Holm over 2 (0.04, 0.04) but not when a third primary
    erred: it enters with p = 1 and m = 3 (0.06, 0.06)."""
    ok = _findings(_claim("a.py::t1", "supported", 0.02, primary=True), _claim("b.py::t2", "supported", 0.03, primary=True))
    h = holm_primaries(ok, ALPHA)
    assert h["m"] == 2 and [ok[k]["verdict"] for k in sorted(ok)] == ["supported", "supported"]
    with_error = _findings(*[dict(c, verdict="supported") for c in ok.values()],
                           _claim("c.py::t3", "error", None, primary=True))
    h = holm_primaries(with_error, ALPHA)
    assert h["m"] == 3 and with_error["c.py::t3"]["p_entered"] == 1.0
    assert "error" in with_error["c.py::t3"]["p_entered_because"]
    assert with_error["a.py::t1"]["p_adjusted"] == pytest.approx(0.06)
    assert with_error["a.py::t1"]["verdict"] == with_error["b.py::t2"]["verdict"] == "NOT supported"
    assert "Holm-adjusted p = 0.06" in with_error["a.py::t1"]["message"]
    assert with_error["c.py::t3"]["verdict"] == "error"  # an error stays an error


def test_a_nan_p_never_reaches_a_verdict():
    """A primary whose p is NaN (written as None, flagged) enters as p = 1, saying so; if its assertion held it is
    NOT supported after Holm."""
    f = _findings(_claim("a.py::t1", "supported", None, primary=True, nan=True),
                  _claim("b.py::t2", "supported", 0.001, primary=True))
    holm_primaries(f, ALPHA)
    assert f["a.py::t1"]["p_entered"] == 1.0 and "NaN" in f["a.py::t1"]["p_entered_because"]
    assert f["a.py::t1"]["verdict"] == "NOT supported" and f["b.py::t2"]["verdict"] == "supported"
    assert entering_p(_claim("x::y", "supported", None), ALPHA)[1] == "no p-value recorded: counts as p = 1"


def test_a_not_supported_primary_cannot_help_the_others():
    """A primary that failed a condition its p does not cover (NOT supported at p = 0.001) enters with p = 1:
    the others' adjusted p are those of a family where it had p = 1, not the smaller ones it would give them as a
    rejection at the head of Holm's step-down. Its own verdict stays NOT supported."""
    def run(p_failed: float | None, verdict: str) -> dict[str, dict]:
        f = _findings(_claim("a.py::t1", "supported", 0.02, primary=True),
                      _claim("b.py::t2", "supported", 0.024, primary=True),
                      _claim("c.py::t3", verdict, p_failed, primary=True))
        holm_primaries(f, ALPHA)
        return f

    failed = run(0.001, "NOT supported")
    as_one = run(1.0, "NOT supported")
    naive = run(0.001, "supported")  # what the old rule did: its small p stayed in the family
    for k in ("a.py::t1", "b.py::t2"):
        assert failed[k]["p_adjusted"] == as_one[k]["p_adjusted"]
        assert failed[k]["p_adjusted"] > naive[k]["p_adjusted"]
    assert [failed[k]["verdict"] for k in ("a.py::t1", "b.py::t2")] == ["NOT supported", "NOT supported"]
    assert [naive[k]["verdict"] for k in ("a.py::t1", "b.py::t2")] == ["supported", "supported"]
    assert failed["c.py::t3"]["p_entered"] == 1.0 and failed["c.py::t3"]["verdict"] == "NOT supported"
    # a NOT-supported primary whose composite p is not below alpha enters with that p
    comp = run(0.3, "NOT supported")
    assert comp["c.py::t3"]["p_entered"] == 0.3 and comp["c.py::t3"]["p_entered_because"] == "its recorded p-value"


def test_a_not_tested_primary_is_not_in_the_family():
    f = _findings(_claim("a.py::t1", "supported", 0.02, primary=True), _claim("b.py::t2", "not tested", None, primary=True))
    h = holm_primaries(f, ALPHA)
    assert h["m"] == 1 and f["a.py::t1"]["p_adjusted"] == 0.02 and f["b.py::t2"]["p_adjusted"] is None
    assert h["entered"]["b.py::t2"]["p_entered"] is None and "not tested" in h["entered"]["b.py::t2"]["because"]


# ------------------------------------------------------------------------------------------ exploratory

# Holm by hand, a textbook example: sorted p 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04,
# made monotone: 0.02, 0.03, 0.06, 0.06
_P = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}
_HOLM = {"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02}


def _family(method: str = "holm", ran: tuple[str, ...] = tuple(_P), **kw: Any) -> dict[str, dict]:
    f = _findings(*[_claim(f"h.py::test_fam[{k}]", "supported", _P[k], family_m=len(_P), **kw) for k in ran],
                  _claim("h.py::test_single", "supported", 0.04))
    correct_exploratory(f, ALPHA, method)
    return f


def test_an_exploratory_family_is_holm_corrected():
    f = _family("holm")
    for k, want in _HOLM.items():
        c = f[f"h.py::test_fam[{k}]"]
        assert c["p_adjusted"] == pytest.approx(want) and c["family"] == "h.py::test_fam"
        assert c["role"] == "exploratory" and c["correction"] == "holm" and c["family_size"] == 4
        assert c["verdict"] == ("supported" if want < ALPHA else "NOT supported")
    assert "Holm-adjusted p = 0.06" in f["h.py::test_fam[b]"]["message"] and "test_fam" in f["h.py::test_fam[b]"]["message"]
    single = f["h.py::test_single"]  # a family of one: adjusted p = raw p
    assert single["p_adjusted"] == 0.04 and single["family_size"] == 1 and single["verdict"] == "supported"


def test_an_exploratory_family_is_bh_corrected_like_scipy():
    f = _family("bh")
    want = false_discovery_control(list(_P.values()), method="bh")
    got = [f[f"h.py::test_fam[{k}]"]["p_adjusted"] for k in _P]
    np.testing.assert_allclose(got, want)
    assert all(f[f"h.py::test_fam[{k}]"]["verdict"] == "supported" for k in _P)  # BH: all four at 0.04 or less


def test_part_of_a_family_is_corrected_over_the_whole_family():
    """-k selected two of four cases: the other p are unknown, so Bonferroni over all four, an upper bound on
    Holm: nothing is supported that the whole family would not support."""
    f = _family("holm", ran=("a", "c"))
    a, c = f["h.py::test_fam[a]"], f["h.py::test_fam[c]"]
    assert a["p_adjusted"] == pytest.approx(0.04) and c["p_adjusted"] == pytest.approx(0.12)
    assert a["correction"].startswith("bonferroni") and a["family_size"] == 4
    assert a["p_adjusted"] >= _HOLM["a"] and c["p_adjusted"] >= _HOLM["c"]
    assert (a["verdict"], c["verdict"]) == ("supported", "NOT supported")


def test_exploratory_errors_count_and_bounds_are_not_adjusted():
    f = _findings(_claim("h.py::test_fam[a]", "supported", 0.02, family_m=2),
                  _claim("h.py::test_fam[b]", "error", None, family_m=2),
                  _claim("h.py::test_bound", "supported", 0.5, decided_on="bound"),
                  _claim("h.py::test_skip[a]", "not tested", None, family_m=2),
                  _claim("h.py::test_skip[b]", "supported", 0.03, family_m=2))
    out = correct_exploratory(f, ALPHA, "holm")
    assert f["h.py::test_fam[a]"]["p_adjusted"] == pytest.approx(0.04) and f["h.py::test_fam[b]"]["p_entered"] == 1.0
    b = f["h.py::test_bound"]
    assert b["p_adjusted"] is None and b["verdict"] == "supported" and b["correction"].startswith("none: decided on")
    assert f["h.py::test_skip[b]"]["p_adjusted"] == 0.03 and f["h.py::test_skip[b]"]["family_size"] == 1
    assert out["families"]["h.py::test_fam"]["m"] == 2 and out["families"]["h.py::test_skip"]["verdicts"]["not tested"] == 1


# ------------------------------------------------------------------------------------------------ gate


def _row(id: str, label: str, split: str, pair_id: str, refused: bool, score: float) -> BaselineRow:
    """A baseline row with what the gate reads (the generation's other fields are placeholders)."""
    outcome = "refusal" if refused else "compliance"
    grade = Grade(refused, True, 1.0, 0.0, (), outcome, None, None, outcome, False)  # type: ignore[arg-type]
    return BaselineRow(id=id, prompt=f"{label} {pair_id}", label=label, category="c", pair_id=pair_id, set="s",
                       split=split, score=score, response="", text="", ids=[], logprobs=[], cut_off=False,
                       substring_refused=refused, decision_refused=refused, outcome=outcome, grade=grade)


def _rows(refused: dict[str, float], seed: int = 0, n: int = 40, separation: float = 3.0) -> list[BaselineRow]:
    """Baseline rows: ``n`` pairs per split, the harmful twin refused at ``refused[split]``, its refusal score
    ``separation`` above the harmless twin's on average."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, rate in refused.items():
        for i in range(n):
            pid = f"{split}{i}"
            rows.append(_row(f"h:{pid}", "harmful", split, pid, bool(i < rate * n), float(rng.normal(separation))))
            rows.append(_row(f"s:{pid}", "harmless", split, pid, False, float(rng.normal(0.0))))
    return rows


SUITE = dataclasses.replace(SuiteConfig(), n_bootstrap=500)


def test_the_gate_reads_train_and_validation_only():
    """A model that refuses 10% of its train and validation harmful prompts fails the gate even when it refuses
    every test prompt; one that refuses 90% there passes even when it refuses no test prompt, with the same
    numbers as without test rows at all."""
    low = gate_from_baseline(_rows({"train": 0.1, "val": 0.1, "test": 1.0}), set(), SUITE)
    assert not low["ok"] and not low["passed"] and "no refusal to explain" in low["reason"]
    assert low["refusal_rate"]["n"] == 80 and low["refusal_rate"]["k"] == 8 and low["splits_read"] == ["train", "val"]
    high = gate_from_baseline(_rows({"train": 0.9, "val": 0.9, "test": 0.0}), set(), SUITE)
    no_test = gate_from_baseline([r for r in _rows({"train": 0.9, "val": 0.9, "test": 0.0}) if r.split != "test"],
                                 set(), SUITE)
    assert high["ok"] and high["passed"] and high["reason"] == ""
    assert high["refusal_rate"]["low"] >= SUITE.gate_refusal_min and high["auroc_ci95"][0] >= SUITE.gate_auroc_min
    assert {k: v for k, v in high.items()} == {k: v for k, v in no_test.items()}
    read = set(high["prompts"]["refusal_rate"]) | set(high["prompts"]["auroc_harmful"]) | set(high["prompts"]["auroc_harmless"])
    assert read and not any("test" in i for i in read)


def test_the_gate_needs_separation_and_leaves_out_the_token_probes():
    """A refusal score that does not separate harmful from harmless fails the AUROC floor; the harmful prompts the
    refusal tokens came from are not in the AUROC."""
    flat = gate_from_baseline(_rows({"train": 0.9, "val": 0.9}, separation=0.0), set(), SUITE)
    assert not flat["ok"] and "does not separate" in flat["reason"] and flat["refusal_rate"]["low"] >= 0.3
    rows = _rows({"train": 0.9, "val": 0.9})
    probes = {r.prompt for r in rows if r.split == "train" and r.label == "harmful"}
    g = gate_from_baseline(rows, probes, SUITE)
    assert g["n_auroc_harmful"] == 40 and all(i.startswith("h:val") for i in g["prompts"]["auroc_harmful"])
    assert g["n_harmful"] == 80  # the rate still reads every train and validation harmful prompt


def test_the_gate_open_switch_lets_claims_run():
    rows = _rows({"train": 0.0, "val": 0.0}, separation=0.0)
    closed = gate_from_baseline(rows, set(), SUITE)
    with pytest.raises(pytest.skip.Exception, match="no refusal to explain"):
        require_gate(closed)
    opened = gate_from_baseline(rows, set(), dataclasses.replace(SUITE, gate_open=True))
    assert opened["ok"] and opened["open"] and not opened["passed"] and "no refusal to explain" in opened["reason"]
    require_gate(opened)  # does not skip
    no_harmless = [r for r in rows if r.label == "harmful"]  # no data to compare with: open or not, closed
    g = gate_from_baseline(no_harmless, set(), dataclasses.replace(SUITE, gate_open=True))
    assert not g["ok"] and "no harmless train or validation prompts" in g["reason"]


# ------------------------------------------------------------------------------ findings.json end to end

_SYNTHETIC = """
import math

import pytest


@pytest.mark.primary
@pytest.mark.baseline
def test_base(claim):
    \"\"\"PRIMARY. Holds at p = 0.01.\"\"\"
    claim.result(p_value=0.01, n=10, test="t")


@pytest.mark.primary
@pytest.mark.localized_circuit
def test_h1(claim):
    \"\"\"PRIMARY. Holds at p = 0.012.\"\"\"
    claim.result(p_value=0.012, n=10, test="t")


@pytest.mark.primary
@pytest.mark.layer_hierarchy
def test_h2(claim):
    \"\"\"PRIMARY. A bug.\"\"\"
    {}["missing"]


@pytest.mark.primary
@pytest.mark.shared_substrate
def test_h3(claim):
    \"\"\"PRIMARY. Fails its effect floor with a small p.\"\"\"
    claim.result(p_value=0.001, n=10, test="t")
    assert False, "the lower bound misses the floor"


@pytest.mark.primary
@pytest.mark.single_direction
def test_h4(claim):
    \"\"\"PRIMARY. Its p is NaN.\"\"\"
    claim.result(p_value=math.nan, n=10, test="t")


@pytest.mark.shared_substrate
@pytest.mark.parametrize("cat", ["a", "b", "c", "d"])
def test_per_category(claim, cat):
    \"\"\"Exploratory. One case per category.\"\"\"
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}[cat]
    claim.result(p_value=p, n=10, test="t")
    assert p < 0.05


@pytest.mark.single_direction
def test_bound(claim):
    \"\"\"Exploratory. Decides on a bound.\"\"\"
    claim.result(p_value=0.2, effect=1.0, ci=[0.5, 1.5], n=10, test="t", decided_on="bound")
"""


def _run_synthetic(pytester: pytest.Pytester, tmp_path: Path, monkeypatch, *args: str) -> tuple[Any, dict]:
    pytester.makeconftest('pytest_plugins = ["fixtures.options", "fixtures.config", "fixtures.report"]\n'
                          'def pytest_configure(config):\n'
                          '    for m in ("baseline", "localized_circuit", "layer_hierarchy", "shared_substrate",\n'
                          '              "single_direction"):\n'
                          '        config.addinivalue_line("markers", m + ": a hypothesis")\n')
    pytester.makepyfile(test_claims=_SYNTHETIC)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{pytester.path}")
    monkeypatch.setenv("MECH_REPORTS_DIR", str(tmp_path))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *args)
    return result, json.loads((tmp_path / "findings.partial.json").read_text())


def test_findings_json_records_the_verdict_rules(pytester: pytest.Pytester, tmp_path: Path, monkeypatch):
    result, findings = _run_synthetic(pytester, tmp_path, monkeypatch)
    got = {c["id"].split("::")[1]: c for c in findings["claims"]}
    for c in got.values():
        assert {"role", "family", "correction", "family_size", "p_entered", "p_entered_because", "p_adjusted",
                "decided_on", "p_value"} <= set(c), c["id"]
        assert "p_value_nan" not in c
    # primaries: m = 4 (the error is in it, as p = 1; so is the NOT-supported one; the NaN one made no test: a NaN
    # never reaches a verdict, it is `not tested` with the reason and outside the family)
    holm = findings["multiplicity"]
    assert holm["method"] == "holm" and holm["m"] == 4
    assert got["test_h2"]["verdict"] == "error" and got["test_h2"]["p_entered"] == 1.0
    assert got["test_h3"]["verdict"] == "NOT supported" and got["test_h3"]["p_entered"] == 1.0
    assert got["test_h4"]["verdict"] == "not tested" and "NaN" in got["test_h4"]["message"]
    assert got["test_base"]["p_adjusted"] == pytest.approx(0.04) and got["test_base"]["verdict"] == "supported"
    assert got["test_h1"]["p_adjusted"] == pytest.approx(0.04) and got["test_h1"]["verdict"] == "supported"
    assert all(got[k]["role"] == "primary" and got[k]["family"] == "primaries" for k in ("test_base", "test_h4"))
    assert set(holm["entered"]) == {c["id"] for c in findings["claims"] if c["primary"]}  # not tested: recorded, not in m
    # the exploratory family of four, Holm within it; the bound claim untouched
    fam = {k[len("test_per_category["):-1]: c for k, c in got.items() if k.startswith("test_per_category")}
    assert {k: round(c["p_adjusted"], 6) for k, c in fam.items()} == _HOLM
    assert {k: c["verdict"] for k, c in fam.items()} == {"a": "supported", "b": "NOT supported",
                                                        "c": "NOT supported", "d": "supported"}
    assert all(c["role"] == "exploratory" and c["correction"] == "holm" and c["family_size"] == 4 for c in fam.values())
    assert got["test_bound"]["decided_on"] == "bound" and got["test_bound"]["p_adjusted"] is None
    fams = holm["exploratory"]["families"]
    assert fams["test_claims.py::test_per_category"]["verdicts"]["supported"] == 2
    s = findings["summary"]
    assert s["by_role"]["primary"] == {"claims": 5, "supported": 2, "not_supported": 1, "error": 1, "not_tested": 1}
    assert s["by_role"]["exploratory"]["claims"] == 5 and s["by_role"]["exploratory"]["supported"] == 3
    assert "gate" in findings and findings["gate"] is None  # no claim here read the refusal gate
    out = result.stdout.str()
    assert "exploratory shared_substrate" not in out  # the label is the hypothesis's, e.g. H3
    assert "exploratory H3       test_per_category (holm, m=4): 2 supported" in out
    assert not [ln for ln in out.splitlines() if ln.startswith("PRIMARY") and "test_per_category" in ln]


def test_a_k_run_of_part_of_a_family_corrects_over_all_of_it(pytester: pytest.Pytester, tmp_path: Path, monkeypatch):
    _, findings = _run_synthetic(pytester, tmp_path, monkeypatch, "test_claims.py::test_per_category[a]",
                                 "test_claims.py::test_per_category[c]")
    got = {c["id"].split("::")[1]: c for c in findings["claims"]}
    a, c = got["test_per_category[a]"], got["test_per_category[c]"]
    assert a["family_size"] == 4 and a["correction"].startswith("bonferroni")
    assert a["p_adjusted"] == pytest.approx(0.04) and a["verdict"] == "supported"
    assert c["p_adjusted"] == pytest.approx(0.12) and c["verdict"] == "NOT supported"
