"""H3 — a shared substrate: the same heads serve refusal across harm categories.

Per category (``-k fraud``): its attribution map over heads agrees with the other categories' map, and
ablating the heads found on it lowers refusal on the other categories too.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import wilcoxon

from mech import plots
from mech.patching import PatchResult
from mech.stats import adjust_pvalues, spearman

pytestmark = [pytest.mark.shared_substrate, pytest.mark.realmodel, pytest.mark.slow]

ALPHA = 0.05
TRANSFER_MIN = 0.5


@pytest.fixture(scope="module")
def map_agreement(atp_noise):
    """Spearman ρ of each category's mean AtP head map against the pooled map of the other categories,
    with Holm-adjusted p-values across categories."""
    res = PatchResult.from_dict(atp_noise["head"])
    delta = res.delta  # [n_pairs, n_heads_total]
    cats = atp_noise["categories"]
    names = sorted(set(cats))
    out = {}
    for c in names:
        mine = np.nanmean(delta[[i for i, x in enumerate(cats) if x == c]], 0)
        rest = np.nanmean(delta[[i for i, x in enumerate(cats) if x != c]], 0)
        out[c] = spearman(mine, rest)
    adj = adjust_pvalues([out[c].p_value for c in names], "holm", ALPHA)
    return {c: {"rho": out[c].rho, "p": out[c].p_value,
                "p_holm": adj.adjusted[i], "n": out[c].n} for i, c in enumerate(names)}


def test_category_map_agrees(map_agreement, category, claim):
    """This category's head attribution map (harmless → harmful AtP, train pairs) correlates positively with
    the other categories' pooled map: Spearman ρ > 0, Holm-adjusted p < 0.05 across categories."""
    if category not in map_agreement:
        pytest.skip(f"no train pairs of category {category}")
    m = map_agreement[category]
    claim.record(rho=m["rho"], p_value=m["p"], p_holm=m["p_holm"], n_heads=m["n"])
    assert m["rho"] > 0 and m["p_holm"] < ALPHA, f"ρ={m['rho']:.3f}, Holm p={m['p_holm']:.3g}"


def test_ablation_transfers(cross_category, category, claim):
    """Ablating the top heads found on this category lowers the refusal score on the *other* categories'
    held-out harmful prompts by at least half as much as on its own (and lowers its own)."""
    drop = cross_category["drop"][category]
    own = drop[category]
    others = [v for b, v in drop.items() if b != category]
    mean_other = float(np.mean(others))
    ratio = mean_other / own if own > 0 else float("nan")
    claim.record(own_drop=own, mean_other_drop=mean_other, transfer_ratio=ratio, k=cross_category["k"],
                 heads=cross_category["rankings"][category], threshold=TRANSFER_MIN)
    assert own > 0 and ratio >= TRANSFER_MIN, f"own drop {own:.3f}, others {mean_other:.3f} (ratio {ratio:.2f})"


def test_cross_category_matrix(cross_category, claim):
    """Across all ordered category pairs (A ≠ B), ablating A's top heads lowers B's refusal score:
    off-diagonal drops > 0 (one-sided Wilcoxon signed-rank, p < 0.05)."""
    cats = cross_category["categories"]
    M = np.array([[cross_category["drop"][a][b] for b in cats] for a in cats])
    off = M[~np.eye(len(cats), dtype=bool)]
    p = float(wilcoxon(off, alternative="greater").pvalue) if len(off) else float("nan")
    claim.record(mean_off_diagonal_drop=float(off.mean()), mean_diagonal_drop=float(np.diag(M).mean()),
                 wilcoxon_p=p, n_pairs=int(off.size))
    claim.figure(plots.heatmap(M, cats, cats, "Refusal-score drop: ablate heads of row category, measure column",
                               "measured on", "heads from", colorscale="Reds", zmid=None), "Cross-category ablation matrix")
    assert p < ALPHA, f"off-diagonal drops mean {off.mean():.3f}, Wilcoxon p={p:.3g}"
