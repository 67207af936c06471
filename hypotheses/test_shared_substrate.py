"""H3 — a shared substrate: the same heads serve refusal across harm categories.

Primary: ablating one category's top heads (ranked on all of its train pairs) lowers refusal on the *other*
categories' harmful test prompts more than layer-matched random head sets do, and more than label-free selections
of the same rule do (each train pair's AtP direction chosen by a coin), on the same prompts, as set-level
permutation tests over joint draws. Reported beside it: how much the category head sets
overlap (Jaccard, with each other and with H1's top-k) and the discriminating contrast, transfer to the other
categories against transfer to the category's own prompts. Exploratory, per category (``-k fraud``): that transfer
for this category, and whether its attribution map is specific to it (agrees with the others' less than a random
subset of prompts does).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import wilcoxon

from fixtures.common import require_gate
from fixtures.h1_circuit import Attribution
from fixtures.h3_substrate import CrossCategory, jaccard, substrate_parts
from fixtures.uses import Uses
from mech import plots
from mech.stats import (
    bootstrap_ci,
    intersection_union_p,
    null_detectable_shift,
    permutation_pvalue,
    spearman,
)

pytestmark = [pytest.mark.shared_substrate, pytest.mark.realmodel, pytest.mark.slow]


def _excess(cc: CrossCategory, a: str) -> np.ndarray:
    """Per judged off-category prompt: drop under A's heads minus the mean drop under A's layer-matched random
    sets."""
    return np.array(cc.ranked[a])[cc.judged[a]] - np.array(cc.random[a])


@pytest.mark.primary
def test_heads_transfer_beyond_random(cross_category, suite, claim, selection_stability):
    """PRIMARY. A shared substrate: mean-ablating category A's top-k heads (ranked on all of A's train pairs)
    lowers the refusal score of the other categories' harmful test prompts more than layer-matched random sets of
    k heads do, and more than label-free selections do. Two set-level permutation tests, both needed: the
    statistic is the mean over categories of A's drop on its judged off-category prompts; (1) each of
    ``n_random_per_category`` joint draws gives every category one random set with its count per layer and the
    same statistic; (2) each of ``n_selection_null`` joint draws flips one coin per train pair for its AtP
    direction (harmless → harmful or harmful → harmless) and gives every category its top k by the same rule,
    and the same statistic (a selection equal to the ranked set ties against it); one-sided Monte-Carlo
    p = (1 + #draws ≥ observed)/(1 + draws) each. One p: the intersection–union p, the larger of the two. Effect:
    observed − mean of the random draws (log-odds), 95% bootstrap CI over categories of their excess.

    How it fails: category sets that do no more off-category than random heads of the same layers (category-
    specific circuits, or heads that matter only where they were ranked) give a draw-like statistic (1); sets of
    generically important heads, which lower any refusal score whatever the labels (as on label-shuffled training
    data), do no more than label-free selections (2). Eleven categories that are one number repeated count once:
    the p is over set draws, not over categories. Recorded, not tested: the overlap of the category sets (Jaccard)
    and the transfer to the own category against the others (prompt-level bootstrap CIs) — a shared substrate
    transfers about as much to the others as to its own."""
    cc = cross_category
    cats = cc.categories
    t = substrate_parts(cc)
    obs, null, selection, test, sel = t["obs"], t["null"], t["selection"], t["test"], t["selection_test"]
    parts = t["parts"]
    p = intersection_union_p(parts)
    excess = np.array([_excess(cc, a).mean() for a in cats])
    lo, hi = bootstrap_ci(excess, n_resamples=suite.n_bootstrap, seed=suite.split_seed)
    claim.result(statistic=obs, p_value=p, effect=obs - float(null.mean()), ci=[lo, hi], n=len(cats),
                 mde=null_detectable_shift(null, suite.alpha, "greater"), unit="log-odds (excess drop over random)",
                 test="intersection–union: Monte-Carlo permutation over joint draws of layer-matched random sets "
                      "and over joint draws of label-free selections, both one-sided",
                 null=f"{len(null)} joint draws of one layer-matched random head set per category; {len(selection)} "
                      "joint draws of label-free selections (coin per train pair for the AtP direction); same prompts")
    pc = np.array(cc.prompt_categories)
    transfer = {}
    for a in cats:
        d = np.array(cc.ranked[a])
        own, other = d[pc == a], d[pc != a]
        transfer[a] = {"own": float(own.mean()), "own_ci": list(bootstrap_ci(own, n_resamples=suite.n_bootstrap,
                                                                             seed=suite.split_seed)),
                       "other": float(other.mean()), "other_ci": list(bootstrap_ci(
                           other, n_resamples=suite.n_bootstrap, seed=suite.split_seed)), "n_own": int(own.size)}
    own_minus_other = np.array([transfer[a]["own"] - transfer[a]["other"] for a in cats])
    pair_j = [jaccard(cc.rankings[a], cc.rankings[b]) for i, a in enumerate(cats) for b in cats[i + 1:]]
    same = {a: sum(set(x) == set(cc.rankings[a]) for x in cc.selection_sets[a]) for a in cats}
    claim.record(p_parts=parts, k=cc.k, n_judged_per_category=len(next(iter(cc.judged.values()))),
                 random_mean=float(null.mean()), selection_mean=float(selection.mean()),
                 n_selection_null=len(selection), selection_equal_to_ranked=same,
                 n_selection_distinct_scored=cc.n_selection_scored,
                 excess_by_category=dict(zip(cats, excess.tolist(), strict=True)),
                 jaccard_between_categories_mean=float(np.mean(pair_j)) if pair_j else None,
                 jaccard_with_h1_top_k={a: jaccard(cc.rankings[a], cc.h1_heads) for a in cats},
                 transfer_own_vs_other=transfer, own_minus_other_mean=float(own_minus_other.mean()),
                 own_minus_other_ci=list(bootstrap_ci(own_minus_other, n_resamples=suite.n_bootstrap,
                                                      seed=suite.split_seed)))
    claim.uses(cc)
    selection_stability.record(claim, "H3", {a: cc.rankings[a] for a in cats})  # --set stability_resamples=B
    M = np.array([[np.mean([d for d, c in zip(cc.ranked[a], cc.prompt_categories, strict=True) if c == b])
                   for b in cats] for a in cats])
    J = np.array([[jaccard(cc.rankings[a], cc.rankings[b]) for b in cats] for a in cats])
    claim.figure(plots.heatmap(M, cats, cats, "Refusal-score drop: ablate heads of row category, measure column",
                               "measured on", "heads from", colorscale="Reds", zmid=None,
                               z_title="refusal-score drop (log-odds)"), "Cross-category ablation matrix",
                 caption="Contradicted when the off-diagonal drops are no larger than those of layer-matched random "
                         "heads on the same prompts (the joint draws in the numbers).")
    claim.figure(plots.heatmap(J, cats, cats, "Jaccard overlap of the category head sets", "category", "category",
                               colorscale="Blues", zmid=None, z_title="Jaccard index (0–1)"),
                 "Overlap of the category head sets",
                 caption="Descriptive: high overlap everywhere means the category sets are largely one set; the claim "
                         "is decided by the joint random draws.")
    assert p < suite.alpha, (f"mean off-category drop {obs:.3f} vs {len(null)} joint draws of layer-matched random "
                             f"sets {null.mean():.3f} (p {test.p_value:.3g}) and {len(selection)} joint draws of "
                             f"label-free selections {selection.mean():.3f} (p {sel.p_value:.3g}): composite "
                             f"p = {p:.3g}")


def test_category_heads_transfer(cross_category, category_atp, category, suite, claim):
    """Exploratory. This category's top-k heads lower the other categories' refusal scores more than its
    layer-matched random head sets do (one-sided Wilcoxon signed-rank over its ``n_substrate_prompts`` judged
    off-category test prompts, against the mean of its random sets there; p < alpha adjusted within the family of
    categories by the suite's exploratory correction)."""
    if category not in cross_category.categories:
        pairs, judged = _category_lists(category_atp, cross_category)
        pytest.skip(f"no train pairs of category {category} to rank heads on (train pair categories: {pairs})"
                    if category not in category_atp.categories else
                    f"no harmful test prompts of category {category} to judge on (harmful test categories: {judged})")
    ex = _excess(cross_category, category)
    p = float(wilcoxon(ex, alternative="greater").pvalue)
    lo, hi = bootstrap_ci(ex, n_resamples=suite.n_bootstrap, seed=suite.split_seed)
    claim.result(statistic=float(ex.mean()), p_value=p, effect=float(ex.mean()), ci=[lo, hi], n=len(ex),
                 unit="log-odds (excess drop over random)",
                 test="Wilcoxon signed-rank over off-category prompts, one-sided", null="layer-matched random heads")
    claim.record(heads=cross_category.rankings[category])
    claim.uses(cross_category)
    assert p < suite.alpha, f"{category}: excess drop {ex.mean():.3f} (95% CI {lo:.3f}–{hi:.3f}), p = {p:.3g}"


@pytest.fixture(scope="module")
def map_specificity(atp_noise, refusal_gate, suite):
    """Spearman ρ of each category's mean AtP head map against the other categories' pooled map, and the same ρ
    for random subsets of train pairs of that category's size (the category labels shuffled): a category with
    heads of its own agrees with the rest *less* than a random subset does (the claims are corrected within their
    family, the categories, at the end of the run)."""
    require_gate(refusal_gate)  # attribution to a refusal score means nothing for a model that does not refuse
    delta = atp_noise.head.delta  # [n_pairs, n_heads]
    cats = np.array(atp_noise.categories)
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


def _category_lists(category_atp: Attribution, cross_category: CrossCategory) -> tuple[str, str]:
    """The train pairs' categories and the harmful test prompts' (a held-out benchmark's are its own), as text."""
    return (", ".join(sorted(set(category_atp.categories))),
            ", ".join(sorted(set(cross_category.prompt_categories))) or "none")


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
                 unit="Spearman ρ − shuffled mean",
                 test="Spearman ρ vs shuffled category labels (permutation, one-sided less)",
                 null=f"{m['test'].n_null} random subsets of the same size (shuffled category labels)")
    claim.record(shuffled_mean_rho=m["null_mean"])
    claim.uses(Uses(judge=atp_noise.uses.select))  # a claim about the train maps themselves
    assert m["test"].p_value < suite.alpha, (f"ρ = {m['rho']:.3f} vs random subsets {m['null_mean']:.3f}: "
                                             f"p = {m['test'].p_value:.3g}")
