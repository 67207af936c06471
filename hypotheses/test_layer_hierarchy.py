"""H2 — a layer hierarchy: harmfulness is read early, moved to the post-instruction positions in the middle,
and the late blocks write the refusal.

The primary: "read early, moved later" — at an early layer L1 (chosen on validation in the first third of the
depth) harmfulness is linearly decodable at the last prompt position, yet patching the residual stream there
does not yet move refusal; at a pre-specified later layer it does. Exploratory: decodability per late layer
(``-k layer12``), where patching the residual stream starts to transfer refusal, and where the direct effect on
the refusal logits sits.
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures.h2_hierarchy import LayerProbe, hierarchy_parts, resid_effect_per_pair
from mech import plots
from mech.stats import (
    binomial_detectable_rate,
    binomial_pvalue,
    binomial_rate,
    bootstrap_ci,
    intersection_union_p,
)

pytestmark = [pytest.mark.layer_hierarchy, pytest.mark.realmodel, pytest.mark.slow]


@pytest.mark.primary
def test_read_early_moved_later(layer_probe, layer_patching, lm, suite, claim, selection_stability):
    """PRIMARY. Read early, moved later: three tests, all needed (one intersection–union p, the largest).
    (1) read: at the early layer L1 with the best validation accuracy among the first ``read_max_fraction`` of the
    layers, a difference-in-means probe (train pairs, last prompt position) beats probes fit on shuffled train
    labels on the test pairs (Monte-Carlo p); (2) not yet moved: patching the harmful resid_pre at L1 (all
    post-instruction positions) into the harmless twin moves less than ``moved_max`` of the refusal score
    (one-sided Wilcoxon signed-rank over test pairs, H0: mean normalized effect ≥ ``moved_max``); (3) moved later:
    at layer int(``move_fraction`` × depth) the same patch moves more than ``rise_level`` (H0: ≤ ``rise_level``).
    Effect: normalized effect at the later layer minus at L1, 95% bootstrap CI over pairs.

    How it fails: a model without a hierarchy, where what is decodable at L1 already drives refusal from the
    post-instruction positions (read where it is used), fails (2); one whose post-instruction positions never carry
    refusal by the later layer fails (3); label-shuffled training data (nothing to read) fails (1). Content words
    alone, which any language model decodes early, pass (1) only: the decodability claim of earlier versions."""
    n = lm.shape.n_layers
    val = layer_probe.val_accuracy
    eff = resid_effect_per_pair(layer_patching)
    t = hierarchy_parts(layer_probe, eff, n, suite)
    parts, L1, L2, early, acc, null = t["parts"], t["L1"], t["L2"], t["early"], t["acc"], t["null"]
    e1, e2 = eff[:, L1], eff[:, L2]
    p = intersection_union_p(parts)
    contrast = e2 - e1
    lo, hi = bootstrap_ci(contrast[np.isfinite(contrast)], n_resamples=suite.n_bootstrap, seed=suite.split_seed)
    claim.result(statistic=float(np.nanmean(contrast)), p_value=p, effect=float(np.nanmean(contrast)), ci=[lo, hi],
                 n=int(np.isfinite(contrast).sum()), threshold=[suite.moved_max, suite.rise_level],
                 unit="normalized patching effect (later layer − read layer)",
                 test="intersection–union: probe vs shuffled labels (Monte-Carlo), Wilcoxon signed-rank at L1 "
                      "(less) and at the later layer (greater)",
                 null=f"{len(null)} shuffled-label probes; patching effect ≥ {suite.moved_max} at L1 or ≤ "
                      f"{suite.rise_level} at layer {L2}")
    claim.record(p_parts=parts, layer=L1, move_layer=L2, chosen_on="validation", read_candidates=[0, early - 1],
                 val_accuracy=val[L1], test_accuracy=acc.rate, test_accuracy_ci=[acc.low, acc.high],
                 shuffled_mean=float(null.mean()), effect_at_read_layer=float(np.nanmean(e1)),
                 effect_at_move_layer=float(np.nanmean(e2)), n_probe_pairs=layer_probe.n_test_pairs)
    claim.uses(layer_probe, layer_patching)
    selection_stability.record(claim, "H2", L1)  # --set stability_resamples=B
    claim.figure(plots.curve(list(range(n)), {"test accuracy": layer_probe.test_accuracy, "validation accuracy": val,
                                              "shuffled labels (mean)": np.array(layer_probe.null_accuracy).mean(0).tolist(),
                                              "resid_pre patching effect": np.nanmean(eff, 0).tolist()},
                             "Read (probe accuracy) and moved (patching effect) by layer", "layer", "accuracy / effect"),
                 "Probe accuracy and patching effect by layer",
                 caption="Contradicted when the early read layer's test accuracy is not above the shuffled-label "
                         "curve, when patching resid_pre there already moves refusal, or when patching at the later "
                         "layer does not move it.")
    assert p < suite.alpha, (
        f"read at L{L1}: accuracy {acc.rate:.2f} vs shuffled {null.mean():.2f} (p {parts['read_at_L1']:.3g}); "
        f"patching effect at L{L1} {np.nanmean(e1):.2f} (< {suite.moved_max}? p {parts['not_moved_at_L1']:.3g}), "
        f"at L{L2} {np.nanmean(e2):.2f} (> {suite.rise_level}? p {parts['moved_at_L2']:.3g}): composite p = {p:.3g}")


def _pairs_correct(layer_probe: LayerProbe, L: int) -> list[bool]:
    """Per test pair: the probe at layer ``L`` classifies both twins correctly (the pair is the independent unit:
    the twins share their wording). ``test_correct`` holds the harmful twins, then the harmless twins, in pair
    order."""
    rows = [bool(row[L]) for row in layer_probe.test_correct]
    n = layer_probe.n_test_pairs
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
                 unit=f"share of pairs − {suite.probe_min}",
                 test="exact binomial over pairs (both twins correct), one-sided",
                 null=f"share of pairs with both twins correct ≤ {suite.probe_min}")
    claim.record(layer=late_layer, prompt_accuracy=layer_probe.test_accuracy[late_layer])
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
    res = layer_patching.result
    comps = res.axis("component")

    per_pair = resid_effect_per_pair(layer_patching)
    n = lm.shape.n_layers
    band = [n // 4, (3 * n) // 4]
    first = _first_reaching(np.nanmean(per_pair, 0), suite.rise_level)
    idx = np.arange(per_pair.shape[0])
    lo, hi = bootstrap_ci(idx, lambda i: _first_reaching(np.nanmean(per_pair[i.astype(int)], 0), suite.rise_level),
                          n_resamples=suite.n_bootstrap, seed=suite.split_seed)
    claim.result(statistic=first, effect=first, ci=[lo, hi], n=per_pair.shape[0], threshold=band, unit="layer index",
                 test="first layer reaching the level, bootstrap CI over pairs", null="the CI must lie inside the band")
    grid = res.as_array("layer", "component", where={"position": "all"})
    claim.record(resid_effect_by_layer=np.nanmean(per_pair, 0).tolist())
    claim.uses(layer_patching)
    claim.figure(plots.heatmap(grid.T, list(range(n)), comps, "Exact patching harmful → harmless (normalized effect)",
                               "layer", "component", z_title="normalized effect (0 none, 1 full)"),
                 "Layer × component patching",
                 caption="Contradicted when the resid_pre row first reaches 0.5 outside the middle band [n/4, 3n/4) "
                         "of the layers, or never.")
    hp = head_patching.result
    hg = hp.as_array("layer", "head", where={"position": "all"})
    claim.figure(plots.heatmap(hg, list(range(hg.shape[1])), list(range(hg.shape[0])),
                               "Exact head patching harmful → harmless (normalized effect)", "head", "layer",
                               z_title="normalized effect (0 none, 1 full)"),
                 "Layer × head patching", caption="Descriptive, per head; the claim is decided on the resid_pre row.")
    assert np.isfinite(lo) and np.isfinite(hi) and band[0] <= lo and hi < band[1], (
        f"first layer reaching {suite.rise_level}: {first} (95% CI {lo}–{hi}), band [{band[0]}, {band[1]})")


def test_late_blocks_write_refusal(layer_probe, lm, suite, claim):
    """Exploratory. The late layers' attention/MLP outputs carry the direct effect: the last third of the layers
    holds ≥ 50% of the total |harmful − harmless| direct logit attribution to the refusal tokens (lower 95%
    bootstrap bound over test pairs)."""
    dla = layer_probe.dla
    delta = np.array(dla.harmful_per_prompt) - np.array(dla.harmless_per_prompt)  # [pairs, L, 2]
    n = lm.shape.n_layers

    def share(i):
        m = np.abs(delta[i.astype(int)].mean(0))
        return float(m[n - n // 3 :].sum() / m.sum())

    idx = np.arange(delta.shape[0])
    late = share(idx)
    lo, hi = bootstrap_ci(idx, share, n_resamples=suite.n_bootstrap, seed=suite.split_seed)
    claim.result(statistic=late, effect=late, ci=[lo, hi], n=len(idx), threshold=suite.late_share_min,
                 unit="share of |DLA| in the last third",
                 test="share of |mean DLA difference|, bootstrap CI over pairs", null="the lower bound must reach the threshold")
    claim.record(late_layers=[n - n // 3, n - 1])
    claim.uses(layer_probe)
    claim.figure(plots.heatmap(np.array(dla.delta).T, list(range(n)), ["attn", "mlp"],
                               "Direct logit attribution to refusal tokens, harmful − harmless", "layer", "block",
                               z_title="Δ DLA (logits)"),
                 "Direct effect by layer", caption="Contradicted when the last third of the layers holds less than half "
                                                   "of the total |harmful − harmless| attribution (lower 95% bound).")
    assert lo >= suite.late_share_min, f"last third holds {late:.2f} (95% CI {lo:.2f}–{hi:.2f}) < {suite.late_share_min}"
