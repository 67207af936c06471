"""fixtures/plan.py, fixtures/timings.py, fixtures/progress.py: the suite's plan of expensive stages (the stages
the selected claims need, in set-up order, each with the claims that share it), ``--plan``, the timing history
its estimates come from, the progress bar per stage and findings.json ``run.plan``. The suite runs on a tiny local
model in a subprocess, as in tests/test_report.py."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.progress import StageBar
from fixtures.stages import STAGES
from fixtures.timings import FILENAME, TimingHistory, duration
from fixtures.tiny_models import build_tiny_model
from tests.test_report import TINY_SET, run_suite

BASELINE_STAGES = ["refusal_tokens", "baseline_generations", "coherence_check", "baseline", "generation_length"]
# the primary baseline claim alone: four stages, the cheapest real run of the suite
ONE_CLAIM = ["-k", "test_harmful_refusal_rate and not by_category", "--verdict-exit", *TINY_SET]
ONE_CLAIM_STAGES = ["refusal_tokens", "baseline_generations", "coherence_check", "baseline"]


def plan_rows(output: str) -> dict[str, str]:
    """The printed plan: stage name -> its line, in the printed order."""
    lines = output.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("plan: "))
    rows = {}
    for ln in lines[start + 1:]:
        if not ln.startswith("  ") or ln.startswith(("  total", "  no estimate")):
            break
        rows[ln.split()[0]] = ln
    return rows


# ------------------------------------------------------------------------------------------- units


def test_duration_reads_like_a_person_writes_it():
    assert [duration(s) for s in (0.4, 42, 250, 3725)] == ["0s", "42s", "4m10s", "1h02m"]


def test_stage_bar_ticks_against_the_estimate_and_always_closes():
    out = io.StringIO()
    with StageBar("circuit_ablation", 10.0, out, disable=False, interval=0.05) as bar:
        time.sleep(1.2)
        bar.done("computed in 1s")
    text = out.getvalue()
    assert "circuit_ablation:  10%" in text and "of est. 10s" in text  # ticked: 1 of 10 estimated seconds
    assert text.rstrip().endswith("circuit_ablation: computed in 1s (est. 10s)")
    assert not [t for t in threading.enumerate() if t.name.startswith("stage-bar-")]

    out = io.StringIO()
    with pytest.raises(RuntimeError), StageBar("layer_probe", None, out, disable=False, interval=0.01):
        raise RuntimeError("the stage failed")
    assert "layer_probe: 00:00 (no estimate yet)" in out.getvalue() and out.getvalue().endswith("\n")  # closed
    assert not [t for t in threading.enumerate() if t.name.startswith("stage-bar-")]
    out = io.StringIO()
    with StageBar("layer_probe", 5.0, out, disable=True) as bar:
        bar.done("cache hit")
    assert out.getvalue() == ""


def test_timing_history_keeps_one_record_per_stage_and_workload(tmp_path: Path):
    path = tmp_path / FILENAME
    h = TimingHistory(path, "model=m device=cpu", "w1")
    assert h.problem is None and h.estimate("baseline") is None
    h.save({"baseline": 250.0, "atp_noise": 13.2})
    assert TimingHistory(path, "model=m device=cpu", "w1").estimate("baseline").describe().startswith(  # type: ignore[union-attr]
        "est. 4m10s (computed ")
    other = TimingHistory(path, "model=m device=cpu", "w2").estimate("atp_noise")
    assert other is not None and other.seconds == 13.2 and not other.same_workload
    assert other.describe().endswith(", other config)")
    assert TimingHistory(path, "model=m device=cuda", "w1").estimate("baseline") is None  # another speed key
    TimingHistory(path, "model=m device=cpu", "w2").save({"atp_noise": 20.0})
    back = TimingHistory(path, "model=m device=cpu", "w1")
    assert back.estimate("atp_noise").seconds == 13.2 and back.estimate("baseline").seconds == 250.0  # type: ignore[union-attr]
    assert not list(tmp_path.glob(f".{FILENAME}.*"))  # atomic: no temporary file left
    # a stage that also read from the cache (a resumed run) never replaces a full record, but fills a gap
    back.save({"baseline": 9.0, "layer_probe": 60.0}, partial={"baseline", "layer_probe"})
    again = TimingHistory(path, "model=m device=cpu", "w1")
    assert again.estimate("baseline").seconds == 250.0 and not again.estimate("baseline").partial  # type: ignore[union-attr]
    probe = again.estimate("layer_probe")
    assert probe is not None and probe.seconds == 60.0 and probe.describe().endswith(", partly cached)")
    again.save({"layer_probe": 70.0})  # a full measurement replaces a partial one
    full = TimingHistory(path, "model=m device=cpu", "w1").estimate("layer_probe")
    assert full is not None and (full.seconds, full.same_workload, full.partial) == (70.0, True, False)
    for bad in ("{half", "[]", '{"version": 1, "settings": {"k": {"s": {"w": {"seconds": "slow"}}}}}'):
        path.write_text(bad)
        h = TimingHistory(path, "model=m device=cpu", "w1")
        assert h.problem and "\n" not in h.problem and h.estimate("baseline") is None
        h.save({"baseline": 1.0})  # replaced by a valid history
        assert TimingHistory(path, "model=m device=cpu", "w1").estimate("baseline").seconds == 1.0  # type: ignore[union-attr]


def test_plan_order_is_set_up_order_with_the_claims_that_share_each_stage(pytester: pytest.Pytester):
    """A stage is a session fixture taking ``lm`` and ``disk_cache``; the plan lists the stages of the selected
    tests in the order pytest then sets them up (a stage after the stages it requests), and ``--plan`` sets up
    none of them."""
    pytester.makeconftest('''
import pytest
from mech.cache import DiskCache

def _stage(name, disk_cache):
    with open("order.txt", "a") as fh:
        fh.write(name + "\\n")
    return disk_cache.get_or_compute(name, {}, lambda: 1, modules=("stats",))

@pytest.fixture(scope="session")
def lm():
    return "a model"

@pytest.fixture(scope="session")
def disk_cache(tmp_path_factory):
    return DiskCache(tmp_path_factory.mktemp("results"))

@pytest.fixture(scope="session")
def alpha(lm, disk_cache):
    """The first stage. It has more to say."""
    return _stage("alpha", disk_cache)

@pytest.fixture(scope="session")
def beta(lm, disk_cache, alpha):
    return _stage("beta", disk_cache)

@pytest.fixture(scope="session")
def gamma(lm, disk_cache):
    return _stage("gamma", disk_cache)

@pytest.fixture(scope="session")
def not_a_stage(lm):
    return 1
''')
    pytester.makepyfile(test_claims='''
def test_one(beta, not_a_stage):
    pass

def test_two(gamma, alpha):
    pass

def test_three(not_a_stage):
    pass
''')
    args = ["-p", "fixtures.options", "-p", "fixtures.config", "-p", "fixtures.plan", "-p", "no:cacheprovider",
            "--cache-dir", str(pytester.path / "cache")]
    planned = pytester.runpytest(*args, "--plan")
    assert planned.ret == 0 and not (pytester.path / "order.txt").exists()  # nothing set up
    planned.assert_outcomes()
    rows = plan_rows(planned.stdout.str())
    assert list(rows) == ["alpha", "beta", "gamma"]
    assert "The first stage" in rows["alpha"] and "2 claims: one, two" in rows["alpha"]
    assert "1 claim: one" in rows["beta"] and "1 claim: two" in rows["gamma"]
    ran = pytester.runpytest(*args)
    ran.assert_outcomes(passed=3)
    assert (pytester.path / "order.txt").read_text().split() == list(rows)
    picked = pytester.runpytest(*args, "--plan", "-k", "two")  # test_two alone asks for gamma first
    assert list(plan_rows(picked.stdout.str())) == ["gamma", "alpha"]


def test_bad_no_progress_env_is_a_one_line_usage_error(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MECH_NO_PROGRESS", "sometimes")
    result = pytester.runpytest("-p", "fixtures.plan", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "MECH_NO_PROGRESS='sometimes' is not one of 1, true, yes, 0, false, no" in result.stderr.str()


# ------------------------------------------------------------------------------ the suite, tiny model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("plan") / "tiny-qwen2"
    tiny = build_tiny_model("qwen2", seed=0)
    tiny.model.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    return d


@pytest.mark.slow
def test_plan_option_lists_what_the_selection_needs_and_runs_nothing(pytester: pytest.Pytester, tiny_dir: Path,
                                                                     tmp_path: Path):
    result, reports = run_suite(pytester, tiny_dir, tmp_path, "--plan", *TINY_SET)
    assert result.ret == 0, result.stdout.str()[-3000:]
    rows = plan_rows(result.stdout.str())
    declared = {s.fixture or s.name for s in STAGES} - {"probe_stability", "direction_stability"}  # B = 0: not asked
    assert set(rows) == declared, "a stage of the suite is not declared in fixtures/stages.py, or one is stale"
    assert all(s.description in rows[s.fixture or s.name] for s in STAGES if (s.fixture or s.name) in rows)
    assert "ranked_heads_beat_layer_matched_random" in rows["circuit_ablation"]
    assert "directional_ablation_removes_refusal" in rows["refusal_direction"]
    assert "no estimate yet: first run on this machine" in result.stdout.str()
    assert not reports.exists(), "--plan wrote a report"
    assert not (tmp_path / "cache" / "results").exists() and not (tmp_path / "cache" / FILENAME).exists()

    result, reports = run_suite(pytester, tiny_dir, tmp_path, "--plan", "-k", "baseline", *TINY_SET)
    assert result.ret == 0 and list(plan_rows(result.stdout.str())) == BASELINE_STAGES
    assert not reports.exists() and not (tmp_path / "cache" / "results").exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One claim's stages run cold (a fresh cache), then warm (everything from the cache), in one work dir: the
    tests below run in this order, each on the last one's cache and timing history."""
    return {"work": tmp_path_factory.mktemp("runs")}


def _run(pytester: pytest.Pytester, tiny_dir: Path, runs: dict[str, Any], name: str) -> dict[str, Any]:
    result, reports = run_suite(pytester, tiny_dir, runs["work"], *ONE_CLAIM)
    assert result.ret == 0, result.stdout.str()[-3000:]
    runs[name] = {"stdout": result.stdout.str(), "findings": json.loads((reports / "findings.partial.json").read_text()),
                  "history": (runs["work"] / "cache" / FILENAME).read_bytes(),
                  "html": (reports / "hypotheses.partial.html").read_text()}
    return runs[name]


@pytest.mark.slow
def test_cold_run_computes_each_stage_once_and_keeps_its_time(pytester: pytest.Pytester, tiny_dir: Path, runs):
    cold = _run(pytester, tiny_dir, runs, "cold")
    assert list(plan_rows(cold["stdout"])) == ONE_CLAIM_STAGES
    assert "no estimate yet: first run on this machine" in cold["stdout"]
    plan = cold["findings"]["run"]["plan"]
    assert [p["stage"] for p in plan] == ONE_CLAIM_STAGES
    for p in plan:
        assert p["computed"] is True and p["estimate_s"] is None and p["claims"] == 1, p
        assert p["actual_s"] == cold["findings"]["run"]["fixture_seconds"][p["stage"]]
    assert "Plan vs actual" in cold["html"] and '<table class="mech-plan">' in cold["html"]
    settings = json.loads(cold["history"])["settings"]
    (key, stages), = settings.items()
    assert f"model={tiny_dir} device=cpu dtype=float32 quantize=none threads=" in key
    assert {s: next(iter(w.values()))["seconds"] for s, w in stages.items()} == {
        p["stage"]: p["actual_s"] for p in plan}


@pytest.mark.slow
def test_warm_run_estimates_from_the_cold_run_and_keeps_them(pytester: pytest.Pytester, tiny_dir: Path, runs):
    if "cold" not in runs:
        pytest.skip("the cold run did not complete")
    cold, warm = runs["cold"], _run(pytester, tiny_dir, runs, "warm")
    rows = plan_rows(warm["stdout"])
    for p in cold["findings"]["run"]["plan"]:
        assert f"est. {duration(p['actual_s'])} (computed " in rows[p["stage"]], rows[p["stage"]]
    assert "total if nothing is cached: est. " in warm["stdout"]
    for p in warm["findings"]["run"]["plan"]:
        assert p["computed"] is False and p["estimate_s"] is not None, p  # every stage from the cache
    assert warm["history"] == cold["history"], "a run served from the cache replaced an estimate with a cache read"


@pytest.mark.slow
def test_corrupt_history_is_one_warning_and_the_run_proceeds(pytester: pytest.Pytester, tiny_dir: Path, runs):
    if "cold" not in runs:
        pytest.skip("the cold run did not complete")
    work = runs["work"]
    (work / "cache" / FILENAME).write_text('{"version": 1, "settings": ')
    result, reports = run_suite(pytester, tiny_dir, work, *ONE_CLAIM)
    assert result.ret == 0, result.stdout.str()[-3000:]
    warnings = [ln for ln in result.stdout.lines if "timing history" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ignoring the timing history"), warnings
    assert "no estimate yet" in result.stdout.str()
    assert [p["computed"] for p in json.loads((reports / "findings.partial.json").read_text())["run"]["plan"]] == [
        False] * len(ONE_CLAIM_STAGES)
