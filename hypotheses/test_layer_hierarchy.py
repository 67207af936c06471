"""H2 — a layer hierarchy: harmfulness is read early, moved to the post-instruction positions in the middle,
and the late blocks write the refusal.

The primary: early linear decodability of harmfulness (layer chosen on validation, judged on test against
shuffled-label probes). Exploratory: decodability per late layer (``-k layer12``), where patching the residual
stream starts to transfer refusal, and where the direct effect on the refusal logits sits.
"""

from __future__ import annotations

import numpy as np
import pytest

from mech import plots
from mech.patching import PatchResult
from mech.stats import (
    binomial_detectable_rate,
    binomial_pvalue,
    binomial_rate,
    bootstrap_ci,
    null_detectable_shift,
    permutation_pvalue,
)

pytestmark = [pytest.mark.layer_hierarchy, pytest.mark.realmodel, pytest.mark.slow]


@pytest.mark.primary
def test_harmfulness_decodable_early(layer_probe, lm, suite, claim):
    """PRIMARY. Harmfulness is linearly decodable within the first third of the depth: at the early layer with
    the best validation accuracy, a difference-in-means probe (fit on train pairs, last prompt position) beats
    shuffled-label probes on the test pairs (Monte-Carlo p < alpha). Effect: accuracy − shuffled mean, with the
    Clopper–Pearson 95% CI."""
    third = max(1, lm.shape.n_layers // 3)
    val = layer_probe["val_accuracy"]
    L = max(range(third), key=lambda i: (val[i], -i))
    correct = [row[L] for row in layer_probe["test_correct"]]
    acc = binomial_rate(correct)
    null = np.array(layer_probe["null_accuracy"])[:, L]
    test = permutation_pvalue(acc.rate, null, alternative="greater")
    claim.result(statistic=acc.rate, p_value=test.p_value, effect=acc.rate - null.mean(),
                 ci=[acc.low - null.mean(), acc.high - null.mean()], n=acc.n,
                 mde=null_detectable_shift(null, suite.alpha, "greater"), test="Monte-Carlo permutation, one-sided",
                 null=f"{len(null)} probes fit on shuffled train labels")
    claim.record(layer=L, chosen_on="validation", first_third=third, val_accuracy=val[L],
                 shuffled_mean=float(null.mean()))
    claim.uses(layer_probe)
    n = lm.shape.n_layers
    claim.figure(plots.curve(list(range(n)), {"test accuracy": layer_probe["test_accuracy"], "validation accuracy": val,
                                              "shuffled labels (mean)": np.array(layer_probe["null_accuracy"]).mean(0).tolist()},
                             "Linear probe for harmfulness by layer", "layer", "accuracy"), "Probe accuracy by layer")
    assert test.p_value < suite.alpha, f"layer {L}: test accuracy {acc.rate:.2f} vs shuffled {null.mean():.2f}, p = {test.p_value:.3g}"


def _pairs_correct(layer_probe: dict, L: int) -> list[bool]:
    """Per test pair: the probe at layer ``L`` classifies both twins correctly (the pair is the independent unit:
    the twins share their wording). ``test_correct`` holds the harmful twins, then the harmless twins, in pair
    order."""
    rows = [bool(row[L]) for row in layer_probe["test_correct"]]
    n = layer_probe["n_test_pairs"]
    if len(rows) != 2 * n:
        raise ValueError(f"layer_probe test_correct has {len(rows)} rows for {n} test pairs (expected {2 * n})")
    return [rows[i] and rows[n + i] for i in range(n)]


def test_harmfulness_stays_decodable(layer_probe, late_layer, lm, suite, claim):
    """Exploratory. Harmfulness stays linearly decodable at this layer (every layer from a third of the depth on):
    the probe classifies both twins of > 90% of the test pairs correctly (exact one-sided binomial over pairs,
    p < alpha, adjusted within the family of late layers by the suite's exploratory correction)."""
    c = _pairs_correct(layer_probe, late_layer)
    acc = binomial_rate(c)
    p = binomial_pvalue(acc.k, acc.n, suite.probe_min, "greater")
    claim.result(statistic=acc.rate, p_value=p, effect=acc.rate - suite.probe_min,
                 ci=[acc.low - suite.probe_min, acc.high - suite.probe_min], n=acc.n, threshold=suite.probe_min,
                 mde=binomial_detectable_rate(acc.n, suite.probe_min, suite.alpha, "greater") - suite.probe_min,
                 test="exact binomial over pairs (both twins correct), one-sided",
                 null=f"share of pairs with both twins correct ≤ {suite.probe_min}")
    claim.record(layer=late_layer, prompt_accuracy=layer_probe["test_accuracy"][late_layer])
    claim.uses(layer_probe)
    assert p < suite.alpha, (f"layer {late_layer}: both twins correct in {acc.k}/{acc.n} test pairs "
                             f"({acc.rate:.2f}), p = {p:.3g} against {suite.probe_min}")


def _first_reaching(curve: np.ndarray, level: float) -> float:
    above = np.nonzero(np.nan_to_num(curve, nan=-np.inf) >= level)[0]
    return float(above[0]) if above.size else float("nan")


def test_resid_patching_rises_in_middle_band(layer_patching, head_patching, lm, suite, claim):
    """Exploratory. Patching the harmful residual stream (resid_pre, post-instruction positions) into the
    harmless run starts to transfer refusal in the middle band: the first layer whose mean normalized effect
    reaches 0.5 lies in [n/4, 3n/4), with its whole 95% bootstrap CI (over pairs) inside the band."""
    res = PatchResult.from_dict(layer_patching)
    comps = res.axis("component")
    per_pair = res.as_array("layer", "component", per_pair=True, where={"position": "all"})[:, :, comps.index("resid_pre")]
    n = lm.shape.n_layers
    band = [n // 4, (3 * n) // 4]
    first = _first_reaching(np.nanmean(per_pair, 0), suite.rise_level)
    idx = np.arange(per_pair.shape[0])
    lo, hi = bootstrap_ci(idx, lambda i: _first_reaching(np.nanmean(per_pair[i.astype(int)], 0), suite.rise_level),
                          n_resamples=suite.n_bootstrap, seed=suite.split_seed)
    claim.result(statistic=first, effect=first, ci=[lo, hi], n=per_pair.shape[0], threshold=band,
                 test="first layer reaching the level, bootstrap CI over pairs", null="the CI must lie inside the band")
    grid = res.as_array("layer", "component", where={"position": "all"})
    claim.record(resid_effect_by_layer=np.nanmean(per_pair, 0).tolist())
    claim.uses(layer_patching)
    claim.figure(plots.heatmap(grid.T, list(range(n)), comps, "Exact patching harmful → harmless (normalized effect)",
                               "layer", "component"), "Layer × component patching")
    hp = PatchResult.from_dict(head_patching)
    hg = hp.as_array("layer", "head", where={"position": "all"})
    claim.figure(plots.heatmap(hg, list(range(hg.shape[1])), list(range(hg.shape[0])),
                               "Exact head patching harmful → harmless (normalized effect)", "head", "layer"),
                 "Layer × head patching")
    assert np.isfinite(lo) and np.isfinite(hi) and band[0] <= lo and hi < band[1], (
        f"first layer reaching {suite.rise_level}: {first} (95% CI {lo}–{hi}), band [{band[0]}, {band[1]})")


def test_late_blocks_write_refusal(layer_probe, lm, suite, claim):
    """Exploratory. The late layers' attention/MLP outputs carry the direct effect: the last third of the layers
    holds ≥ 50% of the total |harmful − harmless| direct logit attribution to the refusal tokens (lower 95%
    bootstrap bound over test pairs)."""
    dla = layer_probe["dla"]
    delta = np.array(dla["harmful_per_prompt"]) - np.array(dla["harmless_per_prompt"])  # [pairs, L, 2]
    n = lm.shape.n_layers

    def share(i):
        m = np.abs(delta[i.astype(int)].mean(0))
        return float(m[n - n // 3 :].sum() / m.sum())

    idx = np.arange(delta.shape[0])
    late = share(idx)
    lo, hi = bootstrap_ci(idx, share, n_resamples=suite.n_bootstrap, seed=suite.split_seed)
    claim.result(statistic=late, effect=late, ci=[lo, hi], n=len(idx), threshold=suite.late_share_min,
                 test="share of |mean DLA difference|, bootstrap CI over pairs", null="the lower bound must reach the threshold")
    claim.record(late_layers=[n - n // 3, n - 1])
    claim.uses(layer_probe)
    claim.figure(plots.heatmap(np.array(dla["delta"]).T, list(range(n)), ["attn", "mlp"],
                               "Direct logit attribution to refusal tokens, harmful − harmless", "layer", "block"),
                 "Direct effect by layer")
    assert lo >= suite.late_share_min, f"last third holds {late:.2f} (95% CI {lo:.2f}–{hi:.2f}) < {suite.late_share_min}"
