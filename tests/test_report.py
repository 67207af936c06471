"""End to end: the whole hypothesis suite on a tiny local model (run with pytester), its findings.json and
self-contained HTML report, and that report opened in a real headless browser (Debian's Chromium, driven by
Playwright). Verdicts on a random tiny model are meaningless; what is checked is that every claim runs,
records its statistics, and shows up with its figures."""

from __future__ import annotations

import ast
import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from fixtures.tiny_models import build_tiny_model
from mech.prompts import default_pairs

ROOT = Path(__file__).resolve().parents[1]
_RUN: dict[str, Path] = {}


def _claim_functions() -> set[str]:
    """Names of every test in hypotheses/ that reports through the ``claim`` fixture."""
    names = set()
    for f in (ROOT / "hypotheses").glob("test_*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                if "claim" in [a.arg for a in node.args.args]:
                    names.add(node.name)
    return names


def _small_prompt_file(path: Path) -> Path:
    ps = default_pairs()
    rows = []
    for cat in ("cybercrime", "fraud"):
        for h, s in ps.by_category(cat).pairs()[:6]:
            rows += [h, s]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "prompt", "label", "category", "pair_id"])
        for p in rows:
            w.writerow([p.id, p.prompt, p.label, p.category, p.pair_id])
    return path


@pytest.mark.slow
def test_suite_runs_on_a_tiny_model(pytester: pytest.Pytester, tmp_path: Path, monkeypatch):
    tiny = build_tiny_model("qwen2", seed=0)
    model_dir = tmp_path / "tiny-qwen2"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    reports = tmp_path / "reports"
    monkeypatch.setenv("MECH_REPORTS_DIR", str(reports))
    result = pytester.runpytest_subprocess(
        str(ROOT / "hypotheses"),
        "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
        "--model", str(model_dir), "--prompts", str(_small_prompt_file(tmp_path / "prompts.csv")),
        "--cache-dir", str(tmp_path / "cache"), "--max-new-tokens", "4",
        "-p", "no:cacheprovider", "-q", "--tb=line",
        timeout=900,
    )
    outcomes = result.parseoutcomes()
    assert "errors" not in outcomes and "error" not in outcomes, result.stdout.str()[-3000:]
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) > 0

    findings = json.loads((reports / "findings.json").read_text())
    got = {nodeid.split("::")[1].split("[")[0] for nodeid in findings["findings"]}
    assert got == _claim_functions(), f"claims missing from findings.json: {_claim_functions() - got}"
    for nodeid, f in findings["findings"].items():
        assert f["verdict"] in ("supported", "NOT supported"), nodeid
        assert f["numbers"], f"{nodeid} recorded no statistics"
        assert f["doc"], f"{nodeid} states no claim"
    assert findings["summary"]["claims"] == len(findings["findings"])
    assert json.loads((reports / "baseline.json").read_text())["categories"]["all"]["harmful"]["n"] == 12

    html = (reports / "hypotheses.html").read_text()
    assert "Plotly" in html and not re.search(r"<script[^>]+src=[\"']https?://", html)  # plotly.js inlined
    for name in _claim_functions():
        assert name in html
    _RUN["html"] = reports / "hypotheses.html"
    _RUN["n_tests"] = outcomes.get("passed", 0) + outcomes.get("failed", 0) + outcomes.get("skipped", 0)
    _RUN["model_dir"], _RUN["findings"] = model_dir, findings


@pytest.mark.slow
def test_suite_under_xdist_gives_the_same_findings(pytester: pytest.Pytester, tmp_path: Path, monkeypatch):
    """``-n 2`` on a fresh cache: two workers share the sweeps through the cache's file locks, and every claim
    comes out with the same verdict and numbers as the serial run."""
    if "findings" not in _RUN:
        pytest.skip("the serial suite run did not complete")
    reports = tmp_path / "reports"
    monkeypatch.setenv("MECH_REPORTS_DIR", str(reports))
    result = pytester.runpytest_subprocess(
        str(ROOT / "hypotheses"), "-n", "2",
        "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
        "--model", str(_RUN["model_dir"]), "--prompts", str(_small_prompt_file(tmp_path / "prompts.csv")),
        "--cache-dir", str(tmp_path / "cache"), "--max-new-tokens", "4",
        "-p", "no:cacheprovider", "-q", "--tb=line",
        timeout=900,
    )
    outcomes = result.parseoutcomes()
    assert "errors" not in outcomes and "error" not in outcomes, result.stdout.str()[-3000:]
    serial = _RUN["findings"]["findings"]
    parallel = json.loads((reports / "findings.json").read_text())["findings"]
    assert parallel.keys() == serial.keys()
    for nodeid, f in serial.items():
        assert parallel[nodeid]["verdict"] == f["verdict"], nodeid
        assert json.dumps(parallel[nodeid]["numbers"], sort_keys=True) == json.dumps(f["numbers"], sort_keys=True), nodeid


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.slow
def test_report_renders_in_a_real_browser():
    if "html" not in _RUN:
        pytest.skip("the suite run above did not produce a report")
    browser = _chromium()
    assert browser, "Chromium is missing: `make setup` installs Debian's chromium package"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = b.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(_RUN["html"].as_uri())
            page.wait_for_function("document.querySelectorAll('div.mech-fig').length > 0 && "
                                   "[...document.querySelectorAll('div.mech-fig')].every(d => d.querySelector('svg.main-svg'))",
                                   timeout=30_000)
            rows = page.locator("tbody.results-table-row").count()
            figs = page.locator("div.mech-fig").count()
            drawn = page.locator("div.mech-fig svg.main-svg").count()
            claims_text = page.inner_text("#results-table")
        finally:
            b.close()
    assert rows == _RUN["n_tests"], f"{rows} rows for {_RUN['n_tests']} tests"
    assert figs >= 8 and drawn >= figs, f"{figs} figures, {drawn} drawn"
    for name in _claim_functions():
        assert name in claims_text
    assert not [u for u in requests if u.startswith("http")], f"the report fetched {requests}"


@pytest.mark.parametrize("args, msg", [
    (["--workers", "0"], "--workers must be a positive integer, got '0'"),
    (["--max-memory", "gpu=1GB"], "--max-memory: unknown device 'gpu'"),
    (["--max-memory", "cpu=lots"], "--max-memory: bad size 'lots'"),
    (["--device-map", "half"], "--device-map 'half' is not one of none, auto"),
])
def test_bad_scale_options_are_one_line_usage_errors(pytester: pytest.Pytester, args, msg):
    result = pytester.runpytest_subprocess(str(ROOT / "hypotheses"), "--rootdir", str(ROOT), "-c",
                                           str(ROOT / "pyproject.toml"), "-p", "no:cacheprovider", "--co", *args)
    assert result.ret != 0
    errors = [line for line in result.stderr.lines + result.stdout.lines if line.startswith("ERROR:")]
    assert len(errors) == 1 and msg in errors[0], errors
