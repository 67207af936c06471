"""H2 — a layer hierarchy: harmfulness is read early, moved to the post-instruction positions in the middle,
and the late blocks write the refusal.

Made operational as three measurable claims (each parametrized or reported per layer, ``-k layer12``):
early linear decodability, where patching the residual stream starts to transfer refusal, and where the
direct effect on the refusal logits sits.
"""

from __future__ import annotations

import numpy as np
import pytest

from mech import plots
from mech.patching import PatchResult

pytestmark = [pytest.mark.layer_hierarchy, pytest.mark.realmodel, pytest.mark.slow]

PROBE_MIN = 0.90
RISE_LEVEL = 0.5
LATE_SHARE_MIN = 0.5


def test_harmfulness_decodable_early(layer_probe, lm, claim):
    """Harmfulness is linearly decodable early: a difference-in-means probe at the last prompt position
    reaches held-out accuracy ≥ 0.90 at some layer within the first third of the depth."""
    acc = layer_probe["accuracy"]
    third = max(1, lm.shape.n_layers // 3)
    best = max(range(third), key=lambda L: acc[L])
    claim.record(best_early_layer=best, best_early_accuracy=acc[best], first_third=third, accuracy_by_layer=acc,
                 threshold=PROBE_MIN, n_test_pairs=layer_probe["n_test_pairs"])
    claim.figure(plots.curve(list(range(len(acc))), {"held-out accuracy": acc}, "Linear probe for harmfulness by layer",
                             "layer", "accuracy"), "Probe accuracy by layer")
    assert acc[best] >= PROBE_MIN, f"best accuracy in layers 0..{third - 1} is {acc[best]:.2f} (layer {best}) < {PROBE_MIN}"


def test_harmfulness_stays_decodable(layer_probe, late_layer, claim):
    """Once read, harmfulness stays linearly decodable: held-out probe accuracy ≥ 0.90 at this layer
    (every layer from one third of the depth on)."""
    acc = layer_probe["accuracy"][late_layer]
    claim.record(layer=late_layer, accuracy=acc, threshold=PROBE_MIN)
    assert acc >= PROBE_MIN, f"layer {late_layer}: held-out probe accuracy {acc:.2f} < {PROBE_MIN}"


def test_resid_patching_rises_in_middle_band(layer_patching, head_patching, lm, claim):
    """Patching the harmful residual stream (resid_pre, post-instruction positions) into the harmless run
    starts to transfer refusal in the middle band: the first layer whose mean normalized effect reaches 0.5
    lies in [n/4, 3n/4)."""
    res = PatchResult.from_dict(layer_patching)
    grid = res.as_array("layer", "component", where={"position": "all"})  # [n_layers, 3]
    comps = res.axis("component")
    resid = grid[:, comps.index("resid_pre")]
    n = lm.shape.n_layers
    above = [L for L in range(n) if np.isfinite(resid[L]) and resid[L] >= RISE_LEVEL]
    first = above[0] if above else None
    claim.record(first_layer_reaching_half=first, band=[n // 4, (3 * n) // 4], resid_effect_by_layer=resid.tolist(),
                 peak_layer=int(np.nanargmax(resid)), n_pairs=res.n_pairs)
    claim.figure(plots.heatmap(grid.T, list(range(n)), comps, "Exact patching harmful → harmless (normalized effect)",
                               "layer", "component"), "Layer × component patching")
    hp = PatchResult.from_dict(head_patching)
    hg = hp.as_array("layer", "head", where={"position": "all"})
    claim.figure(plots.heatmap(hg, list(range(hg.shape[1])), list(range(hg.shape[0])),
                               "Exact head patching harmful → harmless (normalized effect)", "head", "layer"),
                 "Layer × head patching")
    assert first is not None and n // 4 <= first < (3 * n) // 4, (
        f"resid_pre effect first reaches {RISE_LEVEL} at layer {first}, outside [{n // 4}, {(3 * n) // 4})")


def test_late_blocks_write_refusal(layer_probe, lm, claim):
    """The late layers' attention/MLP outputs carry the direct effect: the last third of the layers holds
    ≥ 50% of the total |harmful − harmless| direct logit attribution to the refusal tokens."""
    delta = np.abs(np.array(layer_probe["dla"]["delta"]))  # [n_layers, 2]
    n = lm.shape.n_layers
    late = delta[n - n // 3 :].sum() / delta.sum()
    claim.record(late_share=float(late), late_layers=[n - n // 3, n - 1], threshold=LATE_SHARE_MIN,
                 dla_delta_attn=delta[:, 0].tolist(), dla_delta_mlp=delta[:, 1].tolist())
    claim.figure(plots.heatmap(np.array(layer_probe["dla"]["delta"]).T, list(range(n)), ["attn", "mlp"],
                               "Direct logit attribution to refusal tokens, harmful − harmless", "layer", "block"),
                 "Direct effect by layer")
    assert late >= LATE_SHARE_MIN, f"last third holds {late:.2f} of the direct effect < {LATE_SHARE_MIN}"
