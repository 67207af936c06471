"""The primary claims' decisions (H1-H4) on constructed data: each gives one intersection-union p, and each fails
where its hypothesis is wrong — where there is nothing to find it rejects at most at about alpha, and it fails
the specific cases the earlier designs passed (a drop carried by two prompts, eleven categories that are one
number repeated, 7 flips of 30, decodability without a hierarchy). The helpers that compute on a model (the H4
control directions and their short measure) run on a tiny model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fixtures.common import balanced
from fixtures.config import SuiteConfig
from fixtures.h1_circuit import (
    Attribution,
    circuit_parts,
    label_free_delta,
    reverse_deltas,
    selection_null_sets,
    top_heads,
    top_of,
)
from fixtures.h2_hierarchy import DirectLogitAttribution, LayerProbe, hierarchy_parts, signed_rank_p
from fixtures.h3_substrate import (
    CrossCategory,
    category_selections,
    jaccard,
    off_category_prompts,
    substrate_parts,
)
from fixtures.h4_direction import (
    DirectionControls,
    control_directions,
    direction_parts,
    short_measure,
    site_activations,
)
from fixtures.uses import Uses
from mech.grading import Grade
from mech.prompts import default_pairs
from mech.refusal import SubstringDetector
from mech.stats import intersection_union_p

SUITE = dataclasses.replace(SuiteConfig(), n_bootstrap=500)
ALPHA = SUITE.alpha


def _rate_ok(rejections: int, n: int) -> bool:
    """A rejection rate consistent with alpha (three binomial standard errors above it)."""
    return rejections / n <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / n)


# ----------------------------------------------------------------------------------------------------- H1


def _h1_parts(rng: np.random.Generator, n_prompts: int = 33, draws: int = 100, shift: np.ndarray | float = 0.0,
              importance: float = 0.0) -> dict:
    """Per-prompt scores: a layer-matched random set moves a prompt by its ``prompt_effect`` (+ noise); a
    label-free selection (generically important heads) by that + ``importance``; the ranked set by that + ``shift``."""
    base = rng.normal(3.0, 1.0, n_prompts)
    prompt_effect = rng.normal(-0.5, 0.3, n_prompts)  # what any head set of these layers does to a prompt
    null = base + prompt_effect + rng.normal(0, 0.4, (draws, n_prompts))
    selection = base + prompt_effect + importance + rng.normal(0, 0.4, (draws, n_prompts))
    ranked = base + prompt_effect + rng.normal(0, 0.4, n_prompts) + shift
    return circuit_parts(base, ranked, null, selection, SUITE)


def _h1(rng: np.random.Generator, n_prompts: int = 33, draws: int = 100, shift: np.ndarray | float = 0.0) -> float:
    return intersection_union_p(_h1_parts(rng, n_prompts, draws, shift)["parts"])


def test_h1_holds_its_size_where_the_ranking_is_a_random_set():
    rng = np.random.default_rng(0)
    assert _rate_ok(sum(_h1(rng) < ALPHA for _ in range(200)), 200)


def test_h1_needs_the_prompt_level_bound_not_only_the_set_level_p():
    """Two prompts with a huge drop make the ranked set beat every random set (set-level p = 1/101), but the
    per-prompt effect is zero on 31 of 33 prompts: the bootstrap over prompts keeps the composite p above alpha."""
    rng = np.random.default_rng(1)
    shift = np.zeros(33)
    shift[:2] = -40.0
    base = rng.normal(3.0, 1.0, 33)
    null = base - 0.5 + rng.normal(0, 0.1, (100, 33))
    ranked = base - 0.5 + rng.normal(0, 0.1, 33) + shift
    t = circuit_parts(base, ranked, null, null, SUITE)
    assert t["parts"]["random_head_sets"] < ALPHA and t["parts"]["selection_null"] < ALPHA
    assert t["parts"]["prompts"] >= ALPHA and intersection_union_p(t["parts"]) >= ALPHA


def test_h1_supports_a_ranking_that_lowers_every_prompt():
    rng = np.random.default_rng(2)
    assert _h1(rng, shift=np.full(33, -1.0)) < ALPHA


def test_h1_fails_a_ranking_that_beats_random_heads_but_not_label_free_selections():
    """The calibration's case: on label-shuffled pairs the ranking picks generically important heads, which lower
    the refusal score more than layer-matched random heads (both layer-matched parts pass) but no more than the
    same rule picks with each pair's direction chosen by a coin."""
    rng = np.random.default_rng(9)
    t = _h1_parts(rng, shift=-1.0, importance=-1.0)
    assert t["parts"]["random_head_sets"] < ALPHA and t["parts"]["prompts"] < ALPHA
    assert t["parts"]["selection_null"] >= ALPHA and intersection_union_p(t["parts"]) >= ALPHA


def test_h1_supports_a_ranking_that_beats_label_free_selections_too():
    t = _h1_parts(np.random.default_rng(10), shift=-1.0, importance=-0.4)
    assert all(p < ALPHA for p in t["parts"].values()) and intersection_union_p(t["parts"]) < ALPHA
    assert t["parts"]["selection_null"] == pytest.approx(1 / 101)


def test_selections_equal_to_the_ranked_sets_tie_against_them():
    """Where every label-free selection is the ranked set (scored once, the ranked scores reused), the selection
    part is p = 1 for H1 and H3: an exact tie, whatever the float summation."""
    rng = np.random.default_rng(17)
    base = rng.normal(3.0, 1.0, 33)
    ranked = base + rng.normal(-1.0, 0.3, 33)
    assert circuit_parts(base, ranked, base + rng.normal(0, 0.1, (20, 33)), np.stack([ranked] * 20),
                         SUITE)["parts"]["selection_null"] == 1.0
    cc = _substrate(rng, 1.5)
    cc = dataclasses.replace(cc, selection_null={a: [float(np.mean(np.array(cc.ranked[a])[cc.judged[a]]))] * 100
                                                 for a in CATS})
    assert substrate_parts(cc)["parts"]["selection_null"] == 1.0


def test_h1_holds_its_size_where_the_ranking_is_one_more_label_free_selection():
    """Under label-shuffled training data the ranked set is exchangeable with the label-free selections: important
    heads (shift = importance, far beyond the random sets) are supported at most at about alpha."""
    rng = np.random.default_rng(11)
    assert _rate_ok(sum(intersection_union_p(_h1_parts(rng, shift=-1.0, importance=-1.0)["parts"]) < ALPHA
                        for _ in range(200)), 200)


def _head_atp(delta: np.ndarray, categories: list[str], pair_ids: list[list[str]],
              direction: str = "harmless_to_harmful") -> Attribution:
    """An ``atp_noise`` / ``atp_reverse``-like :class:`Attribution` whose per-pair head deltas are ``delta`` (4 heads
    per layer), through the cache's dict form as the stages build it."""
    from mech.patching import PatchResult
    from mech.patching.spec import Patch, Site

    patches = [Patch((Site(j // 4, "z", (-1,), (j % 4,)),), {"layer": j // 4, "component": "z", "head": j % 4,
                                                             "position": "all"})
               for j in range(delta.shape[1])]
    n = delta.shape[0]
    res = PatchResult(kind="head", method="atp", direction=direction, patches=patches, raw=delta + 1.0,
                      clean=np.ones(n), source=np.zeros(n))
    return Attribution.from_json({"head": res.to_dict(), "categories": categories}, pair_ids, Uses(select=[]))


def _selective_and_important(rng: np.random.Generator, n_pairs: int = 24, n_heads: int = 16) -> tuple:
    """Per-pair AtP deltas of 16 heads: heads 0-1 carry refusal (harmless → harmful −1, harmful → harmless +1),
    heads 2-5 are generically important (patching in any other prompt's activation lowers the score: −0.5 either
    way, noisy), the rest small noise."""
    fwd = rng.normal(0, 0.05, (n_pairs, n_heads))
    rev = rng.normal(0, 0.05, (n_pairs, n_heads))
    fwd[:, :2] -= 1.0
    rev[:, :2] += 1.0
    fwd[:, 2:6] += rng.normal(-0.5, 0.3, (n_pairs, 4))
    rev[:, 2:6] += rng.normal(-0.5, 0.3, (n_pairs, 4))
    return fwd, rev


def test_label_free_selections_are_seeded_mix_rows_and_keep_the_ranking_rule():
    rng = np.random.default_rng(12)
    fwd, rev = _selective_and_important(rng)
    mixed = label_free_delta(fwd, rev, 0, 1)
    assert all((mixed[i] == fwd[i]).all() or (mixed[i] == rev[i]).all() for i in range(len(fwd)))
    assert 0 < sum((mixed[i] == rev[i]).all() for i in range(len(fwd))) < len(fwd)  # a coin, not a constant
    assert (label_free_delta(fwd, rev, 0, 1) == mixed).all() and not (label_free_delta(fwd, rev, 0, 2) == mixed).all()
    labels = [f"L{j // 4}.H{j % 4}" for j in range(16)]
    assert set(top_of(fwd, labels, 2)) == {"L0.H0", "L0.H1"}  # the true labels pick the refusal heads
    sets = selection_null_sets(fwd, rev, labels, 2, 0, 50)
    assert len(sets) == 50 and sets == selection_null_sets(fwd, rev, labels, 2, 0, 50)
    # the coin cancels the refusal heads' sign: label-free selections pick the generically important heads
    assert sum(bool(set(x) & {"L0.H0", "L0.H1"}) for x in sets) <= 2
    assert sum(set(x) <= {"L0.H2", "L0.H3", "L1.H0", "L1.H1"} for x in sets) >= 48
    with pytest.raises(ValueError, match="differ in shape"):
        label_free_delta(fwd, rev[:3], 0, 1)


def test_reverse_deltas_align_by_pair_id_and_h3_selections_use_each_category_s_pairs():
    rng = np.random.default_rng(13)
    fwd, rev = _selective_and_important(rng, n_pairs=6)
    ids = [[f"h{i}", f"s{i}"] for i in range(6)]
    cats = ["a", "a", "a", "b", "b", "b"]
    order = [4, 0, 2]  # H1 ranks on a subset of the train pairs, in its own order
    atp = _head_atp(fwd[order], [cats[i] for i in order], [ids[i] for i in order])
    reverse = _head_atp(rev, cats, ids, "harmful_to_harmless")
    f, r, labels = reverse_deltas(atp, reverse, [ids[i] for i in order])
    assert np.allclose(f, fwd[order]) and np.allclose(r, rev[order]) and labels[:2] == ["L0.H0", "L0.H1"]
    with pytest.raises(ValueError, match="no reverse AtP"):
        reverse_deltas(atp, _head_atp(rev[:2], cats[:2], ids[:2]), [ids[i] for i in order])
    full = _head_atp(fwd, cats, ids)
    sel = category_selections(full, reverse, ["a", "b"], 2, 0, 20)
    assert set(sel) == {"a", "b"} and all(len(v) == 20 for v in sel.values())
    # draw s of category a is the rule on a's rows of that draw's mixed deltas (the same coins for every category)
    mixed = label_free_delta(fwd, rev, 0, 3)
    assert sel["a"][2] == top_of(mixed[:3], labels, 2) and sel["b"][2] == top_of(mixed[3:], labels, 2)
    assert top_heads(full, 2, ["a"]) == top_of(fwd[:3], labels, 2)


# ----------------------------------------------------------------------------------------------------- H2

N_LAYERS = 12


def _probe(rng: np.random.Generator, decodable_from: int | None, n_test: int = 40) -> LayerProbe:
    """A layer_probe output: test correctness per prompt and layer, validation accuracy, shuffled-label nulls."""
    correct = rng.random((n_test, N_LAYERS)) < 0.5
    val = list(rng.uniform(0.4, 0.6, N_LAYERS))
    if decodable_from is not None:
        correct[:, decodable_from:] = rng.random((n_test, N_LAYERS - decodable_from)) < 0.95
        val[decodable_from:] = [0.95] * (N_LAYERS - decodable_from)
    null = rng.binomial(n_test, 0.5, (200, N_LAYERS)) / n_test
    dla = DirectLogitAttribution([], [], [], ["attn", "mlp"], [], [])  # not read by the primary
    return LayerProbe(val_accuracy=val, test_correct=correct.astype(int).tolist(), test_accuracy=[],
                      null_accuracy=null.tolist(), dla=dla, n_train_pairs=0, n_val_pairs=0, n_test_pairs=n_test // 2,
                      uses=Uses())


def _effect(rng: np.random.Generator, rises_at: int, n_pairs: int = 8) -> np.ndarray:
    """Normalized resid_pre patching effect [pairs, layers]: about 0 below ``rises_at``, about 1 from it on."""
    layers = np.arange(N_LAYERS)
    return (layers >= rises_at).astype(float)[None] + rng.normal(0, 0.05, (n_pairs, N_LAYERS))


def _h2(probe: LayerProbe, eff: np.ndarray) -> float:
    return intersection_union_p(hierarchy_parts(probe, eff, N_LAYERS, SUITE)["parts"])


def test_h2_supports_read_early_moved_later():
    rng = np.random.default_rng(3)
    t = hierarchy_parts(_probe(rng, 2), _effect(rng, 6), N_LAYERS, SUITE)
    assert t["L1"] == 2 and t["L2"] == 9  # chosen on validation in the first third; int(0.75 x 12)
    assert intersection_union_p(t["parts"]) < ALPHA


def test_h2_fails_without_a_hierarchy_or_with_shuffled_training_labels():
    rng = np.random.default_rng(4)
    # read where it is used: what is decodable at L1 already moves refusal from the post-instruction positions
    assert _h2(_probe(rng, 2), _effect(rng, 1)) >= ALPHA
    # never moved to the post-instruction positions by the later layer
    assert _h2(_probe(rng, 2), _effect(rng, 11)) >= ALPHA
    # label-shuffled training data: nothing to read at any layer
    assert _h2(_probe(rng, None), _effect(rng, 6)) >= ALPHA


def test_h2_holds_its_size_where_nothing_is_decodable():
    rng = np.random.default_rng(5)
    assert _rate_ok(sum(_h2(_probe(rng, None), _effect(rng, 6)) < ALPHA for _ in range(200)), 200)


def test_signed_rank_p_fails_closed():
    assert signed_rank_p(np.zeros(8), "less") == 1.0 and signed_rank_p(np.array([np.nan] * 3), "greater") == 1.0
    assert signed_rank_p(np.full(8, -0.3) + np.arange(8) * 1e-3, "less") == pytest.approx(1 / 256)


# ----------------------------------------------------------------------------------------------------- H3

CATS = [f"c{i}" for i in range(11)]


def _substrate(rng: np.random.Generator, ranked_mean: float, draws: int = 100, same_number: bool = False,
               selection_mean: float = 0.0) -> CrossCategory:
    """A cross_category output: 3 test prompts per category; each category's random sets drop its judged prompts by
    N(0, 1) per draw, its label-free selections by N(``selection_mean``, 1); its ranked set by ``ranked_mean``
    (+ noise, or one number for every category)."""
    pcats = [c for c in CATS for _ in range(3)]
    judged = {a: off_category_prompts(pcats, a, 10) for a in CATS}
    common = rng.normal(ranked_mean, 1.0)
    ranked = {a: (np.full(len(pcats), common) if same_number else rng.normal(ranked_mean, 1.0, len(pcats))).tolist()
              for a in CATS}
    null = {a: rng.normal(0.0, 1.0, draws).tolist() for a in CATS}
    selection = {a: rng.normal(selection_mean, 1.0, draws).tolist() for a in CATS}
    return CrossCategory(k=1, categories=CATS, rankings={}, ranked=ranked, judged=judged, null=null,
                         random={a: [0.0] * len(judged[a]) for a in CATS}, random_sets={}, prompt_categories=pcats,
                         selection_null=selection, selection_sets={}, n_selection_scored={}, h1_heads=[], uses=Uses())


def _h3(cc: CrossCategory) -> float:
    return intersection_union_p(substrate_parts(cc)["parts"])


def test_h3_holds_its_size_where_category_sets_are_random_sets():
    rng = np.random.default_rng(6)
    assert _rate_ok(sum(_h3(_substrate(rng, 0.0)) < ALPHA for _ in range(200)), 200)


def test_h3_eleven_categories_that_are_one_number_count_once():
    """The earlier Wilcoxon over categories gave p = 1/2048 whenever all 11 excesses were positive, even when they
    were one number repeated; the set-level null does not count that number eleven times."""
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(7)
    cc = _substrate(rng, 0.3, same_number=True)
    cc = dataclasses.replace(cc, ranked={a: [0.3] * len(cc.prompt_categories) for a in CATS})  # the same small drop
    excess = np.array([np.mean(np.array(cc.ranked[a])[cc.judged[a]]) for a in CATS]) + rng.normal(0, 1e-3, 11)
    assert float(wilcoxon(excess, alternative="greater").pvalue) < ALPHA  # the old test: "supported"
    assert _h3(cc) >= ALPHA  # 0.3 is well inside the joint draws' spread


def test_h3_supports_sets_that_transfer_beyond_random():
    assert _h3(_substrate(np.random.default_rng(8), 1.5)) < ALPHA


def test_h3_fails_sets_that_beat_random_heads_but_not_label_free_selections():
    """Category sets of generically important heads (as on label-shuffled training data) beat the layer-matched
    random draws but not the joint draws of label-free selections: NOT supported."""
    parts = substrate_parts(_substrate(np.random.default_rng(14), 1.5, selection_mean=1.5))["parts"]
    assert parts["random_head_sets"] < ALPHA and parts["selection_null"] >= ALPHA
    assert intersection_union_p(parts) >= ALPHA


def test_h3_supports_sets_that_beat_label_free_selections_too():
    parts = substrate_parts(_substrate(np.random.default_rng(15), 1.5, selection_mean=0.3))["parts"]
    assert parts["random_head_sets"] == parts["selection_null"] == pytest.approx(1 / 101)
    assert intersection_union_p(parts) < ALPHA


def test_h3_holds_its_size_where_category_sets_are_label_free_selections():
    rng = np.random.default_rng(16)
    # exchangeable: the ranked sets' drops are one more draw of the selections' (per category mean of 10 prompts of
    # N(1.5, 1) vs a selection's mean drop N(1.5, 1 / sqrt(10)))
    hits = 0
    for _ in range(200):
        cc = _substrate(rng, 1.5)
        cc = dataclasses.replace(cc, selection_null={a: rng.normal(1.5, 1 / math.sqrt(10), 100).tolist()
                                                     for a in CATS})
        hits += _h3(cc) < ALPHA
    assert _rate_ok(hits, 200)


def test_h3_helpers():
    pcats = ["a", "a", "b", "b", "c", "c", "c"]
    assert off_category_prompts(pcats, "a", 3) == [2, 3, 4]  # round-robin over b and c
    assert off_category_prompts(pcats, "a", 0) == [2, 3, 4, 5, 6]
    assert jaccard(["L1.H0", "L2.H1"], ["L2.H1", "L3.H0"]) == pytest.approx(1 / 3) and math.isnan(jaccard([], []))


# ----------------------------------------------------------------------------------------------------- H4


def _grade(outcome: str) -> Grade:
    return Grade(outcome == "refusal", outcome != "incoherent", 1.0, 0.0, (), outcome, None, None,  # type: ignore[arg-type]
                 outcome, False)  # type: ignore[arg-type]


def _ctl(selected: int, counts: list[int]) -> DirectionControls:
    return DirectionControls(computed=True, uses=Uses(), selected=selected, counts=counts,
                             kinds=["isotropic"] * len(counts))


def _h4(n_removed: int, n_refused: int = 30, n: int = 33, ctl: DirectionControls | None = None,
        passed: bool = True) -> dict:
    before = [_grade("refusal")] * n_refused + [_grade("compliance")] * (n - n_refused)
    after = [_grade("compliance")] * n_removed + [_grade("refusal")] * (n_refused - n_removed) + \
        [_grade("compliance")] * (n - n_refused)
    t = direction_parts(before, after, "substring+coherence", ctl or _ctl(11, [0, 1, 2] * 67), passed, SUITE)
    t["p"] = intersection_union_p(t["parts"], t["gates"])
    return t


def test_h4_seven_flips_of_thirty_fail_the_effect_floor():
    """The issue's case: McNemar alone passes with 7 of 30 refusals removed (a 23% cut); the floor does not."""
    t = _h4(7)
    assert t["parts"]["mcnemar"] < ALPHA and t["parts"]["relative_cut_floor"] > 0.5
    assert t["p"] >= ALPHA and t["cut"].rate == pytest.approx(7 / 30)


def test_h4_supports_a_direction_that_removes_refusal_beyond_its_controls():
    t = _h4(30)
    assert t["p"] < ALPHA and t["cut"].low > SUITE.relative_cut_min
    assert t["parts"]["controls"] == pytest.approx(1 / 202)


def test_h4_fails_when_a_control_removes_as_much_or_the_filters_fail():
    strong = _ctl(11, [0] * 150 + [11] * 50)  # the shuffled-label directions remove as much as the selected one
    assert _h4(30, ctl=strong)["p"] >= ALPHA
    assert _h4(30, passed=False)["p"] == 1.0
    assert _h4(30, ctl=DirectionControls(computed=False, uses=Uses(),
                                         reason="no candidate passed Arditi's filters"))["p"] == 1.0


def test_control_directions_and_their_short_measure_on_a_tiny_model(tiny_qwen2):
    """The controls are unit vectors of three kinds; covariance-matched ones lie in the span of the centred train
    activations; the short measure answers per prompt, under an ablation and without one."""
    lm = tiny_qwen2
    pairs = default_pairs().pairs()[:6]
    harmful, harmless = [h.prompt for h, _ in pairs], [s.prompt for _, s in pairs]
    acts_h, acts_s = site_activations(lm, harmful, 1, -1), site_activations(lm, harmless, 1, -1)
    assert acts_h.shape == (6, lm.shape.d_model) and acts_h.dtype == torch.float64
    ctl = control_directions(acts_h, acts_s, n_iso=3, n_cov=4, n_shuffled=5, seed=0)
    assert [k for k, _ in ctl] == ["shuffled"] * 5 + ["covariance"] * 4 + ["isotropic"] * 3
    assert all(abs(float(v.norm()) - 1) < 1e-9 for _, v in ctl)
    x = torch.cat([acts_h, acts_s])
    q, _ = torch.linalg.qr((x - x.mean(0)).T)  # an orthonormal basis of the centred activations' span
    for _, v in [c for c in ctl if c[0] == "covariance"]:
        assert float((v - q @ (q.T @ v)).norm()) < 1e-6
    assert control_directions(acts_h, acts_s, 2, 2, 2, seed=0)[0][1].tolist() == ctl[0][1].tolist()  # seeded
    det = SubstringDetector()
    plain = short_measure(lm, harmful[:3], None, det, 3)
    ablated = short_measure(lm, harmful[:3], ctl[0][1], det, 3)
    assert len(plain) == len(ablated) == 3 and all(isinstance(b, bool) for b in plain + ablated)


def test_balanced_slices_take_every_category_in_turn():
    ps = default_pairs().harmful()
    first = balanced(ps, 11)
    assert len({p.category for p in first}) == min(11, len(ps.categories()))
    assert balanced(ps, 3) == first[:3] and len(balanced(ps, 10_000)) == len(ps)


_FORCED_REFUSAL = '''

@pytest.fixture(scope="session")
def baseline(baseline):
    """A constructed refusing model for the machinery: the baseline grades every harmful prompt a refusal and every
    harmless prompt a compliance (a random tiny model refuses nothing); interventions are graded as they come."""
    import dataclasses

    rows = []
    for r in baseline.rows:
        o = "refusal" if r.label == "harmful" else "compliance"
        g = dataclasses.replace(r.grade, substring=o == "refusal", substring_outcome=o, outcome=o)
        rows.append(dataclasses.replace(r, grade=g, decision_refused=o == "refusal", substring_refused=o == "refusal",
                                        outcome=o))
    return dataclasses.replace(baseline, rows=rows)
'''


@pytest.mark.slow
@pytest.mark.parametrize("filters", ["arditi", "open"])
def test_h4_primary_runs_end_to_end_and_fails_where_nothing_is_found(tiny_qwen2, pytester: pytest.Pytester,
                                                                      tmp_path, monkeypatch, filters):
    """H4's primary, fixtures and controls on a tiny model whose baseline is made to refuse every harmful prompt
    (the suite copied, one fixture overridden in its conftest): it gets a verdict, never an error, with its parts
    recorded, and it is NOT supported. With Arditi's filters no candidate of a random model passes them: p = 1 and
    the exploratory H4 claims are `not tested`. With the filters opened (``--set``) the controls run: a random
    model's short answers hold no refusal marker under any direction, so the controls remove as much as the
    selected direction."""
    import json
    import shutil
    from pathlib import Path

    from tests.helpers import small_prompt_file
    from tests.test_report import TINY_SET

    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    for d in ("mech", "fixtures", "hypotheses", "data"):
        shutil.copytree(root / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("conftest.py", "pyproject.toml"):
        shutil.copy2(root / f, repo / f)
    with open(repo / "hypotheses" / "conftest.py", "a") as fh:
        fh.write(_FORCED_REFUSAL)
    tiny_qwen2.model.save_pretrained(tmp_path / "m")
    tiny_qwen2.tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.setenv("PYTHONPATH", str(repo))
    monkeypatch.setenv("MECH_REPORTS_DIR", str(tmp_path / "reports"))
    result = pytester.runpytest_subprocess(
        str(repo / "hypotheses" / "test_single_direction.py"), "--rootdir", str(repo), "-c", str(repo / "pyproject.toml"),
        "--model", str(tmp_path / "m"), "--prompts", str(small_prompt_file(tmp_path / "prompts.csv")),
        "--cache-dir", str(tmp_path / "cache"), "--max-new-tokens", "4", "-p", "no:cacheprovider", "-q", "--tb=line",
        "--no-progress", *TINY_SET,
        *(["--set", "induce_threshold=-1000", "--set", "kl_threshold=1000"] if filters == "open" else []), timeout=600)
    findings = json.loads((tmp_path / "reports" / "findings.partial.json").read_text())
    claims = {c["id"].split("::")[1]: c for c in findings["claims"]}
    assert not [c for c in claims.values() if c["verdict"] == "error"], result.stdout.str()[-3000:]
    c = claims["test_directional_ablation_removes_refusal"]
    assert c["verdict"] == "NOT supported", (c["message"], c["numbers"])
    parts, gates = c["numbers"]["p_parts"], c["numbers"]["gates"]
    assert set(parts) == {"mcnemar", "relative_cut_floor", "controls"} and set(gates) == {"passed_filters"}
    assert c["p_value"] == (1.0 if not gates["passed_filters"] or parts["controls"] is None
                            else max(parts.values()))
    assert gates["passed_filters"] == (filters == "open")
    if gates["passed_filters"]:
        ctl = c["numbers"]["controls"]
        assert ctl["computed"] and ctl["n_prompts"] == 3 and ctl["n_at_least_selected"] == 7  # 3 + 2 + 2 controls, all tie
        assert set(ctl["mean_removed_by_kind"]) == {"shuffled", "covariance", "isotropic"}
        assert parts["controls"] == 1.0 and c["p_value"] == 1.0
    else:
        assert all(claims[n]["verdict"] == "not tested" and "Arditi's filters" in claims[n]["message"]
                   for n in ("test_activation_addition_induces_refusal", "test_ablation_side_effects_small"))
