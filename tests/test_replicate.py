"""``python -m runner replicate`` end to end on two tiny local models and two small prompt sets (one harmful-only):
the runs, a kill in the middle and the resume (finished runs reused, the killed run's cached sweeps read, not
recomputed), replication.json, replication.md, and replication.html opened in headless Chromium with every cell
and forest plot drawn. Then the one-line refusals of bad input and of a model that does not fit, before anything
runs (also through ``python -m mech replicate``, which hands over to the runner); the page's verdict grid, its
links and the stability section, and the markdown table, from synthetic runs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from html.parser import HTMLParser
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
            "n_random_per_category=2", "n_selection_null=2", "n_substrate_prompts=3", "n_cov_directions=2", "n_shuffled_directions=2",
            "n_control_prompts=3", "control_max_new_tokens=3", "n_random_addition=2", "max_new_tokens=4", "n_rank_pairs=6", "n_mean_prompts=6", "n_token_probes=6",
            "n_dim_train=6", "n_select_val=3", "length_probe_tokens=8"]


def _snapshot(work: Path) -> Path:
    """A copy of the library, the suite and its data: the replication runs on it, so edits to the working tree
    while this test runs cannot change its code (a finished run is reused only while the code is unchanged)."""
    repo = work / "repo"
    for d in ("mech", "fixtures", "hypotheses", "data", "runner"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("conftest.py", "pyproject.toml"):
        shutil.copy2(ROOT / f, repo / f)
    return repo


def _cmd(work: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "runner", "replicate", "--models",
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
    # every run's report, as the page links it, is a file beside replication.html; the markdown table has a column
    # per run and a row per primary
    for run in rep["runs"]:
        assert (replication["reports"] / run["report"]).is_file(), run["report"]
    md = (replication["reports"] / "replication.md").read_text().splitlines()
    assert md[0].split(" | ")[1:] == [*run_ids[:-1], run_ids[-1] + " |"]
    assert sum(ln.startswith(("| baseline:", "| H1:", "| H2:", "| H3:", "| H4:")) for ln in md) == 5 + 3


@pytest.mark.slow
def test_replication_html_draws_every_cell_and_forest_plot(replication, browser_page):
    rep = json.loads((replication["reports"] / "replication.json").read_text())
    page_file = replication["reports"] / "replication.html"
    assert "<script src=" not in page_file.read_text()[:2000]  # plotly.js inlined, no CDN
    ready = "[...document.querySelectorAll('div.mech-forest, div.mech-depth')].every(d => d.querySelector('svg.main-svg'))"
    with browser_page(page_file.as_uri(), ready) as (page, requests):
        cells = page.locator("#verdict-grid td.cell")
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


def _run_cli(*args: str, cwd: Path = ROOT, entry: str = "runner") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", entry, "replicate", *args], cwd=cwd, env=_env(),
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
    from runner.replicate.run import preflight, pytest_args
    from runner.replicate.specs import ReplicationError, plan_runs

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
    args = pytest_args(ev, opts)
    assert "--prompts" not in args and args[args.index("--eval-prompts") + 1] == str(bench.resolve())
    assert "--eval-prompts" not in pytest_args(pairs, opts)
    claims = preflight(ev, opts, tmp_path / "work")
    assert any("test_harmful_refusal_rate" in c for c in claims)
    leak = plan_runs([str(tmp_path / "tiny")], [f"eval:{leaky}"])[0]
    with pytest.raises(ReplicationError, match="have the text of a prompt that selects"):
        preflight(leak, opts, tmp_path / "work2")


def test_a_model_whose_extra_is_not_installed_names_the_extra(tmp_path: Path, monkeypatch):
    from mech import registry
    from runner.replicate.main import replicate
    from runner.replicate.specs import ReplicationError

    spec = registry.ModelSpec(name="absent-model", gguf_name="absent.gguf", sha256="0" * 64, size=1,
                            dists=("mech-test-absent-wheel-part1",), members=("absent/part01.bin",),
                            install_hint="pip install 'mech[absent]'")
    monkeypatch.setitem(registry.REGISTRY, "absent-model", spec)
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
    from runner.replicate.figures import depth_figure, forest_figure
    from runner.replicate.gather import gather, grid
    from runner.replicate.page import render_html
    from runner.replicate.run import RunResult
    from runner.replicate.specs import plan_runs

    ok, crashed = plan_runs(["tiny-a", "tiny-b"], ["pairs"])
    claim = {"id": "hypotheses/test_baseline.py::test_harmful_refusal_rate", "hypothesis": "baseline",
             "primary": True, "verdict": "NOT supported", "effect": -0.5, "ci": [-0.6, -0.4], "n": 16,
             "p_value": 1.0, "p_adjusted": 1.0, "message": "p = 1", "claim": "PRIMARY. Harmful prompts are refused."}
    results = [RunResult(ok, tmp_path / "a", "complete", exit_status=1, wall_s=1.0, findings={"claims": [claim]}),
               RunResult(crashed, tmp_path / "b", "error", exit_status=-9, wall_s=2.0,
                         message="killed by signal 9: (see pytest.log)")]
    collected = ["hypotheses/test_baseline.py::test_harmful_refusal_rate",
                 "hypotheses/test_single_direction.py::test_directional_ablation_removes_refusal"]
    rows = gather(results, collected)
    assert [r["hypothesis"] for r in rows] == ["baseline", "H4"]
    base, h4 = rows
    assert base["cells"][ok.id]["verdict"] == "NOT supported" and base["cells"][ok.id]["effect"] == -0.5
    assert base["cells"][crashed.id] == {"verdict": "error", "message": "killed by signal 9: (see pytest.log)"}
    assert h4["cells"][ok.id]["verdict"] == "error" and "missing" in h4["cells"][ok.id]["message"]
    fig = forest_figure(base, [ok, crashed])
    assert [t.name for t in fig.data] == ["NOT supported", "no effect"] and list(fig.data[1].text) == ["error"]
    report = {"created": "now", "command": ["python", "-m", "runner", "replicate"], "wall_s": 3.0, "memory": [],
              "depth": [], "claims": rows, "grid": grid(results, collected), "stability": [],
              "runs": [{"id": r.spec.id, "model": r.spec.model, "prompts": r.spec.prompts, "status": r.status,
                        "reused": False, "wall_s": r.wall_s, "peak_rss_gb": None, "message": r.message,
                        "summary": None} for r in results]}
    page = render_html(report, {r["id"]: forest_figure(r, [ok, crashed]) for r in rows} | {"__depth__": depth_figure([])})
    assert page.count('data-verdict="error"') == 3 and page.count('class="cell"') == 4


def test_the_precision_axis_runs_each_dtype(tmp_path: Path):
    """``--dtype float32,bfloat16``: one run per dtype (ids end in the dtype), each passing its own --dtype to the
    suite and keying its stamp by it; a bad dtype is one line before anything runs."""
    from runner.replicate.run import pytest_args, stamp_key
    from runner.replicate.specs import ReplicationError, parse_dtypes, plan_runs

    dts = parse_dtypes("float32, bfloat16,float32")
    assert dts == ["float32", "bfloat16"]
    runs = plan_runs(["m"], ["pairs"], dts)
    assert [(r.id, r.dtype) for r in runs] == [("m__pairs__float32", "float32"), ("m__pairs__bfloat16", "bfloat16")]
    assert [r.id for r in plan_runs(["m"], ["pairs"])] == ["m__pairs"]  # one dtype: ids as before
    opts = {"cache_dir": tmp_path, "device": "cpu", "quantize": "none", "set": []}
    for r in runs:
        args = pytest_args(r, opts)
        assert args[args.index("--dtype") + 1] == r.dtype
    assert stamp_key(runs[0], opts, "c") != stamp_key(runs[1], opts, "c")
    for bad in ("fp8", "", "float32,int4"):
        with pytest.raises(ReplicationError) as e:
            parse_dtypes(bad)
        assert "\n" not in str(e.value) and "float32,bfloat16" in str(e.value)


def test_a_stamp_key_ignores_how_a_run_shows_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """MECH_NO_PROGRESS and MECH_VERDICT_EXIT change the display and the exit code, never a result: a run finished
    with them is reused without them; an env var that changes what is computed (MECH_JUDGE) still changes the key."""
    from runner.replicate.run import stamp_key
    from runner.replicate.specs import plan_runs

    run = plan_runs(["m"], ["pairs"])[0]
    opts = {"cache_dir": tmp_path, "device": "cpu", "quantize": "none", "set": []}
    for k in ("MECH_NO_PROGRESS", "MECH_VERDICT_EXIT", "MECH_JUDGE"):
        monkeypatch.delenv(k, raising=False)
    plain = stamp_key(run, opts, "c")
    monkeypatch.setenv("MECH_NO_PROGRESS", "1")
    monkeypatch.setenv("MECH_VERDICT_EXIT", "1")
    assert stamp_key(run, opts, "c") == plain
    monkeypatch.setenv("MECH_JUDGE", "none")
    assert stamp_key(run, opts, "c") != plain


def test_kill_stops_the_runner_and_its_suite_run(tmp_path: Path):
    """``kill PID`` (SIGTERM) of a runner, started as a background job ignores SIGINT, stops it as Ctrl-C does: the
    suite run it waits on gets SIGINT and exits, no orphan goes on writing into the run folder, the runner exits
    130 and the stamp is not written (the run is re-run next time)."""
    pidfile = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import signal, sys
        from pathlib import Path
        import runner.replicate.run as r
        from runner.replicate.specs import plan_runs
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job
        r.stop_like_ctrl_c()
        r.pytest_args = lambda spec, opts, extra=(): [sys.executable, "-c",
            "import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"]
        opts = {{"cache_dir": {str(tmp_path)!r}, "device": "cpu", "quantize": "none", "set": []}}
        try:
            r.run_one(plan_runs(["m"], ["pairs"])[0], opts, Path({str(tmp_path)!r}), "c")
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not (pidfile.is_file() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pidfile.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the suite run {child} outlived its runner")
    assert not list(tmp_path.glob("replication/*/run.json"))


def test_python_m_mech_replicate_hands_over_to_the_runner(tmp_path: Path):
    """The library's command line keeps ``replicate`` for its users by starting the runner in a new process (the
    library imports nothing above it): the same one-line refusal, before anything runs."""
    res = _run_cli("--models", "no-such-model", "--out", str(tmp_path / "reports"), entry="mech")
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "--models no-such-model: unknown model" in errors[0], res.stderr
    assert not (tmp_path / "reports").exists()


# ------------------------------------------------------------------------------ the page and the table, synthetic

_PRIMARIES = {  # hypothesis -> (claim id, numbers the depths read)
    "baseline": ("hypotheses/test_baseline.py::test_harmful_refusal_rate", {}),
    "H1": ("hypotheses/test_localized_circuit.py::test_ranked_heads_beat_layer_matched_random",
           {"heads": ["L10.H3", "L20.H1"]}),
    "H2": ("hypotheses/test_layer_hierarchy.py::test_harmfulness_decodable_early", {"layer": 6}),
    "H3": ("hypotheses/test_shared_substrate.py::test_categories_share_heads", {}),
    "H4": ("hypotheses/test_single_direction.py::test_directional_ablation_removes_refusal", {"layer": 14}),
}
_EXPLORATORY = "hypotheses/test_layer_hierarchy.py::test_refusal_written_late[layer20]"


def _claim(hyp: str, verdict: str, stability: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    cid, numbers = _PRIMARIES[hyp]
    numbers = dict(numbers) | ({"stability": stability} if stability is not None else {})
    return {"id": cid, "hypothesis": hyp, "primary": True, "verdict": verdict, "effect": 0.42, "ci": [0.3, 0.55],
            "n": 40, "p_value": 0.001, "p_adjusted": 0.004, "message": f"{hyp} says | so", "claim": f"{hyp} claim",
            "numbers": numbers} | kw


def _stab(rec: float, flagged: bool | None = None, selected: Any = 14) -> dict[str, Any]:
    s = {"B": 20, "selected": selected, "recurrence": rec, "distribution": {"14": int(rec * 20), "15": 20 - int(rec * 20)}}
    return s if flagged is None else s | {"flagged": flagged}


def _synthetic_runs(tmp_path: Path, stability: bool = True) -> tuple[list[Any], list[str]]:
    """Three runs: the default model in float32 (a complete suite run: findings.json) and bfloat16 (a ``-m
    primary`` run: findings.partial.json) with an exploratory claim too, and a run of a second model that crashed."""
    from runner.replicate.run import RunResult
    from runner.replicate.specs import RunSpec, plan_runs

    f32, bf16 = plan_runs(["m"], ["pairs"], ["float32", "bfloat16"])
    crashed = RunSpec("m2__pairs", "m2|odd", "pairs", "m2", "pairs")  # a pipe the table must escape
    stab = {
        "float32": {"H4": {"layer_pos": _stab(0.9)}, "H1": {"top_k_heads": _stab(0.3, selected=["L10.H3"])}},
        "bfloat16": {"H4": {"layer_pos": _stab(0.45)}, "H1": {"top_k_heads": _stab(0.6, flagged=False)}},
    }
    results = []
    for spec, name in ((f32, "findings.json"), (bf16, "findings.partial.json")):
        d = tmp_path / "replication" / spec.id
        d.mkdir(parents=True)
        claims = [_claim(h, "NOT supported" if h == "H3" else "supported",
                         (stab[spec.dtype].get(h) if stability else None)) for h in _PRIMARIES]
        if spec.dtype == "bfloat16":
            claims.append({"id": _EXPLORATORY, "hypothesis": "H2", "primary": False, "verdict": "not tested",
                           "message": "no late layer", "claim": "exploratory", "numbers": {}})
        findings = {"claims": claims, "model": {"n_layers": 24}, "summary": {"supported": 4, "not_supported": 1}}
        (d / name).write_text(json.dumps(findings))
        results.append(RunResult(spec, d, "complete", exit_status=1, wall_s=100.0, peak_rss_gb=2.0,
                                 findings=findings))
    d = tmp_path / "replication" / crashed.id
    d.mkdir(parents=True)
    (d / "pytest.log").write_text("Killed\n")
    results.append(RunResult(crashed, d, "error", exit_status=-9, wall_s=5.0, message="killed by signal 9"))
    return results, [c for c, _ in _PRIMARIES.values()]


def _report(tmp_path: Path, stability: bool = True) -> tuple[dict[str, Any], list[Any]]:
    from runner.replicate.main import build_report, write_report

    results, collected = _synthetic_runs(tmp_path, stability)
    rep = build_report(results, collected, tmp_path / "cache", [], {}, ["python", "-m", "runner", "replicate"], 1.0)
    write_report(rep, results, tmp_path)
    return rep, results


class _Cells(HTMLParser):
    """The grid's cells (their attributes and link) and the stability cells of a replication page."""

    def __init__(self) -> None:
        super().__init__()
        self.grid: list[dict[str, Any]] = []
        self.stab: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self._td: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(str(a["id"]))
        cls = (a.get("class") or "").split()
        if tag == "td" and "cell" in cls:
            self._td = a
            self.grid.append(a)
        elif tag == "td" and "stab" in cls:
            self.stab.append(a)
        elif tag == "a" and self._td is not None:
            self._td["href"] = a.get("href")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._td = None


def test_the_verdict_grid_links_every_cell_to_its_run_report(tmp_path: Path):
    """The page reads top-down (grid, forest plots, depths, stability, runs); the grid has a row per claim, the
    primaries first in the order of the hypotheses, a cell per run coloured by its verdict and linked to the claim
    on that run's own report (``replication/<run>/hypotheses[.partial].html#<claim>``, the log of a crashed run)."""
    from fixtures.report_html import COLOR, claim_anchor

    rep, results = _report(tmp_path)
    page = (tmp_path / "replication.html").read_text()
    p = _Cells()
    p.feed(page)
    assert [r["hypothesis"] for r in rep["grid"]] == ["baseline", "H1", "H2", "H3", "H4", "H2"]
    assert [r["primary"] for r in rep["grid"]] == [True] * 5 + [False]
    run_ids = ["m__pairs__float32", "m__pairs__bfloat16", "m2__pairs"]
    assert [r["id"] for r in rep["runs"]] == run_ids
    assert len(p.grid) == 6 * 3
    pages = {"m__pairs__float32": "hypotheses.html", "m__pairs__bfloat16": "hypotheses.partial.html"}
    for i, row in enumerate(rep["grid"]):
        nodeid = "hypotheses/" + row["id"]
        for j, rid in enumerate(run_ids):
            cell = p.grid[3 * i + j]
            assert (cell["data-claim"], cell["data-run"]) == (row["id"], rid)
            v = cell["data-verdict"]
            assert f"background:{COLOR[v]}" in cell["style"] and f"solid {COLOR[v]}" in cell["style"]
            if rid == "m2__pairs":
                assert v == "error" and cell["href"] == "replication/m2__pairs/pytest.log"
            else:
                assert cell["href"] == f"replication/{rid}/{pages[rid]}#{claim_anchor({'id': nodeid})}"
    # the float32 run has no exploratory claim: an error cell saying so, never a verdict
    assert p.grid[3 * 5]["data-verdict"] == "error" and p.grid[3 * 5 + 1]["data-verdict"] == "not tested"
    assert [c["data-verdict"] for c in p.grid[:3]] == ["supported", "supported", "error"]
    assert [c["data-verdict"] for c in p.grid[9:12]] == ["NOT supported", "NOT supported", "error"]
    order = [page.index(s) for s in ("id='verdict-grid'", "class='mech-forest'", "class='mech-depth'",
                                     "id='stability-table'", "id='runs-table'")]
    assert order == sorted(order)
    assert "replication.md" in {f.name for f in tmp_path.iterdir()}


def test_stability_is_shown_per_run_and_flagged_below_one_half(tmp_path: Path):
    """Each primary's ``numbers["stability"]``: a row per (claim, selection), the recurrence per run, flagged when
    the suite flags it or, where it gave no flag, below one half; a run without it has no number."""
    rep, _ = _report(tmp_path)
    assert [(r["hypothesis"], r["selection"]) for r in rep["stability"]] == [("H1", "top_k_heads"),
                                                                             ("H4", "layer_pos")]
    p = _Cells()
    p.feed((tmp_path / "replication.html").read_text())
    cells = {(i // 3, c["data-run"]): c for i, c in enumerate(p.stab)}
    assert len(p.stab) == 2 * 3
    h1, h4 = 0, 1
    assert cells[h1, "m__pairs__float32"]["data-recurrence"] == "0.3"
    assert cells[h1, "m__pairs__float32"]["data-flagged"] == "true"  # 0.3 < 0.5, no flag given
    assert cells[h1, "m__pairs__bfloat16"]["data-flagged"] == "false"  # the suite's flag
    assert cells[h4, "m__pairs__float32"]["data-flagged"] == "false"
    assert cells[h4, "m__pairs__bfloat16"]["data-flagged"] == "true" and "flagged" in cells[h4, "m__pairs__bfloat16"]["class"]
    assert "data-recurrence" not in cells[h4, "m2__pairs"]  # the crashed run: no number
    assert "selected 14" in cells[h4, "m__pairs__float32"]["title"] and "14: 18" in cells[h4, "m__pairs__float32"]["title"]


def test_a_replication_without_stability_says_so(tmp_path: Path):
    rep, _ = _report(tmp_path, stability=False)
    assert rep["stability"] == []
    p = _Cells()
    p.feed((tmp_path / "replication.html").read_text())
    assert not p.stab and "no-stability" in p.ids and "stability-table" not in p.ids
    assert " stability: " not in (tmp_path / "replication.md").read_text()


def test_the_markdown_table_has_a_column_per_run_and_a_row_per_primary(tmp_path: Path):
    """``replication.md``: per primary and run, verdict, effect [CI], n, p and Holm p; the dtypes side by side
    (the run ids differ by dtype); the depths; the stability rows; cell text that cannot break the table."""
    _report(tmp_path)
    md = (tmp_path / "replication.md").read_text().splitlines()
    cols = [c.strip() for c in md[0].strip("|").split("|")]
    assert cols == ["primary claim", "m__pairs__float32", "m__pairs__bfloat16", "m2__pairs"]
    assert md[1] == "|---|---|---|---|"
    rows = {ln.split(" | ")[0].lstrip("| "): [c.strip() for c in ln.strip("|").split(" | ")[1:]] for ln in md[2:]}
    assert all(len(cells) == 3 for cells in rows.values()), rows
    assert rows["dtype"] == ["float32", "bfloat16", "auto"] and rows["model"] == ["m", "m", "m2\\|odd"]
    assert rows["wall time"] == ["100 s", "100 s", "5 s"]
    base = rows["baseline: test_harmful_refusal_rate"]
    assert base == ["**supported** 0.42 [0.3, 0.55], n 40, p 0.001, Holm p 0.004"] * 2 + ["**error**"]
    assert rows["H3: test_categories_share_heads"][0].startswith("**NOT supported**")
    assert rows["H4: direction layer (depth)"] == ["14 of 24 (0.583)"] * 2 + ["—"]
    assert rows["H2: probe layer (depth)"] == ["6 of 24 (0.25)"] * 2 + ["—"]
    assert rows["H1: top heads (mean depth)"][0] == "L10.H3, L20.H1 (0.625)"
    assert rows["H4 stability: layer_pos"] == ["0.9 of B = 20", "0.45 of B = 20 **flagged**", "—"]
    assert rows["H1 stability: top_k_heads"][0] == "0.3 of B = 20 **flagged**"
    assert len(rows) == 4 + 5 + 3 + 2


def test_stability_reads_the_suites_list_of_records(tmp_path: Path) -> None:
    """The suite writes ``numbers["stability"]`` as a list of records (fixtures/stability.py), H3's one per
    category: each becomes its own row, named by the selection and the category, with the reported selection."""
    from runner.replicate.run import RunResult
    from runner.replicate.specs import plan_runs
    from runner.replicate.stability import stability

    (spec,) = plan_runs(["m"], ["pairs"])
    recs = [{"selection": "top-k heads", "category": c, "B": 20, "full": ["L3.H1"], "recurrence": r,
             "distribution": {"L3.H1": 9}, "flagged": r < 0.5} for c, r in (("cyber", 0.9), ("drugs", 0.2))]
    claim = _claim("H3", "NOT supported", recs)  # type: ignore[arg-type]
    res = RunResult(spec, tmp_path, "complete", exit_status=1, wall_s=1.0, peak_rss_gb=1.0,
                    findings={"claims": [claim]})
    rows = stability([res])
    assert [r["selection"] for r in rows] == ["top-k heads (cyber)", "top-k heads (drugs)"]
    cells = [r["cells"][spec.id] for r in rows]
    assert [c["flagged"] for c in cells] == [False, True] and cells[0]["selected"] == ["L3.H1"]
