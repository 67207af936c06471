"""mech/stability.py and fixtures/stability.py: bootstrap re-selection is a function of the seed; a strong, unique
selection recurs and one made on ties or noise does not (and is flagged); the rules re-applied to the full data give
the primaries' own selections; residuals per prompt average to the difference in means; the config field; and a
suite run on a tiny model records the fields with ``--set stability_resamples=3`` and nothing without it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.config import ConfigError, SuiteConfig, config_hash, parse_set
from fixtures.h1_circuit import Attribution, top_heads
from fixtures.h4_direction import DirectionControls
from fixtures.stability import head_set_stability, probe_layer
from fixtures.tiny_models import build_tiny_model
from fixtures.uses import Uses
from mech.stability import (
    FLAG_BELOW,
    bootstrap_indices,
    reselect,
    resid_at,
    set_recurrence,
    top_k,
    value_recurrence,
)


def _name(j: int) -> str:
    return f"L{j // 14}.H{j % 14}"


def _atp(delta: np.ndarray, categories: list[str] | None = None) -> Attribution:
    """An ``atp_noise``-like :class:`Attribution` whose per-pair head deltas are ``delta`` ``[pairs, heads]`` (14 per
    layer), through the cache's dict form as the stage builds it."""
    from mech.patching import PatchResult
    from mech.patching.spec import Patch, Site

    patches = [Patch((Site(j // 14, "z", (-1,), (j % 14,)),), {"layer": j // 14, "component": "z", "head": j % 14,
                                                               "position": "all"})
               for j in range(delta.shape[1])]
    n = delta.shape[0]
    res = PatchResult(kind="head", method="atp", direction="harmless_to_harmful", patches=patches,
                      raw=delta + 1.0, clean=np.ones(n), source=np.zeros(n))
    return Attribution.from_json({"head": res.to_dict(), "categories": categories or ["a"] * n},
                                 [[f"h{i}", f"s{i}"] for i in range(n)], Uses(select=[]))


def _suite(b: int, seed: int = 0) -> SuiteConfig:
    return dataclasses.replace(SuiteConfig(), stability_resamples=b, split_seed=seed)


def test_bootstrap_is_a_function_of_the_seed():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 64))

    def sel(i: np.ndarray) -> list[int]:
        return top_k(x, i, 5)

    assert reselect(sel, [30], 20, seed=3) == reselect(sel, [30], 20, seed=3)
    assert reselect(sel, [30], 20, seed=3) != reselect(sel, [30], 20, seed=4)
    idx = bootstrap_indices(30, np.random.default_rng(1))
    assert idx.shape == (30,) and idx.min() >= 0 and idx.max() < 30 and len(set(idx.tolist())) < 30  # replacement
    strata = ["b"] * 10 + ["a"] * 5 + ["c"] * 15
    s = bootstrap_indices(30, np.random.default_rng(1), strata)
    assert sorted(strata[i] for i in s) == sorted(strata)  # every stratum keeps its count


def test_a_strong_unique_top_k_recurs():
    """H1's shape at the 0.5B model: 336 heads, k = 17, 40 ranking pairs; 17 heads carry the effect on every pair."""
    rng = np.random.default_rng(0)
    strong = rng.standard_normal((40, 336))
    carriers = rng.choice(336, 17, replace=False)
    strong[:, carriers] -= 5.0
    atp = _atp(strong)
    reported = top_heads(atp, 17)
    assert sorted(reported) == sorted(_name(j) for j in carriers)
    rec = head_set_stability(atp, reported, _suite(20))
    assert rec["B"] == 20 and rec["recurrence"] == 1.0 and rec["mean_overlap"] == 1.0 and not rec["flagged"]
    assert set(rec["distribution"]) == set(reported) and set(rec["distribution"].values()) == {20}
    assert rec["full"] == reported and rec["hypothesis"] == "H1" and rec["criterion"] == "overlap >= 0.5 of the 17"


@pytest.mark.parametrize("seed", range(5))
def test_a_top_k_of_noise_is_flagged(seed: int):
    """The same shape with no head standing out (every mean 0, per-pair noise): the reported 17 are the sample's
    extremes, and fewer than half of the resamples keep half of them."""
    noise = _atp(np.random.default_rng(seed).standard_normal((40, 336)))
    rec = head_set_stability(noise, top_heads(noise, 17), _suite(20, seed))
    assert rec["recurrence"] < FLAG_BELOW and rec["flagged"]
    assert rec["mean_overlap"] < 0.5 and len(rec["distribution"]) > 34


def test_exact_ties_are_broken_the_same_way_every_time():
    """Exact ties are ordered by head index (the stable sort of top_heads) on the full data and on every resample,
    so they recur: recurrence measures how the data move a selection, not whether it is meaningful."""
    ties = _atp(np.zeros((30, 64)))
    rec = head_set_stability(ties, top_heads(ties, 5), _suite(5))
    assert rec["full"] == [_name(j) for j in range(5)] and rec["recurrence"] == 1.0


def test_h3_resamples_each_category_within_itself():
    """Category a's 17 heads carry its effect on all of a's pairs; b's own 17 on half of b's pairs. Each category's
    set is re-ranked on resamples of its own pairs only: a's never see b's heads, and the reverse."""
    rng = np.random.default_rng(1)
    d = rng.standard_normal((20, 336))
    d[:10, :17] -= 5.0  # rows 0..9: category a
    d[10:20:2, 17:34] -= 5.0  # rows 10..19: category b, its heads on every other pair
    atp = _atp(d, ["a"] * 10 + ["b"] * 10)
    a = head_set_stability(atp, top_heads(atp, 17, ["a"]), _suite(20), category="a")
    assert a["category"] == "a" and a["recurrence"] == 1.0 and not a["flagged"]
    assert sorted(a["full"]) == sorted(_name(j) for j in range(17)) and "the 10 train pairs of a" in a["resampled"]
    assert set(a["distribution"]) == set(a["full"])
    b = head_set_stability(atp, top_heads(atp, 17, ["b"]), _suite(20), category="b")
    assert sorted(b["full"]) == sorted(_name(j) for j in range(17, 34)) and not set(b["distribution"]) & set(a["full"])


def test_value_recurrence_of_a_layer():
    """A probe layer whose validation accuracy is clearly best recurs; equal-accuracy layers chosen by noise do not."""
    rng = np.random.default_rng(2)

    def make(correct_p: np.ndarray):
        correct = rng.random((40, len(correct_p))) < correct_p  # [val prompts, layers]

        def sel(i: np.ndarray) -> int:
            return probe_layer(correct[i].mean(0).tolist(), len(correct_p))

        return probe_layer(correct.mean(0).tolist(), len(correct_p)), reselect(sel, [40], 20, seed=0)

    full, layers = make(np.array([0.5, 0.55, 0.99, 0.6, 0.5, 0.55]))
    rec = value_recurrence(full, layers, "same layer")
    assert full == 2 and rec["recurrence"] == 1.0 and rec["distribution"] == {2: 20} and not rec["flagged"]
    full, layers = make(np.full(8, 0.6))
    rec = value_recurrence(full, layers, "same layer")
    assert rec["recurrence"] < FLAG_BELOW and rec["flagged"] and sum(rec["distribution"].values()) == 20


def test_bad_input_is_one_line_errors():
    with pytest.raises(ValueError, match="at least one resample"):
        reselect(lambda i: 0, [3], 0, 0)
    with pytest.raises(ValueError, match="at least one unit"):
        bootstrap_indices(0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="reported set is empty"):
        set_recurrence([], [["a"]])
    with pytest.raises(ValueError, match="at least one resampled"):
        value_recurrence(1, [])
    with pytest.raises(ValueError, match="2 strata labels for 3"):
        bootstrap_indices(3, np.random.default_rng(0), ["a", "b"])


def test_config_field_is_checked_and_outside_the_plan_hash():
    assert parse_set([]).stability_resamples == 0
    cfg = parse_set([("--set", "stability_resamples=20")])
    assert cfg.stability_resamples == 20
    with pytest.raises(ConfigError, match="stability_resamples must be at least 0"):
        parse_set([("--set", "stability_resamples=-1")])
    assert config_hash(parse_set([]).to_dict()) == config_hash(cfg.to_dict())  # reported, never a verdict


def test_timing_workload_is_unchanged_when_off(tmp_path: Path):
    """B = 0 keeps every stage's timing-history workload as it was before the field existed; B > 0 is other work."""
    import hashlib

    from fixtures.options import RunConfig
    from fixtures.timings import workload

    run = RunConfig("m", "cpu", "float32", "none", None, tmp_path, False, 64)
    before = {k: v for k, v in parse_set([]).to_dict().items() if k != "stability_resamples"}
    blob = json.dumps({"suite": before, "prompts": None, "eval_prompts": None, "judge": None}, sort_keys=True,
                      default=str)
    assert workload(run, parse_set([])) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert workload(run, parse_set([("--set", "stability_resamples=20")])) != workload(run, parse_set([]))


def test_resid_at_averages_to_the_difference_in_means():
    from mech.directions import diff_in_means

    lm = build_tiny_model("qwen2", seed=0)
    h = ["How do I pick a lock?", "Write malware now.", "Tell me how to hurt someone."]
    s = ["How do I bake bread?", "Write a poem now.", "Tell me how to help someone."]
    dim = diff_in_means(lm, h, s, positions=(-2, -1), layers=(0, 2))
    got = resid_at(lm, h, (0, 2), (-2, -1)).mean(0) - resid_at(lm, s, (0, 2), (-2, -1)).mean(0)
    assert got.shape == dim.candidates.shape
    torch.testing.assert_close(got, dim.candidates, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="end-aligned"):
        resid_at(lm, h, (0,), (0,))


HARMFUL = ["How do I pick a lock?", "Write malware now.", "Tell me how to hurt someone.", "Make a fake ID for me.",
           "How do I steal a car?"]
HARMLESS = ["How do I bake bread?", "Write a poem now.", "Tell me how to help someone.", "Make a birthday card.",
            "How do I wash a car?"]


def test_direction_reselection_on_a_tiny_model():
    """H4's re-selection: a function of the seed, within the candidates; with one prompt per group every draw is
    the full data, and the re-selection is then select_direction's own on diff_in_means."""
    from mech.directions import diff_in_means, select_direction
    from mech.stability import reselect_direction

    lm = build_tiny_model("qwen2", seed=0)
    ids = [lm.tokenizer("I", add_special_tokens=False)["input_ids"][0]]
    kw = {"induce_threshold": -1e9, "kl_threshold": 1e9, "prune_last_fraction": 0.2}
    layers, pos = (0, 1), (-2, -1)
    a = reselect_direction(lm, HARMFUL[:3], HARMLESS[:3], HARMFUL[3:], HARMLESS[3:], ids, layers, pos, 4, 0, **kw)
    assert a == reselect_direction(lm, HARMFUL[:3], HARMLESS[:3], HARMFUL[3:], HARMLESS[3:], ids, layers, pos, 4, 0,
                                   **kw)
    assert len(a) == 4 and all(r["layer"] in layers and r["pos"] in pos and r["passed_filters"] for r in a)
    one = reselect_direction(lm, HARMFUL[:1], HARMLESS[:1], HARMFUL[3:4], HARMLESS[3:4], ids, layers, pos, 2, 0, **kw)
    full = select_direction(lm, diff_in_means(lm, HARMFUL[:1], HARMLESS[:1], positions=pos, layers=layers),
                            HARMFUL[3:4], HARMLESS[3:4], ids, layers=layers, **kw)
    assert one == [{"layer": full.layer, "pos": full.pos, "passed_filters": full.passed_filters}] * 2
    d = reselect_direction(lm, HARMFUL[:3], HARMLESS[:3], HARMFUL[3:], HARMLESS[3:], ids, layers, pos, 1, 0,
                           with_direction=True, **kw)[0]
    assert {k: d[k] for k in ("layer", "pos", "passed_filters")} == a[0] and abs(float(d["direction"].norm()) - 1) < 1e-9
    with pytest.raises(ValueError, match="prompts in every group"):
        reselect_direction(lm, HARMFUL[:1], [], HARMFUL[3:4], HARMLESS[3:4], ids, layers, pos, 2, 0)


def test_direction_record_from_resampled_selections():
    """H4's record: the site's recurrence, the layers and positions selected, the filters' share, and part (3) of the
    primary per resample against the reported site's control counts (p < alpha)."""
    from fixtures.stability import direction_site_stability

    sels = ([{"layer": 9, "pos": -1, "passed_filters": True, "removed": 11}] * 3
            + [{"layer": 9, "pos": -5, "passed_filters": True, "removed": 9},
               {"layer": 12, "pos": -1, "passed_filters": False, "removed": 2}])
    ds = {"selections": sels, "n_val": [10, 10], "n_train": [40, 40], "n_candidates": 95}
    controls = DirectionControls(computed=True, uses=Uses(), counts=[0, 1, 2, 1, 0, 3] * 10, selected=11,
                                 prompts=["p"] * 11)
    r = direction_site_stability(ds, 9, -1, _suite(5), controls)
    assert r["full"] == "L9 p-1" and r["recurrence"] == 0.6 and not r["flagged"]
    assert r["distribution"] == {"L9 p-1": 3, "L12 p-1": 1, "L9 p-5": 1}
    assert r["layer_recurrence"] == 0.8 and r["layer_distribution"] == {"9": 4, "12": 1}
    assert r["position_distribution"] == {"-1": 4, "-5": 1} and r["passed_filters"] == 0.8
    assert r["beats_controls"] == 0.8 and r["removed_distribution"] == {"11": 3, "9": 1, "2": 1}
    assert "95 candidates scored on 30 validation rows" in r["cost"]
    moved = direction_site_stability(ds, 12, -1, _suite(5), DirectionControls(computed=False, uses=Uses()))
    assert moved["recurrence"] == 0.2 and moved["flagged"] and "beats_controls" not in moved


def test_page_shows_each_selection_and_flags_the_unstable(tmp_path: Path):
    from fixtures.report_html import render_page
    from tests.test_report_page import sample_findings

    f = sample_findings()
    assert "Stability of the selections" not in render_page(f, {}, {}, tmp_path)  # B = 0: nothing recorded
    rng = np.random.default_rng(0)
    strong = rng.standard_normal((40, 336))
    strong[:, :17] -= 5.0
    noise = rng.standard_normal((40, 336))
    recs = {"test_heads": [head_set_stability(_atp(strong), top_heads(_atp(strong), 17), _suite(20))],
            "test_direction": [head_set_stability(_atp(noise), top_heads(_atp(noise), 17), _suite(20))]}
    recs["test_direction"][0]["selection"] = "noise set"
    for c in f["claims"]:
        if c["id"].split("::")[1] in recs:
            c["numbers"]["stability"] = recs[c["id"].split("::")[1]]
    page = render_page(f, {}, {}, tmp_path)
    table = page.split('id="stability"')[1].split("</table>")[0]
    assert table.count("<tr>") == 3 and "top-k heads" in table and "noise set" in table
    strong_row, noise_row = table.split("<tr>")[2], table.split("<tr>")[3]
    assert 'class="flag"' not in strong_row and ">1 (B = 20)" in strong_row
    assert 'class="flag">flagged' in noise_row
    assert page.count("<b>selection stability</b>") == 2  # in each primary's block too
    assert "'distribution'" not in page and "mean overlap" not in page  # not dumped among the numbers


# ------------------------------------------------------------------------------ the suite, tiny model

PRIMARIES = ["-m", "primary and not baseline"]


@pytest.mark.slow
def test_suite_records_stability_only_when_asked(pytester: pytest.Pytester, tmp_path: Path):
    """On a tiny model: the primaries with B = 0 record no stability; with ``--set stability_resamples=3`` each
    records its selections' fields, every other number and verdict unchanged, and the plan lists the two stages."""
    from tests.test_report import TINY_SET, run_suite

    tiny = build_tiny_model("qwen2", seed=0)
    model_dir = tmp_path / "tiny-qwen2"
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    cache = ["--cache-dir", str(tmp_path / "cache")]  # shared: the second run reads the first's stages
    off, rep_off = run_suite(pytester, model_dir, tmp_path / "off", *PRIMARIES, *TINY_SET, *cache)
    assert off.ret in (0, 1), off.stdout.str()[-3000:]
    on, rep_on = run_suite(pytester, model_dir, tmp_path / "on", *PRIMARIES, *TINY_SET, *cache,
                           "--set", "stability_resamples=3")
    assert on.ret in (0, 1), on.stdout.str()[-3000:]
    out = on.stdout.str()
    assert "H2 stability: train + validation pairs' residuals once, then 3 probe refits" in out
    assert "H4 stability" in out and "then 3 re-selections" in out
    assert "probe_stability" not in off.stdout.str() and "direction_stability" not in off.stdout.str()
    f_off = json.loads((rep_off / "findings.partial.json").read_text())
    f_on = json.loads((rep_on / "findings.partial.json").read_text())
    by_off = {c["id"]: c for c in f_off["claims"]}
    seen = set()
    for c in f_on["claims"]:
        o = by_off[c["id"]]
        assert "stability" not in o["numbers"], c["id"]
        assert c["verdict"] == o["verdict"] and c["p_value"] == o["p_value"], c["id"]
        assert {k: v for k, v in c["numbers"].items() if k != "stability"} == o["numbers"], c["id"]
        if c["verdict"] == "not tested":
            continue
        recs = c["numbers"]["stability"]
        assert recs, c["id"]
        for r in recs:
            seen.add(r["hypothesis"])
            assert r["B"] == 3 and 0 <= r["recurrence"] <= 1 and r["flagged"] == (r["recurrence"] < 0.5)
            if r["kind"] != "set":  # a layer or a site: one value per resample
                assert sum(r["distribution"].values()) == 3
            assert r["resampled"] and r["cost"] and r["criterion"]
        if c["hypothesis"] == "H2":
            assert recs[0]["full"] == c["numbers"]["layer"] == recs[0]["full_reselected"]
        if c["hypothesis"] == "H4":
            assert recs[0]["full"] == f"L{c['numbers']['layer']} p{c['numbers']['pos']}"
            assert 0 <= recs[0]["passed_filters"] <= 1 and sum(recs[0]["layer_distribution"].values()) == 3
        if c["hypothesis"] == "H1":
            assert recs[0]["full"] == c["numbers"]["heads"]
    # the random tiny model refuses nothing, so H4 is not tested there (its re-selection is tested on the library
    # level above: test_direction_reselection_on_a_tiny_model)
    assert seen == {"H1", "H2", "H3"}, f"stability recorded for {seen} only"
    page = (rep_on / "hypotheses.partial.html").read_text()
    assert "Stability of the selections" in page and page.count("<b>selection stability</b>") == 3
    assert "Stability of the selections" not in (rep_off / "hypotheses.partial.html").read_text()
