"""``python -m runner calibrate``: the aggregation on synthetic findings (a primary that always passes is flagged
``miscalibrated``; one that holds its size is ``calibrated``; one the label shuffle does not touch is not judged by
it), then end to end on a tiny local model with 2 label shuffles: the runs, the shared cache (the shuffles read the
label-independent stages, they compute the rest), calibration.json and a self-contained calibration.html, and the
resume (a second invocation runs nothing)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from scipy.stats import binomtest

from fixtures.config import config_hash
from fixtures.tiny_models import build_tiny_model
from runner.calibrate import (
    STATUS,
    CalibrationError,
    CalRun,
    aggregate,
    build_report,
    plan_calibration,
    write_report,
)
from runner.replicate.run import RunResult
from runner.replicate.specs import RunSpec
from tests.helpers import small_prompt_file

ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.05
H = {"baseline": "test_baseline.py::test_harmful_refusal_rate",
     "H1": "test_localized_circuit.py::test_ranked_heads_beat_layer_matched_random",
     "H2": "test_layer_hierarchy.py::test_harmfulness_decodable_early",
     "H4": "test_single_direction.py::test_directional_ablation_removes_refusal"}


def _claim(hyp: str, verdict: str, p: float | None, p_adj: float | None = None) -> dict[str, Any]:
    return {"id": f"hypotheses/{H[hyp]}", "hypothesis": hyp, "primary": True, "verdict": verdict, "p_value": p,
            "p_adjusted": p_adj if p_adj is not None else p, "claim": f"{hyp} primary", "effect": 0.1, "ci": [0, 1],
            "n": 20, "message": ""}


def _result(rid: str, claims: list[dict[str, Any]], status: str = "complete") -> RunResult:
    # every claim but the baseline selects on train prompts (as in the suite's data_use)
    data_use = {c["id"]: {"select": ["cybercrime-001-harmful"], "judge": ["x"]} for c in claims
                if c["hypothesis"] != "baseline" and c["verdict"] in ("supported", "NOT supported")}
    findings = {"claims": claims, "data_use": data_use, "config": {"alpha": ALPHA, "gate_open": True},
                "model": {"name": "m", "sha256": "abc"}} if status == "complete" else {}
    return RunResult(RunSpec(rid, "m", "pairs", "m", "pairs"), Path(rid), status, findings=findings,
                     message="" if status == "complete" else "pytest exit status 2")


def _synthetic() -> tuple[list[RunResult], dict[str, str]]:
    """10 label shuffles: H1 always supported (a broken test), H2 supported once (raw p < alpha twice, one of them
    lost to Holm), the baseline always supported (it selects nothing), H4 never reaching a verdict; one crashed
    shuffle; a non-refusing run where everything is NOT supported; the real run."""
    results, nulls = [], {}
    h2_p = [0.01, 0.03, 0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    for i, p2 in enumerate(h2_p):
        rid = f"shuffle-{i + 1:02d}"
        h2 = _claim("H2", "supported", p2, p2 * 2) if i == 0 else \
            _claim("H2", "NOT supported", p2, min(1.0, p2 * 3))
        results.append(_result(rid, [_claim("baseline", "supported", 1e-9), _claim("H1", "supported", 0.001, 0.004),
                                     h2, _claim("H4", "not tested", None)]))
        nulls[rid] = "label-shuffle"
    results.append(_result("shuffle-11", [], status="error"))
    nulls["shuffle-11"] = "label-shuffle"
    results.append(_result("non-refusing", [_claim("baseline", "NOT supported", 1.0), _claim("H1", "NOT supported", 0.4),
                                            _claim("H2", "NOT supported", 0.3), _claim("H4", "error", None)]))
    nulls["non-refusing"] = "non-refusing"
    results.append(_result("real", [_claim("baseline", "supported", 1e-9), _claim("H1", "supported", 0.002),
                                    _claim("H2", "supported", 0.001), _claim("H4", "supported", 0.003)]))
    nulls["real"] = "real"
    return results, nulls


def test_aggregate_flags_a_primary_that_always_passes() -> None:
    results, nulls = _synthetic()
    rows = {r["hypothesis"]: r for r in aggregate(results, nulls, ALPHA)}
    assert list(rows) == ["baseline", "H1", "H2", "H4"]  # the suite's order

    h1 = rows["H1"]["nulls"]["label-shuffle"]
    ci = binomtest(10, 10).proportion_ci(method="exact")
    assert (h1["supported"], h1["n"], h1["n_runs"]) == (10, 10, 11)  # the crashed run is no verdict
    assert h1["verdicts"]["error"] == 1
    assert h1["ci"] == pytest.approx([ci.low, ci.high]) and h1["ci"][0] > ALPHA
    assert h1["status"] == "miscalibrated" and rows["H1"]["status"] == "miscalibrated"
    assert h1["flag_at"] == 3  # 3/10: CP lower bound 0.067 > 0.05; 2/10: 0.025
    assert rows["H1"]["nulls"]["non-refusing"]["flag_at"] is None  # 1 of 1 cannot flag anything
    # one run cannot flag anything, so it calibrates nothing either (one null is enough to flag the primary)
    assert rows["H1"]["nulls"]["non-refusing"]["status"] == "not calibrated"

    h2 = rows["H2"]["nulls"]["label-shuffle"]
    assert (h2["supported"], h2["n"], h2["raw"]["k"]) == (1, 10, 2)  # Holm decides; raw p < alpha beside it
    assert h2["ci"] == pytest.approx(list(binomtest(1, 10).proportion_ci(method="exact")))
    assert sorted(h2["p_values"]) == sorted([0.01, 0.03, 0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    assert h2["status"] == "calibrated" and rows["H2"]["status"] == "calibrated"

    # the baseline selects on nothing: 10/10 under the label shuffle is not a size (it is not a null for it)
    b = rows["baseline"]["nulls"]
    assert b["label-shuffle"]["applies"] is False and b["label-shuffle"]["status"] == "not a null"
    assert b["label-shuffle"]["supported"] == 10
    assert b["non-refusing"]["applies"] and rows["baseline"]["status"] == "not calibrated"  # 1 run: too few

    h4 = rows["H4"]
    assert h4["nulls"]["label-shuffle"]["n"] == 0 and h4["nulls"]["label-shuffle"]["verdicts"]["not tested"] == 10
    assert h4["status"] == "not calibrated"
    assert h4["real"]["verdict"] == "supported" and h4["real"]["p_value"] == 0.003
    assert {r["status"] for r in rows.values()} <= set(STATUS)


def test_report_schema_on_synthetic_runs(tmp_path: Path) -> None:
    """The keys the main report reads (``model``, ``config_hash``, each primary's ``status``) and the page."""
    results, nulls = _synthetic()
    runs = [CalRun(r.spec, nulls[r.spec.id], gate_open=nulls[r.spec.id] != "real") for r in results]
    results[-1].findings["config"] = {"alpha": ALPHA, "gate_open": False}
    rep = build_report(results, runs, command=["python", "-m", "runner", "calibrate"])
    assert rep["model"]["sha256"] == "abc" and rep["alpha"] == ALPHA
    # the plan's hash ignores the switch that opens the gate: the nulls' config and the real run's match
    assert rep["config_hash"] == config_hash({"alpha": ALPHA, "gate_open": True}) == config_hash({"alpha": ALPHA})
    assert [p["status"] for p in rep["primaries"]] == ["not calibrated", "miscalibrated", "calibrated", "not calibrated"]
    assert set(rep["nulls"]) == {"label-shuffle", "non-refusing"}
    write_report(rep, tmp_path)
    assert json.loads((tmp_path / "calibration.json").read_text())["primaries"][1]["status"] == "miscalibrated"
    page = (tmp_path / "calibration.html").read_text()
    assert page.count("class='mech-qq'") == 4 and "data-status='miscalibrated'" in page


def test_plan_runs() -> None:
    runs = plan_calibration("m", shuffles=3, non_refusing="smollm2-135m-instruct", random_init="/x/rand",
                            non_refusing_splits=1)
    assert [c.spec.id for c in runs] == ["real", "shuffle-01", "shuffle-02", "shuffle-03",
                                         "non-refusing__smollm2-135m-instruct", "random-init"]
    assert [c.gate_open for c in runs] == [False, True, True, True, True, True]
    assert runs[2].spec.extra == ("--shuffle-labels", "2") and runs[2].seed == 2
    assert runs[-1].spec.model == "/x/rand"


def test_plan_draws_the_non_refusing_null_on_several_splits() -> None:
    """One run of a deterministic model could never flag its null (1/1 has CI lower bound 0.025): S split seeds
    make S draws, the first keeping the one-split id (its stamp stays valid)."""
    runs = plan_calibration("m", shuffles=1, non_refusing="smollm2-135m-instruct", non_refusing_splits=3)
    nr = [c for c in runs if c.null == "non-refusing"]
    assert [c.spec.id for c in nr] == ["non-refusing__smollm2-135m-instruct",
                                       "non-refusing__smollm2-135m-instruct__split-01",
                                       "non-refusing__smollm2-135m-instruct__split-02"]
    assert [c.spec.extra for c in nr] == [(), ("--set", "split_seed=1"), ("--set", "split_seed=2")]
    assert all(c.gate_open for c in nr) and [c.seed for c in nr] == [None, 1, 2]
    with pytest.raises(CalibrationError, match="--non-refusing-splits"):
        plan_calibration("m", non_refusing_splits=0)


def test_shuffled_sides_for_a_behaviour_filter() -> None:
    """H4's label-shuffle null: the prompts its filter selected trade sides by a seeded coin, nothing is lost."""
    from fixtures.common import shuffled_sides
    from mech.prompts import default_pairs

    pairs = default_pairs().pairs()[:40]
    h, s = [a for a, _ in pairs], [b for _, b in pairs[:36]]  # unequal sides, as a filter leaves them; 36 fair coins
    assert shuffled_sides(h, s, None) == (h, s)
    h1, s1 = shuffled_sides(h, s, 1)
    assert (h1, s1) == shuffled_sides(h, s, 1) and (h1, s1) != shuffled_sides(h, s, 2)
    assert sorted(p.id for p in h1 + s1) == sorted(p.id for p in h + s) and (len(h1), len(s1)) == (40, 36)
    assert h1[36:] == h[36:]  # nothing to trade with
    moved = sum(a.label == "harmless" for a in h1)
    assert 8 <= moved <= 28 and moved == sum(b.label == "harmful" for b in s1)


def test_random_init_copy(tmp_path: Path) -> None:
    """The random-init null: the same architecture and tokenizer, other weights; made once."""
    import torch
    from transformers import AutoModelForCausalLM

    from runner.calibrate import random_init_copy

    tiny = build_tiny_model("qwen2", seed=0)
    tiny.model.save_pretrained(tmp_path / "tiny")
    tiny.tokenizer.save_pretrained(tmp_path / "tiny")
    dest = random_init_copy(str(tmp_path / "tiny"), tmp_path / "cache")
    assert random_init_copy(str(tmp_path / "tiny"), tmp_path / "cache") == dest
    rand = AutoModelForCausalLM.from_pretrained(dest)
    src = dict(tiny.model.named_parameters())
    params = dict(rand.named_parameters())
    assert params.keys() == src.keys() and all(params[k].shape == src[k].shape for k in src)
    assert not torch.allclose(params["model.layers.0.self_attn.q_proj.weight"],
                              src["model.layers.0.self_attn.q_proj.weight"].float())
    assert (dest / "tokenizer_config.json").is_file()


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    for args, needle in ((["--shuffles", "-1"], "--shuffles"), (["--set", "gate_open=true"], "gate_open"),
                         (["--non-refusing-splits", "0"], "--non-refusing-splits"),
                         (["--model", str(tmp_path / "nope")], "nope")):
        p = subprocess.run([sys.executable, "-m", "runner", "calibrate", "--out", str(tmp_path), "--non-refusing",
                            "none", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (args, p.stderr[-500:])
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith("error:") and needle in lines[-1], (args, p.stderr[-500:])
    assert not (tmp_path / "calibration").exists()


# ------------------------------------------------------------------------------------------ end to end

# the nulls shrunk as in tests/test_replicate.py, but the gate left as configured: the calibration opens it
# (gate_open) on the null runs, and the real run of a tiny random model does not pass it
TINY_SET = ["n_random_primary=5", "n_probe_shuffles=10", "n_label_shuffles=10", "n_random_directions=3",
            "n_bootstrap=200", "n_random_curve=2", "n_random_per_category=1", "n_selection_null=2", "max_new_tokens=4", "n_rank_pairs=6",
            "n_mean_prompts=6", "n_token_probes=6", "n_dim_train=6", "n_select_val=3", "length_probe_tokens=8"]
SHARED = ("refusal_tokens", "baseline_generations", "coherence_check", "baseline")  # label-independent stages


def _cmd(work: Path) -> list[str]:
    args = [sys.executable, "-m", "runner", "calibrate", "--model", str(work / "tiny-qwen2"), "--prompts",
            str(work / "pairs.csv"), "--shuffles", "2", "--non-refusing", "none", "--out", str(work / "reports"),
            "--cache-dir", str(work / "cache"), "--no-progress"]
    for item in TINY_SET:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A calibration of a tiny model with 2 label shuffles, run on a snapshot of the code, then run again."""
    import os

    work = tmp_path_factory.mktemp("calibrate")
    tiny = build_tiny_model("qwen2", seed=0)
    tiny.model.save_pretrained(work / "tiny-qwen2")
    tiny.tokenizer.save_pretrained(work / "tiny-qwen2")
    small_prompt_file(work / "pairs.csv", harmless=True)
    repo = work / "repo"  # edits to the working tree while this runs cannot change its code
    for d in ("mech", "fixtures", "hypotheses", "data", "runner"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("conftest.py", "pyproject.toml"):
        shutil.copy2(ROOT / f, repo / f)
    # no MECH_* option leaks into the runs, except the judge choice tests/conftest.py may make (no judge model
    # loaded for a tiny model)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MECH_") or k == "MECH_JUDGE"}
    env["PYTHONPATH"] = str(repo)
    first = subprocess.run(_cmd(work), cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    logs = {p: p.stat().st_mtime_ns for p in (work / "reports" / "calibration").glob("*/pytest.log")}
    report = (work / "reports" / "calibration.json").read_text() if first.returncode == 0 else "{}"
    second = subprocess.run(_cmd(work), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    return {"work": work, "first": first, "second": second, "logs": logs, "reports": work / "reports",
            "first_report": json.loads(report)}


@pytest.mark.slow
def test_calibration_end_to_end(calibration: dict[str, Any]) -> None:
    first = calibration["first"]
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    rep = calibration["first_report"]
    for key in ("schema", "model", "config_hash", "config", "alpha", "nulls", "runs", "primaries", "code"):
        assert key in rep, key
    runs = {r["id"]: r for r in rep["runs"]}
    assert list(runs) == ["real", "shuffle-01", "shuffle-02"]
    assert all(r["status"] == "complete" and not r["reused"] for r in runs.values())
    assert {r["config_hash"] for r in runs.values()} == {rep["config_hash"]}
    real = json.loads((calibration["reports"] / "calibration" / "real" / "findings.partial.json").read_text())
    assert rep["config_hash"] == config_hash(real["config"]) and rep["model"]["sha256"] == real["model"]["sha256"]
    assert real["config"]["gate_open"] is False and real["run"]["label_shuffle"] is None
    assert runs["shuffle-02"]["options"] == ["--shuffle-labels", "2", "--set", "gate_open=true"]
    shuffles = [json.loads((calibration["reports"] / "calibration" / s / "findings.partial.json").read_text())
                for s in ("shuffle-01", "shuffle-02")]
    for i, f in enumerate(shuffles, 1):
        assert f["config"]["gate_open"] is True and f["run"]["label_shuffle"]["seed"] == i
        assert f["run"]["label_shuffle"]["swapped_pairs"]["train"], "no train pair swapped"
        stages = {s["stage"]: s["computed"] for s in f["run"]["plan"]}
        assert not any(stages[s] for s in SHARED), stages  # shared with the real run through the cache
        assert stages["atp_noise"] and stages["layer_probe"], stages  # found again on the shuffled labels
    assert shuffles[0]["run"]["label_shuffle"]["swapped_pairs"] != shuffles[1]["run"]["label_shuffle"]["swapped_pairs"]

    prim = {p["hypothesis"]: p for p in rep["primaries"]}
    assert sorted(prim) == ["H1", "H2", "H3", "H4", "baseline"]
    for p in prim.values():
        assert p["status"] in STATUS and set(p["nulls"]) == {"label-shuffle"}
        v = p["nulls"]["label-shuffle"]
        assert v["n_runs"] == 2 and sum(v["verdicts"].values()) == 2
        assert p["real"] is not None and p["real"]["run"] == "real"
    # the real run of a model that does not refuse stops at the gate; the null runs hold it open
    real_v = {c["hypothesis"]: c["verdict"] for c in real["claims"]}
    assert real_v["H1"] == real_v["H2"] == "not tested"
    assert all(prim[h]["nulls"]["label-shuffle"]["n"] == 2 for h in ("H1", "H2", "H3"))
    assert prim["baseline"]["nulls"]["label-shuffle"]["status"] == "not a null"

    page = (calibration["reports"] / "calibration.html").read_text()
    assert "Plotly" in page and page.count("class='mech-qq'") == 5 and "id='calibration-table'" in page
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=['\"]?https?:", page), "the page loads something"


@pytest.mark.slow
def test_calibration_resumes_without_rerunning(calibration: dict[str, Any]) -> None:
    second = calibration["second"]
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    rep = json.loads((calibration["reports"] / "calibration.json").read_text())
    assert all(r["reused"] for r in rep["runs"]), [(r["id"], r["reused"]) for r in rep["runs"]]
    for log, mtime in calibration["logs"].items():
        assert log.stat().st_mtime_ns == mtime, f"{log.parent.name} was run again"
