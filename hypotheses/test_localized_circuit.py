"""H1 — a localized refusal circuit: a small set of attention heads is *necessary* for refusal.

Heads are ranked by attribution patching (harmless → harmful) on train pairs; the top k (5% of all heads) are
mean-ablated (means over train harmless prompts) on every harmful test prompt. Two matched nulls: random head
sets with the same number of heads in each layer as the ranked set, and label-free selections (the same ranking
rule on the same pairs, each pair's AtP direction chosen by a coin), which match the ranked set on how important
its heads are.
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures.common import grades_before, require
from fixtures.grading import removal_claim
from fixtures.h1_circuit import circuit_parts
from mech import plots
from mech.stats import (
    bootstrap_ci,
    intersection_union_p,
    null_detectable_shift,
)

pytestmark = [pytest.mark.localized_circuit, pytest.mark.realmodel, pytest.mark.slow]


@pytest.mark.primary
def test_ranked_heads_beat_layer_matched_random(circuit_ablation, top_head_attention, suite, claim,
                                                 selection_stability):
    """PRIMARY. Mean-ablating the top-k attribution-ranked heads (k = 5% of heads) lowers the refusal score of the
    harmful test prompts more than matched head sets of the same size, three tests, all needed:
    (1) over head sets — the ranked set's mean drop beats ≥ 100 layer-matched random sets (one-sided Monte-Carlo
    p); (2) over prompts — the per-prompt effect (ranked Δ − mean random Δ) is below zero with the prompts
    resampled (one-sided bootstrap p of its mean: p < alpha exactly when the one-sided 1 − alpha bound excludes
    no effect); (3) over selections — the ranked set's mean drop beats ≥ 100 label-free selections, the top k by
    the same rule on the same train pairs with each pair's AtP direction (harmless → harmful or harmful →
    harmless) chosen by a seeded coin (one-sided Monte-Carlo p; a selection equal to the ranked set ties against
    it). One p: the intersection–union p, the largest of the three. Effect: ranked Δ − mean random Δ (log-odds),
    95% bootstrap CI over prompts.

    How it fails: a ranking no better than chance loses (1) (the ranked set is one more draw from the null); a
    drop carried by a few prompts, or one that random sets of the same layers reach on most prompts, loses (2); a
    ranking that picks generically important heads, which lower any refusal score whatever the labels (as it does
    on label-shuffled training data), loses (3): there the ranked set is one more label-free selection."""
    c = circuit_ablation
    base, ranked, null = np.array(c.base), np.array(c.ranked), np.array(c.null_scores)  # null [draws, n]
    selection = np.array(c.selection_scores)  # [draws, n]
    t = circuit_parts(base, ranked, null, selection, suite)
    parts, test, d_ranked, d_null, per_prompt = t["parts"], t["test"], t["d_ranked"], t["d_null"], t["per_prompt"]
    sel, d_sel = t["selection_test"], t["d_selection"]
    p_prompts = parts["prompts"]
    lo, hi = bootstrap_ci(per_prompt, n_resamples=suite.n_bootstrap, seed=suite.split_seed)
    p_comp = intersection_union_p(parts)
    same = sum(set(s) == set(c.heads) for s in c.selection_sets)
    claim.result(statistic=d_ranked, p_value=p_comp, effect=float(per_prompt.mean()), ci=[lo, hi],
                 n=len(base), mde=null_detectable_shift(d_null, suite.alpha, "less"),
                 unit="log-odds (ranked − random)",
                 test="intersection–union: Monte-Carlo permutation over layer-matched random head sets, bootstrap "
                      "over prompts, Monte-Carlo permutation over label-free selections, all one-sided",
                 null=f"{len(d_null)} layer-matched random head sets of {c.k}; no per-prompt effect; "
                      f"{len(d_sel)} label-free selections of {c.k} (coin per train pair for the AtP direction)")
    claim.record(p_parts=parts, k=c.k, heads=c.heads, random_mean_delta=float(d_null.mean()),
                 selection_mean_delta=float(d_sel.mean()), n_selection_null=len(d_sel),
                 selection_equal_to_ranked=same, n_selection_distinct_scored=c.n_selection_scored,
                 param_fraction=c.param_fraction, harmless_kl=c.kl, ce_before=c.ce_before,
                 ce_after=c.ce_after)
    claim.uses(c)
    selection_stability.record(claim, "H1", c.heads)  # --set stability_resamples=B
    ks = [p.k for p in c.curve]
    claim.figure(plots.curve(ks, {"top-k AtP heads": [float(np.mean(p.ranked) - base.mean()) for p in c.curve],
                                  "layer-matched random heads (mean)": [float(np.mean(p.random_mean) - base.mean())
                                                                         for p in c.curve]},
                             "Cumulative head ablation: change of the harmful refusal score", "k heads ablated",
                             "Δ mean refusal score (log-odds)"), "Cumulative ablation curve",
                 caption="Contradicted when the top-k curve does not fall below the layer-matched random curve at the "
                         "claim's k: the ranked heads lower the harmful refusal score no more than random heads do.")
    claim.figure(plots.circuit(c.heads), "Circuit: the top-k heads by layer",
                 caption="Where the ranked heads sit (layer, head index); descriptive, the claim is decided by ablation.")
    claim.figure(plots.attention_grid(top_head_attention, ["harmful", "harmless twin"]),
                 "Attention patterns of the top-3 heads on a harmful prompt and its harmless twin (last 12 tokens)",
                 caption="Descriptive (attention weight 0–1, query rows, key columns): what the top heads read; "
                         "nothing here decides the claim.")
    assert p_comp < suite.alpha, (
        f"top-{c.k} Δ = {d_ranked:.3f} vs {len(d_null)} layer-matched random sets {d_null.mean():.3f} (p over "
        f"sets {test.p_value:.3g}); per-prompt effect {per_prompt.mean():.3f} (95% CI {lo:.3f}–{hi:.3f}, p over "
        f"prompts {p_prompts:.3g}); vs {len(d_sel)} label-free selections {d_sel.mean():.3f} (p over selections "
        f"{sel.p_value:.3g}, {same} equal to the ranked set): composite p = {p_comp:.3g}")


def test_small_set_reaches_half_of_all_heads(circuit_ablation, suite, claim):
    """Exploratory. Localization: the top-k heads (≤ 5% of heads) reach at least half of the refusal-score drop
    of mean-ablating every head: the lower 95% bootstrap bound of Δ(top-k) / Δ(all heads) ≥ 0.5 (paired over
    prompts), and ablating every head lowers the score."""
    c = circuit_ablation
    base, ranked, every = np.array(c.base), np.array(c.ranked), np.array(c.all_heads)

    def ratio(b, r, e):
        return float(np.mean(r - b) / np.mean(e - b))

    share = ratio(base, ranked, every)
    lo, hi = bootstrap_ci((base, ranked, every), ratio, n_resamples=suite.n_bootstrap, seed=suite.split_seed)
    claim.result(statistic=share, effect=share, ci=[lo, hi], n=len(base), threshold=suite.localization_share,
                 unit="Δ(top-k) / Δ(all heads)",
                 test="ratio of mean drops, paired bootstrap CI", null="the claim needs the lower bound ≥ the threshold")
    claim.record(delta_top_k=float((ranked - base).mean()), delta_all_heads=float((every - base).mean()), k=c.k)
    claim.uses(c)
    assert float((every - base).mean()) < 0, "ablating every head does not lower the refusal score"
    assert lo >= suite.localization_share, f"top-{c.k} share of the all-heads drop {share:.2f} (95% CI {lo:.2f}–{hi:.2f})"


def test_ablation_removes_refusal(circuit_ablation, baseline, suite, claim):
    """Exploratory. Mean-ablating the top-k heads removes refusal in generation: on every harmful test prompt,
    prompts that held out at baseline (refused, or incoherent) and comply under the ablation outnumber the reverse
    (exact one-sided McNemar, p < alpha; only a coherent compliance counts as removed, broken text does not; the
    decision measure is the judge with --judge, else substring + coherence; `not tested` below ``min_refusals``
    refusals at baseline). The substring-only and judge verdicts are reported beside it."""
    c = circuit_ablation
    before, after = grades_before(baseline, c.prompt_ids), c.grades_after
    refused = sum(g.outcome == "refusal" for g in before)
    require(refused >= suite.min_refusals, f"only {refused} of {len(before)} harmful test prompts are refused "
                                           f"at baseline (needs {suite.min_refusals}): nothing to remove")
    r = removal_claim(before, after, baseline.measure, suite, claim)
    claim.record(k=c.k)
    claim.uses(c)
    assert r["p_value"] < suite.alpha, (f"{r['removed']} removed vs {r['gained']} gained "
                                        f"({r['after']['incoherent']} incoherent after): p = {r['p_value']:.3g}")

