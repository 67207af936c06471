"""The report page (fixtures/report_html.py) rendered from synthetic findings, without a model: verdict words only,
a NOT supported claim shows its message and no traceback, an error its traceback collapsed, numbers as small
tables, optional fields (issue 21's ``family``/``correction``/``p_adjusted``, ``unit``) rendered when present,
calibration status from ``calibration.json``, completions clipped, one figure per parametrized family. The page
of a real run opened in Chromium is tests/test_report.py::test_report_reads_top_down_in_a_real_browser."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import pytest

from fixtures.report_html import calibration_status, numbers_html, render_page, short_statement

SHA = "ab" * 32


def _claim(name: str, hyp: str, verdict: str, primary: bool = False, **kw: Any) -> dict[str, Any]:
    return {"id": f"hypotheses/test_{hyp}.py::{name}", "hypothesis": hyp, "primary": primary, "verdict": verdict,
            "message": kw.pop("message", ""), "claim": kw.pop("claim", f"Exploratory. The claim {name} holds (test)."),
            "statistic": None, "p_value": None, "p_adjusted": None, "effect": None, "ci": None, "n": None,
            "threshold": None, "mde": None, "test": None, "null": None, "numbers": {}, **kw}


def sample_findings(**run: Any) -> dict[str, Any]:
    claims = [
        _claim("test_rate", "baseline", "NOT supported", True, claim="PRIMARY. Harmful prompts are refused: rate > 0.80 "
               "(exact binomial).", message="harmful refusal 3/16 = 0.19: p = 1 against 0.8", effect=-0.61,
               ci=[-0.8, -0.4], n=16, p_value=1.0, p_adjusted=1.0, unit="refusal rate − 0.8", mde=0.2,
               numbers={"by_measure": {"judge": None, "substring": {"refusal": 3, "compliance": 13, "refusal_rate": {
                   "rate": 0.1875, "low": 0.04, "high": 0.456, "k": 3, "n": 16, "confidence": 0.95}}},
                   "resid_effect_by_layer": [0.01, 0.2, 0.61234], "passed_filters": True,
                   "example_response": "x" * 500}),
        _claim("test_heads", "H1", "supported", True, effect=0.5, ci=[0.2, 0.8], n=30, p_value=0.001,
               p_adjusted=0.004, unit="log-odds"),
        _claim("test_crash", "H1", "error", message="call: KeyError: 'missing'"),
        _claim("test_probe", "H2", "not tested", True, message="too few prompts"),
        *[_claim(f"test_per_layer[layer{i}]", "H2", v, effect=e, ci=[e - 0.1, e + 0.1], n=40, p_value=p,
                 p_adjusted=min(1.0, p * 2), correction="Holm within the family", family="test_per_layer")
          for i, (v, e, p) in zip((10, 9), [("supported", 0.3, 0.01), ("NOT supported", 0.02, 0.4)], strict=True)],
        _claim("test_transfer", "H3", "NOT supported", True, effect=-0.2, ci=[-0.5, 0.1], n=11, p_value=0.7,
               message="assert <fixtures.report.Claim object at 0x7f00deadbeef> == 1"),
        *[_claim(f"test_by_category[{c}]", "H4", "not tested", message=f"{c}: n = 8 is too small")
          for c in ("fraud", "theft")],
        _claim("test_direction", "H4", "supported", True, effect=0.9, ci=[0.8, 1.0], n=33, p_value=1e-5,
               p_adjusted=5e-5),
    ]
    return {"claims": claims, "config": {"alpha": 0.05, "n_random_primary": 100}, "data_use": {},
            "model": {"name": "tiny", "sha256": SHA, "dtype": "float32", "quantization": "none", "device": "cpu",
                      "n_layers": 3, "n_heads": 4},
            "refusal_measure": None, "summary": {},
            "run": {"complete": True, "partial_because": [], "exit_status": 1, "args": ["hypotheses"], "wall_s": 12.0,
                    "plan": [{"stage": "baseline", "description": "every completion graded", "claims": 9,
                              "estimate_s": 10.0, "actual_s": 12.5, "computed": True}], **run}}


def _fig() -> dict[str, str]:
    return {"title": "A figure", "caption": "Contradicted when the line stays flat.",
            "json": go.Figure(go.Scatter(x=[1, 2], y=[3, 4])).update_layout(xaxis_title="layer").to_json()}


def _visible(page: str) -> str:
    """The page without its scripts (plotly.js and the figures' JSON) and tags: what a reader can see."""
    text = re.sub(r"<(script|style).*?</\1>", "", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", text))


TB = ("Traceback (most recent call last):\n  File \"hypotheses/test_H1.py\", line 3, in test_crash\n"
      "    {}['missing']\nKeyError: 'missing'  lm = <mech.models.LoadedModel object at 0x7f1234>")


def test_page_structure_and_words(tmp_path: Path):
    page = render_page(sample_findings(), {"hypotheses/test_baseline.py::test_rate": [_fig()]},
                       {"hypotheses/test_H1.py::test_crash": TB}, tmp_path, "pytest-log.html")
    text = _visible(page)
    assert not re.search(r"\b(Failed|Passed|Skipped)\b", text)
    # sections in the argument's order, after the summary; run details last
    heads = re.findall(r'<h2 id="([^"]+)"', page)
    assert heads == ["summary", "h-baseline", "h-H1", "h-H2", "h-H3", "h-H4", "run"]
    # the error's traceback is on the page, collapsed; the NOT supported claims show messages, no repr
    m = re.search(r"<details><summary>traceback[^<]*</summary><pre class=\"tb\">(.*?)</pre>", page, re.S)
    assert m and "KeyError" in m.group(1)
    outside = page.replace(m.group(0), "")
    assert "object at 0x" not in _visible(outside) and "Traceback" not in _visible(outside)
    assert "harmful refusal 3/16 = 0.19: p = 1 against 0.8" in text
    assert "assert … == 1" in text  # a bare assert's object repr is cut
    # counts per verdict, the four verdicts only: 3 supported, 3 NOT supported, 1 error, 3 not tested of 10
    counts = re.findall(r'<table class="counts">.*?</table>', page, re.S)[0]
    assert [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", counts)][-6:] == \
        ["all", "3", "3", "1", "3", "10"]
    # a family none of whose members could be tested is one row, its members' reasons inside
    assert 'id="c-hypotheses-test-H4-py-test-by-category-fraud"' not in page
    assert "fraud: n = 8 is too small" in text and "test_by_category[theft]" in text
    assert page.index("test-per-layer-layer9") < page.index("test-per-layer-layer10")  # layers in numeric order
    # effects with CI and unit; the primaries' Holm p; the family's corrected p and its correction named
    assert "-0.61 [-0.8, -0.4] refusal rate − 0.8" in text
    assert "Holm within the family" in page and "0.8" in text
    # one forest plot, one figure for the per-layer family, the claim's own figure; each with a caption
    figs = re.findall(r'<figure class="mech-figure">.*?</figure>', page, re.S)
    assert len(figs) == 3 and all("<figcaption>" in f for f in figs)
    assert "Forest plot of the primary claims" in figs[0] and "Contradicted when the line stays flat." in figs[1]
    forest = json.loads(re.findall(r'id="fig1-json">(.*?)</script>', page, re.S)[0])
    assert len([t for t in forest["data"] if t.get("mode") == "markers"]) == 4  # 4 primaries have an effect
    assert "log-odds" in json.dumps(forest["layout"])  # each row's axis names its unit
    assert page.count("plotly.js v") <= 2 and not re.search(r"<script[^>]+src=", page)  # inlined once, offline
    # run details: plan vs actual, the configuration, the test log linked
    assert "Plan vs actual" in page and "n_random_primary" in page and 'href="pytest-log.html"' in page
    assert "not calibrated" in text and "Partial run" not in text


def test_numbers_are_small_named_tables():
    page = numbers_html({"by_measure": {"judge": None, "substring": {"refusal": 3, "refusal_rate": {
        "rate": 0.1875, "low": 0.04, "high": 0.456, "k": 3, "n": 16, "confidence": 0.95}}},
        "resid_effect_by_layer": [0.01, 0.2, 0.61234], "score_after": -1.23456, "ci95": [0.1, 0.2],
        "example_response": "x" * 500})
    text = _visible(page)
    assert "by measure" in text and "not computed" in text and "0.188 [0.04, 0.456] (3/16)" in text
    assert "resid effect by layer" in text and re.search(r"<th>layer</th><th>0</th><th>1</th><th>2</th>", page)
    assert "0.612" in text and "0.61234" not in text  # rounded; the raw value stays in findings.json
    assert re.search(r"score after</td><td>-1.23</td><td>log-odds", page)
    assert "95% CI" in text and "x" * 200 not in text and "x" * 199 in text  # any string ≤ 200 characters


def test_optional_fields_absent_and_partial_banner(tmp_path: Path):
    f = sample_findings(complete=False, partial_because=["-k 'baseline'"])
    for c in f["claims"]:
        for k in ("unit", "correction", "family", "p_adjusted", "mde"):
            c.pop(k, None)
    f["claims"] = [c for c in f["claims"] if c["hypothesis"] in ("baseline", "H2")]
    page = render_page(f, {}, {}, tmp_path)
    text = _visible(page)
    assert "Partial run" in text and "-k 'baseline'" in text
    assert re.findall(r'<h2 id="([^"]+)"', page) == ["summary", "h-baseline", "h-H2", "run"]
    assert "0.01*" in text  # a raw p, marked uncorrected
    assert "see its claim" in page  # the forest axis without a unit


@pytest.mark.parametrize("model, expect", [(SHA, "miscalibrated"), ("cd" * 32, None)])
def test_calibration_status_for_this_model_only(tmp_path: Path, model: str, expect: str | None):
    (tmp_path / "calibration.json").write_text(json.dumps({
        "model": {"name": "tiny", "sha256": model}, "config": {"alpha": 0.05},
        "primaries": {"hypotheses/test_baseline.py::test_rate": {"status": "miscalibrated", "rejection_rate": 0.3},
                      "H1": {"status": "calibrated"}}}))
    f = sample_findings()
    status = calibration_status(tmp_path, f)
    page = render_page(f, {}, {}, tmp_path)
    if expect is None:
        assert status == {} and "calibration.html" not in page
        return
    assert status == {"hypotheses/test_baseline.py::test_rate": "miscalibrated",
                      "hypotheses/test_H1.py::test_heads": "calibrated"}
    assert '<a href="calibration.html">miscalibrated</a>' in page and page.count("not calibrated") == 3


def test_short_statement_keeps_formulas_drops_test_details():
    assert short_statement("Exploratory. The top-k heads (≤ 5% of heads) reach half: the lower bound of "
                           "Δ(top-k) / Δ(all) ≥ 0.5 (paired). More text.") == \
        "The top-k heads reach half: the lower bound of Δ(top-k) / Δ(all) ≥ 0.5"
