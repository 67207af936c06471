"""End to end: the whole hypothesis suite on a tiny local model (run with pytester), its findings.json and
self-contained HTML report, and that report opened in a real headless browser (Debian's Chromium, driven by
Playwright). Verdicts on a random tiny model are meaningless; what is checked is that every claim runs,
records its statistics, and shows up with its figures."""

from __future__ import annotations

import ast
import csv
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from fixtures.tiny_models import build_tiny_model
from mech.prompts import default_pairs
from tests.helpers import small_prompt_file

ROOT = Path(__file__).resolve().parents[1]
VERDICTS = {"supported", "NOT supported", "error", "not tested"}
# every fixture and claim runs on a tiny random model: the refusal gate is opened and the null sizes shrunk
TINY_SET = ["--set", "min_refusals=0", "--set", "gate_open=true", "--set", "n_random_primary=5",
            "--set", "n_probe_shuffles=10", "--set", "n_label_shuffles=10", "--set", "n_random_directions=3",
            "--set", "n_bootstrap=200", "--set", "n_random_curve=2", "--set", "n_random_per_category=3",
            "--set", "n_selection_null=3",
            "--set", "n_substrate_prompts=3", "--set", "n_cov_directions=2", "--set", "n_shuffled_directions=2",
            "--set", "n_control_prompts=3", "--set", "control_max_new_tokens=3", "--set", "n_random_addition=2"]


def _claim_functions() -> set[str]:
    """Names of every test in hypotheses/ that reports through the ``claim`` fixture."""
    names = set()
    for f in (ROOT / "hypotheses").glob("test_*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                if "claim" in [a.arg for a in node.args.args]:
                    names.add(node.name)
    return names


def run_suite(pytester: pytest.Pytester, model_dir: Path, work: Path, *extra: str) -> tuple[Any, Path]:
    """Run ``pytest hypotheses/`` on ``model_dir`` in a subprocess; returns (result, reports dir)."""
    reports = work / "reports"
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MECH_REPORTS_DIR"] = str(reports)
    try:
        result = pytester.runpytest_subprocess(
            str(ROOT / "hypotheses"), "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
            "--model", str(model_dir), "--prompts", str(small_prompt_file(work / "prompts.csv")),
            "--cache-dir", str(work / "cache"), "--max-new-tokens", "4", "-p", "no:cacheprovider", "-q",
            "--tb=line", *extra, timeout=900)
    finally:
        del os.environ["MECH_REPORTS_DIR"]
    return result, reports


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The whole suite on a tiny qwen2 model, once for this module."""
    work = tmp_path_factory.mktemp("suite")
    tiny = build_tiny_model("qwen2", seed=0)
    model_dir = work / "tiny-qwen2"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    return {"work": work, "model_dir": model_dir}


@pytest.mark.slow
def test_suite_runs_on_a_tiny_model(pytester: pytest.Pytester, tiny_run):
    result, reports = run_suite(pytester, tiny_run["model_dir"], tiny_run["work"], "--verdict-exit", *TINY_SET)
    outcomes = result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()[-3000:]  # --verdict-exit: every claim got a verdict, none erred
    findings = json.loads((reports / "findings.json").read_text())
    assert set(findings) >= {"config", "model", "summary", "claims", "data_use", "run"}
    assert findings["run"]["complete"] and findings["config"]["n_random_primary"] == 5
    assert findings["model"]["sha256"] and findings["model"]["dtype"] == "float32"
    tiny_cfg = json.loads((tiny_run["model_dir"] / "config.json").read_text())
    assert (findings["model"]["n_layers"], findings["model"]["n_heads"]) == (
        tiny_cfg["num_hidden_layers"], tiny_cfg["num_attention_heads"])
    secs = findings["run"]["fixture_seconds"]  # each session fixture's own setup time
    assert {"lm", "baseline", "circuit_ablation", "refusal_direction"} <= set(secs)
    assert all(v >= 0 for v in secs.values()) and sum(secs.values()) <= findings["run"]["wall_s"] + 1
    got = {c["id"].split("::")[1].split("[")[0] for c in findings["claims"]}
    assert got == _claim_functions(), f"claims missing from findings.json: {_claim_functions() - got}"
    for c in findings["claims"]:
        assert c["verdict"] in VERDICTS - {"error"}, (c["id"], c["message"])
        assert c["hypothesis"] in ("baseline", "H1", "H2", "H3", "H4"), c["id"]
        assert c["claim"] and c["claim"] != c["id"], f"{c['id']} states no claim"
        if c["verdict"] != "not tested":
            assert c["test"] and c["n"] is not None, f"{c['id']} names no test or n"
        else:
            assert c["message"], f"{c['id']} is not tested without a reason"
    prim = [c for c in findings["claims"] if c["primary"]]
    assert sorted(c["hypothesis"] for c in prim) == ["H1", "H2", "H3", "H4", "baseline"]
    for c in prim:
        if c["p_value"] is not None and c["verdict"] != "not tested":
            assert c["p_adjusted"] is not None and c["p_adjusted"] >= c["p_value"]
    parts = {c["hypothesis"]: c["numbers"]["p_parts"] for c in prim if c["hypothesis"] in ("H1", "H3")}
    assert set(parts["H1"]) == {"random_head_sets", "prompts", "selection_null"}, parts  # the selection-matched null
    assert set(parts["H3"]) == {"random_head_sets", "selection_null"}, parts
    for c in prim:
        if c["hypothesis"] in ("H1", "H3"):
            assert c["numbers"]["n_selection_null"] == 3 and c["p_value"] == max(c["numbers"]["p_parts"].values())
            assert "label-free selections" in c["null"], c["null"]
    for c in findings["claims"]:  # every claim says its role, family and correction (tests/test_verdicts.py)
        assert c["role"] == ("primary" if c["primary"] else "exploratory") and c["family"] and c["correction"], c["id"]
        if not c["primary"] and c["decided_on"] == "p_value" and c["verdict"] in ("supported", "NOT supported"):
            assert c["p_adjusted"] is not None and c["p_adjusted"] >= c["p_entered"] >= c["p_value"], c["id"]
    assert not [c["id"] for c in findings["claims"] if c["hypothesis"] == "baseline" and "[" in c["id"]]
    gate = findings["gate"]  # opened by TINY_SET, measured all the same, on train and validation prompts only
    assert gate["open"] and gate["ok"] and gate["splits_read"] == ["train", "val"] and gate["n_harmful"] > 0
    s = findings["summary"]
    assert s["claims"] == len(findings["claims"]) == sum(s[k] for k in ("supported", "not_supported", "error", "not_tested"))
    assert s["claims"] == sum(outcomes.get(k, 0) for k in ("passed", "failed", "skipped")) - 2  # 2 snapshot tests
    html = (reports / "hypotheses.html").read_text()
    assert "Plotly" in html and not re.search(r"<script[^>]+src=[\"']https?://", html)  # plotly.js inlined
    assert "Primary claims" in html and "Suite configuration" in html and "Refusal measure" in html
    assert "Exploratory claims" in html and "Not confirmatory" in html and "corrected p" in html
    m = findings["refusal_measure"]  # every refusal count names its measure; no judge by default
    assert m["decision"] == "substring+coherence" and m["judge"] is None
    assert m["coherence"]["nll_threshold"] > 0 and m["coherence"]["false_positive_rate"]["n"] > 0
    for name in _claim_functions():
        assert name in html
    tiny_run["findings"] = findings
    tiny_run["html"] = reports / "hypotheses.html"
    tiny_run["n_tests"] = sum(outcomes.get(k, 0) for k in ("passed", "failed", "skipped"))


@pytest.mark.slow
def test_no_claim_judges_on_prompts_it_selected_on(tiny_run):
    """Every fixture's selection prompts (rankings, means, directions, probes, refusal tokens) are disjoint from
    the prompts its claims are judged on."""
    if "findings" not in tiny_run:
        pytest.skip("the suite run did not complete")
    use = tiny_run["findings"]["data_use"]
    assert len(use) >= 10
    for nodeid, roles in use.items():
        assert roles.get("judge"), f"{nodeid} records no judged prompts"
        overlap = set(roles.get("select", ())) & set(roles["judge"])
        assert not overlap, f"{nodeid} judges on prompts it selected on: {sorted(overlap)[:5]}"


@pytest.mark.slow
def test_default_gate_marks_a_non_refusing_model_not_tested(pytester: pytest.Pytester, tiny_run):
    """With the shipped configuration, a model that does not refuse gets NOT supported baselines and no
    downstream claim is tested, each saying why (the machinery of the smollm2 negative control)."""
    result, reports = run_suite(pytester, tiny_run["model_dir"], tiny_run["work"] / "gate", "--verdict-exit")
    assert result.ret == 0, result.stdout.str()[-3000:]
    findings = json.loads((reports / "findings.json").read_text())
    claims = findings["claims"]
    assert not findings["gate"]["ok"] and not findings["gate"]["open"] and not findings["gate"]["passed"]
    assert [c["verdict"] for c in claims if c["primary"] and c["hypothesis"] == "baseline"] == ["NOT supported"]
    downstream = [c for c in claims if c["hypothesis"] != "baseline"]
    assert downstream and all(c["verdict"] == "not tested" for c in downstream)
    assert all("no refusal to explain" in c["message"] for c in downstream)


@pytest.mark.slow
def test_partial_run_keeps_the_last_complete_report(pytester: pytest.Pytester, tiny_run):
    if "findings" not in tiny_run:
        pytest.skip("the suite run did not complete")
    reports = tiny_run["html"].parent
    before = {p: p.read_bytes() for p in (reports / "findings.json", reports / "hypotheses.html")}
    result, _ = run_suite(pytester, tiny_run["model_dir"], tiny_run["work"], "-k", "baseline", *TINY_SET)
    assert result.ret in (0, 1)
    assert {p: p.read_bytes() for p in before} == before, "a -k run overwrote the complete report"
    partial = json.loads((reports / "findings.partial.json").read_text())
    assert not partial["run"]["complete"] and partial["run"]["keyword"] == "baseline"
    assert all(c["hypothesis"] == "baseline" for c in partial["claims"])
    assert "Partial run" in (reports / "hypotheses.partial.html").read_text()


@pytest.mark.slow
def test_suite_under_xdist_gives_the_same_findings(pytester: pytest.Pytester, tiny_run):
    """``-n 2`` on a fresh cache: two workers share the sweeps through the cache, and every claim comes out
    with the same verdict and numbers as the serial run."""
    if "findings" not in tiny_run:
        pytest.skip("the serial suite run did not complete")
    result, reports = run_suite(pytester, tiny_run["model_dir"], tiny_run["work"] / "xdist", "-n", "2", *TINY_SET)
    assert result.ret in (0, 1), result.stdout.str()[-3000:]
    serial = {c["id"]: c for c in tiny_run["findings"]["claims"]}
    parallel = {c["id"]: c for c in json.loads((reports / "findings.json").read_text())["claims"]}
    assert parallel.keys() == serial.keys()
    for nodeid, c in serial.items():
        assert parallel[nodeid]["verdict"] == c["verdict"], nodeid
        for key in ("numbers", "statistic", "p_value", "p_adjusted", "effect", "ci"):
            assert json.dumps(parallel[nodeid][key], sort_keys=True) == json.dumps(c[key], sort_keys=True), (nodeid, key)


@pytest.mark.slow
def test_report_reads_top_down_in_a_real_browser(tiny_run, browser_page, record_property):
    """The page of a run with NOT supported claims, in headless Chromium: one section per hypothesis in the
    argument's order, the forest plot and every figure drawn (also those inside the expandable rows), figures
    export as SVG offline, verdict words only (no Failed / Passed / Skipped), no traceback or repr dump, no
    request leaving the page. Its height and size are recorded (``page_height_px``, ``page_bytes``)."""
    if "html" not in tiny_run:
        pytest.skip("the suite run above did not produce a report")
    from fixtures.families import HYPOTHESES

    claims = tiny_run["findings"]["claims"]
    assert any(c["verdict"] == "NOT supported" for c in claims), "the tiny run has no NOT supported claim"
    order = [label for label, _ in HYPOTHESES.values()]
    ready = "document.querySelector('#summary ~ figure div.mech-fig svg.main-svg') !== null"  # the forest plot
    with browser_page(tiny_run["html"].as_uri(), ready) as (page, requests):
        height = page.evaluate("document.documentElement.scrollHeight")
        sections = page.eval_on_selector_all("h2[id^='h-']", "els => els.map(e => e.id.slice(2))")
        forest_points = page.locator("#summary ~ figure div.mech-fig").first.locator("g.points path").count()
        closed_text = page.inner_text("body")
        shown = page.evaluate("[...document.querySelectorAll('div.mech-fig')].filter(d => d.offsetParent !== null)"
                              ".every(d => d.querySelector('svg.main-svg'))")
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
        page.wait_for_function("[...document.querySelectorAll('div.mech-fig')].every(d => d.querySelector('svg.main-svg'))",
                               timeout=60_000)
        figs = page.locator("div.mech-fig").count()
        text = page.inner_text("body")
        svg = page.evaluate("Plotly.toImage(document.querySelector('div.mech-fig'), {format: 'svg'})")
    record_property("page_height_px", height)
    record_property("page_bytes", tiny_run["html"].stat().st_size)
    assert sections == [h for h in order if any(c["hypothesis"] == h for c in claims)] == order
    assert forest_points == sum(c["effect"] is not None for c in claims if c["primary"]) >= 3
    assert shown, "a figure in view was not drawn"
    assert figs >= 10, f"only {figs} figures"
    assert svg.startswith("data:image/svg+xml")
    for t in (closed_text, text):
        assert not re.search(r"\b(Failed|Passed|Skipped|FAILED|PASSED|SKIPPED)\b", t)
        assert not re.search(r"<fixtures\.|object at 0x|Traceback|def test_|SuiteConfig\(", t)
    for name in _claim_functions():  # every claim is on the page (its pytest id in its expanded row)
        assert name in text
    assert "not calibrated" in closed_text  # no calibration.json beside this run
    assert not [u for u in requests if not u.startswith(("file:", "data:", "blob:"))], f"the page fetched {requests}"
    assert [u for u in requests if u.startswith("file:")] == [tiny_run["html"].as_uri()]
    assert height < 12_000, f"the page is {height} px tall"


@pytest.mark.parametrize("args, msg", [
    (["--workers", "0"], "--workers must be a positive integer, got '0'"),
    (["--max-memory", "gpu=1GB"], "--max-memory: unknown device 'gpu'"),
    (["--max-memory", "cpu=lots"], "--max-memory: bad size 'lots'"),
    (["--device-map", "half"], "--device-map 'half' is not one of none, auto"),
    (["--eval-prompts", "/nonexistent.csv"], "--eval-prompts: /nonexistent.csv: file not found"),
])
def test_bad_scale_options_are_one_line_usage_errors(pytester: pytest.Pytester, args, msg):
    result = pytester.runpytest_subprocess(str(ROOT / "hypotheses"), "--rootdir", str(ROOT), "-c",
                                           str(ROOT / "pyproject.toml"), "-p", "no:cacheprovider", "--co", *args)
    assert result.ret != 0
    errors = [line for line in result.stderr.lines + result.stdout.lines if line.startswith("ERROR:")]
    assert len(errors) == 1 and msg in errors[0], errors


_SYNTHETIC = """
import pytest

pytestmark = [pytest.mark.localized_circuit]


@pytest.mark.primary
def test_holds(claim):
    \"\"\"A claim whose assertion holds.\"\"\"
    claim.result(p_value=0.001, effect=1.0, n=10, test="t")
    assert True


def test_refuted(claim):
    \"\"\"A claim whose assertion fails.\"\"\"
    claim.result(p_value=0.5, n=10, test="t")
    assert 0.5 < 0.05, "p = 0.5"


def test_crashes(claim):
    \"\"\"A claim whose code has a bug.\"\"\"
    {}["missing"]


def test_library_assert(claim):
    \"\"\"An assert inside a helper, not the claim: a bug.\"\"\"
    from helper import check
    check()


@pytest.fixture
def broken():
    raise RuntimeError("fixture bug")


def test_setup_error(broken, claim):
    \"\"\"A claim whose fixture crashes.\"\"\"


def test_untestable(claim):
    \"\"\"A claim the data cannot support.\"\"\"
    pytest.skip("the model refuses 2 of 33 harmful prompts")
"""


@pytest.mark.parametrize("verdict_exit", [False, True])
def test_verdicts_and_exit_codes(pytester: pytest.Pytester, tmp_path: Path, monkeypatch, verdict_exit: bool):
    """An assert in the claim is NOT supported; any other exception (call, setup, or an assert in a helper) is
    an error, never a finding; a skip is not tested with its reason. --verdict-exit exits 1 on errors."""
    pytester.makeconftest('pytest_plugins = ["fixtures.options", "fixtures.config", "fixtures.report"]\n'
                          'def pytest_configure(config):\n'
                          '    config.addinivalue_line("markers", "localized_circuit: H1")\n')
    pytester.makepyfile(helper="def check():\n    assert 1 == 2, 'inside the library'\n")
    pytester.makepyfile(test_claims=_SYNTHETIC)
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{pytester.path}")
    monkeypatch.setenv("MECH_REPORTS_DIR", str(tmp_path))
    args = ["-p", "no:cacheprovider", "-q"] + (["--verdict-exit"] if verdict_exit else [])
    result = pytester.runpytest_subprocess(*args)
    findings = json.loads((tmp_path / "findings.partial.json").read_text())  # not the whole hypotheses/ suite
    got = {c["id"].split("::")[1]: c for c in findings["claims"]}
    assert {k: c["verdict"] for k, c in got.items()} == {
        "test_holds": "supported", "test_refuted": "NOT supported", "test_crashes": "error",
        "test_library_assert": "error", "test_setup_error": "error", "test_untestable": "not tested"}
    assert "KeyError" in got["test_crashes"]["message"] and "fixture bug" in got["test_setup_error"]["message"]
    assert got["test_untestable"]["message"] == "the model refuses 2 of 33 harmful prompts"
    assert got["test_holds"]["p_adjusted"] == 0.001  # the only primary: Holm over one test
    assert findings["summary"]["error"] == 3
    assert result.ret == 1  # errors: non-zero either way (pytest: failures; --verdict-exit: errors)


def _rows_file(path: Path, *, pair_ids: bool = True, harmless: bool = True, single: bool = False) -> Path:
    ps = default_pairs()
    rows = []
    for cat in ("cybercrime", "fraud"):
        for h, s in ps.by_category(cat).pairs()[:8]:
            rows += [h, s] if harmless else [h]
    if single:
        rows.append(ps.by_category("drugs").harmful().prompts[0])
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "prompt", "label", "category"] + (["pair_id"] if pair_ids else []))
        for p in rows:
            w.writerow([p.id, p.prompt, p.label, p.category] + ([p.pair_id] if pair_ids else []))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind, reason", [
    ("no_pair_id", "matched (harmful, harmless) pairs"),
    ("harmful_only", "no harmless train or validation prompts"),
    ("single_row_category", None),
])
def test_what_the_prompt_set_cannot_support_is_not_tested(pytester: pytest.Pytester, tiny_run, kind, reason):
    """A valid prompt file without pair_id, with only harmful rows, or with a one-row category: every claim gets
    a verdict (claims it cannot support are `not tested`, saying why), none crashes."""
    work = tiny_run["work"] / kind
    work.mkdir()
    f = _rows_file(work / "rows.csv", pair_ids=kind != "no_pair_id", harmless=kind != "harmful_only",
                   single=kind == "single_row_category")
    reports = work / "reports"
    os.environ["MECH_REPORTS_DIR"] = str(reports)
    try:
        result = pytester.runpytest_subprocess(
            str(ROOT / "hypotheses"), "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
            "--model", str(tiny_run["model_dir"]), "--prompts", str(f), "--cache-dir", str(work / "cache"),
            "--max-new-tokens", "4", "-p", "no:cacheprovider", "-q", "--tb=line", "--verdict-exit", *TINY_SET,
            timeout=900)
    finally:
        del os.environ["MECH_REPORTS_DIR"]
    claims = json.loads((reports / "findings.json").read_text())["claims"]
    errors = [(c["id"], c["message"]) for c in claims if c["verdict"] == "error"]
    assert not errors and result.ret == 0, errors or result.stdout.str()[-2000:]
    if reason:
        assert any(reason in c["message"] for c in claims if c["verdict"] == "not tested"), \
            [c["message"] for c in claims if c["verdict"] == "not tested"]


@pytest.mark.slow
def test_eval_prompts_judge_on_a_harmful_only_benchmark(pytester: pytest.Pytester, tiny_run):
    """--eval-prompts: a harmful-only benchmark is judged on, training and selection stay on --prompts. The
    baseline rate is the benchmark's, H1's ablation is judged on the benchmark, claims needing harmless twins in
    the test data are `not tested` with a reason, and nothing errs."""
    work = tiny_run["work"] / "eval"
    work.mkdir(parents=True, exist_ok=True)
    bench = work / "bench.csv"
    harmful = [p for c in ("violence", "weapons") for p in default_pairs().by_category(c).harmful()][:16]
    with open(bench, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "prompt", "label", "category"])
        for p in harmful:
            w.writerow([p.id, p.prompt, "harmful", p.category])
    result, reports = run_suite(pytester, tiny_run["model_dir"], work, "--verdict-exit", *TINY_SET,
                                "--eval-prompts", str(bench))
    assert result.ret == 0, result.stdout.str()[-3000:]
    findings = json.loads((reports / "findings.json").read_text())
    by_name = {c["id"].split("::")[1]: c for c in findings["claims"]}
    assert by_name["test_harmful_refusal_rate"]["n"] == 16  # the benchmark's harmful prompts, not the pairs'
    h1 = findings["data_use"]["hypotheses/test_localized_circuit.py::test_ranked_heads_beat_layer_matched_random"]
    judged_h = {i for i in h1["judge"] if i.startswith("eval:")}
    assert judged_h == {f"eval:{p.id}" for p in harmful}
    assert not set(h1["select"]) & set(h1["judge"])
    assert by_name["test_ranked_heads_beat_layer_matched_random"]["verdict"] != "not tested"
    for name in ("test_heads_transfer_beyond_random", "test_resid_patching_rises_in_middle_band"):
        assert by_name[name]["verdict"] == "not tested" and by_name[name]["message"], name
