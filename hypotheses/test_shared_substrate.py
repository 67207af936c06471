"""H3 — a shared substrate: the same heads serve refusal across harm categories.

Primary: ablating one category's top heads lowers refusal on the *other* categories' harmful test prompts
more than layer-matched random head sets of the same size do, on the same prompts. Exploratory, per category
(``-k fraud``): that transfer for this category, and whether its attribution map is specific to it (agrees
with the others' less than a random subset of prompts does).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import wilcoxon

from fixtures.common import require_gate
from mech import plots
from mech.patching import PatchResult
from mech.stats import bootstrap_ci, permutation_pvalue, spearman

pytestmark = [pytest.mark.shared_substrate, pytest.mark.realmodel, pytest.mark.slow]


def _excess(cc: dict, a: str) -> np.ndarray:
    """Per off-category prompt: drop under A's heads minus the drop under A's layer-matched random sets."""
    off = [i for i, c in enumerate(cc["prompt_categories"]) if c != a]
    return (np.array(cc["ranked"][a]) - np.array(cc["random"][a]))[off]


@pytest.mark.primary
def test_heads_transfer_beyond_random(cross_category, suite, claim):
    """PRIMARY. Across categories, mean-ablating category A's top-k heads lowers the refusal score of the other
    categories' harmful test prompts more than layer-matched random sets of k heads (same prompts): one-sided
    Wilcoxon signed-rank over categories of the mean excess drop, p < alpha. Effect: mean excess drop (log-odds)
    with a 95% bootstrap CI over categories."""
    cats = cross_category["categories"]
    excess = np.array([_excess(cross_category, a).mean() for a in cats])
    p = float(wilcoxon(excess, alternative="greater").pvalue) if len(cats) >= 2 else float("nan")
    lo, hi = bootstrap_ci(excess, n_resamples=suite.n_bootstrap, seed=suite.split_seed)
    sd = float(excess.std(ddof=1)) if len(excess) > 1 else float("nan")
    from scipy.stats import t as student_t

    mde = float(student_t.ppf(1 - suite.alpha, len(excess) - 1) * sd / np.sqrt(len(excess))) if len(excess) > 1 else None
    claim.result(statistic=float(np.mean(excess)), p_value=p, effect=float(np.mean(excess)), ci=[lo, hi], n=len(cats),
                 mde=mde, test="Wilcoxon signed-rank over categories, one-sided",
                 null=f"{suite.n_random_per_category} layer-matched random head sets per category, same prompts")
    M = np.array([[np.mean([d for d, c in zip(cross_category["ranked"][a], cross_category["prompt_categories"],
                                              strict=True) if c == b]) for b in cats] for a in cats])
    claim.record(k=cross_category["k"], excess_by_category=dict(zip(cats, excess.tolist(), strict=True)))
    claim.uses(cross_category)
    claim.figure(plots.heatmap(M, cats, cats, "Refusal-score drop: ablate heads of row category, measure column",
                               "measured on", "heads from", colorscale="Reds", zmid=None), "Cross-category ablation matrix")
    assert p < suite.alpha, f"mean excess drop over layer-matched random heads {np.mean(excess):.3f}: p = {p:.3g}"


def test_category_heads_transfer(cross_category, category, suite, claim):
    """Exploratory. This category's top-k heads lower the other categories' refusal scores more than its
    layer-matched random head sets do (one-sided Wilcoxon signed-rank over the off-category test prompts, p < alpha
    adjusted within the family of categories by the suite's exploratory correction)."""
    if category not in cross_category["categories"]:
        pytest.skip(f"no train pairs of category {category} to rank heads on")
    ex = _excess(cross_category, category)
    p = float(wilcoxon(ex, alternative="greater").pvalue)
    lo, hi = bootstrap_ci(ex, n_resamples=suite.n_bootstrap, seed=suite.split_seed)
    claim.result(statistic=float(ex.mean()), p_value=p, effect=float(ex.mean()), ci=[lo, hi], n=len(ex),
                 test="Wilcoxon signed-rank over off-category prompts, one-sided", null="layer-matched random heads")
    claim.record(heads=cross_category["rankings"][category])
    claim.uses(cross_category)
    assert p < suite.alpha, f"{category}: excess drop {ex.mean():.3f} (95% CI {lo:.3f}–{hi:.3f}), p = {p:.3g}"


@pytest.fixture(scope="module")
def map_specificity(atp_noise, refusal_gate, suite):
    """Spearman ρ of each category's mean AtP head map against the other categories' pooled map, and the same ρ
    for random subsets of train pairs of that category's size (the category labels shuffled): a category with
    heads of its own agrees with the rest *less* than a random subset does (the claims are corrected within their
    family, the categories, at the end of the run)."""
    require_gate(refusal_gate)  # attribution to a refusal score means nothing for a model that does not refuse
    delta = PatchResult.from_dict(atp_noise["head"]).delta  # [n_pairs, n_heads]
    cats = np.array(atp_noise["categories"])
    names = sorted(set(cats.tolist()))
    if len(names) < 2:
        pytest.skip(f"map agreement needs ≥ 2 categories among the ranked train pairs, has {len(names)}")
    rng = np.random.default_rng(suite.split_seed)

    def rho(labels, c):
        mine, rest = labels == c, labels != c
        return spearman(np.nanmean(delta[mine], 0), np.nanmean(delta[rest], 0)).rho

    shuffles = [rng.permutation(cats) for _ in range(suite.n_label_shuffles)]
    out = {}
    for c in names:
        obs = rho(cats, c)
        null = [rho(s, c) for s in shuffles]
        out[c] = {"rho": obs, "test": permutation_pvalue(obs, null, "less"), "null_mean": float(np.nanmean(null))}
    return out


def test_category_map_is_specific(map_specificity, atp_noise, category, suite, claim):
    """Exploratory. This category's head attribution map (harmless → harmful AtP, train pairs) is specific to it:
    it agrees with the other categories' pooled map less than random subsets of the same size do (Spearman ρ,
    shuffled category labels, one-sided permutation test, p < alpha adjusted within the family of categories by
    the suite's exploratory correction). NOT supported means no evidence of category-specific heads, as a shared
    substrate predicts."""
    if category not in map_specificity:
        pytest.skip(f"no train pairs of category {category}")
    m = map_specificity[category]
    claim.result(statistic=m["rho"], p_value=m["test"].p_value, effect=m["rho"] - m["null_mean"], n=m["test"].n_null,
                 test="Spearman ρ vs shuffled category labels (permutation, one-sided less)",
                 null=f"{m['test'].n_null} random subsets of the same size (shuffled category labels)")
    claim.record(shuffled_mean_rho=m["null_mean"])
    claim.uses({"uses": {"judge": atp_noise["uses"]["select"]}})  # a claim about the train maps themselves
    assert m["test"].p_value < suite.alpha, (f"ρ = {m['rho']:.3f} vs random subsets {m['null_mean']:.3f}: "
                                             f"p = {m['test'].p_value:.3g}")
