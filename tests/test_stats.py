"""mech.stats: the scipy wrappers give the textbook numbers and JSON-ready results."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from mech.stats import (
    adjust_pvalues,
    auroc,
    auroc_ci,
    benjamini_hochberg,
    binomial_rate,
    bootstrap_ci,
    bootstrap_pvalue,
    holm,
    intersection_union_p,
    jsonable,
    mcnemar_exact,
    permutation_pvalue,
    spearman,
)


def test_binomial_rate_clopper_pearson_and_wilson():
    r = binomial_rate(3, 10)
    assert r.rate == pytest.approx(0.3)
    # Clopper-Pearson 95% for 3/10 (textbook values)
    assert r.low == pytest.approx(0.0667, abs=1e-4) and r.high == pytest.approx(0.6525, abs=1e-4)
    w = binomial_rate(3, 10, method="wilson")
    assert w.method == "wilson" and w.low > r.low and w.high < r.high  # Wilson is narrower here
    flags = binomial_rate([True, False, True, True])
    assert (flags.k, flags.n) == (3, 4)
    empty = binomial_rate(0, 0)
    assert math.isnan(empty.rate) and empty.to_dict()["rate"] is None
    assert binomial_rate(0, 5).low == 0.0 and binomial_rate(5, 5).high == 1.0
    with pytest.raises(ValueError):
        binomial_rate(6, 5)


def test_mcnemar_exact_counts_discordant_pairs():
    before = [True] * 10 + [False] * 5
    after = [False] * 8 + [True] * 2 + [False] * 4 + [True]
    r = mcnemar_exact(before, after)
    assert (r.b, r.c, r.n) == (8, 1, 15)
    assert r.p_value == pytest.approx(binomtest(8, 9, 0.5).pvalue)
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0
    one = mcnemar_exact(before, after, alternative="greater")
    assert one.p_value < r.p_value
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def test_permutation_pvalue_plus_one_correction():
    null = np.arange(20, dtype=float)  # 0..19
    assert permutation_pvalue(100.0, null).p_value == pytest.approx(1 / 21)  # never 0
    assert permutation_pvalue(-1.0, null, alternative="less").p_value == pytest.approx(1 / 21)
    r = permutation_pvalue(15.0, null)  # 15..19 are >= 15
    assert r.n_extreme == 5 and r.p_value == pytest.approx(6 / 21)
    assert permutation_pvalue(9.5, null, alternative="two-sided").p_value == pytest.approx(1.0)
    assert r.null_mean == pytest.approx(9.5)
    with pytest.raises(ValueError):
        permutation_pvalue(1.0, [])


def test_holm_and_bh():
    p = [0.01, 0.04, 0.03, 0.20]
    # Holm: sorted 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> monotone 0.09, 0.20*1 -> 0.20
    np.testing.assert_allclose(holm(p), [0.04, 0.09, 0.09, 0.20])
    # BH: 0.01*4/1=0.04, 0.03*4/2=0.06, 0.04*4/3=0.0533 -> step-up min, 0.2
    np.testing.assert_allclose(benjamini_hochberg(p), [0.04, 0.0533333, 0.0533333, 0.20], rtol=1e-5)
    a = adjust_pvalues(p, "holm", alpha=0.05)
    assert a.reject == (True, False, False, False)
    b = adjust_pvalues(p, "bh", alpha=0.06)
    assert b.reject == (True, True, True, False)
    assert holm([]).size == 0
    assert all(x <= 1 for x in holm([0.9, 0.8, 0.7]))
    with pytest.raises(ValueError):
        adjust_pvalues(p, "bonferroni")  # type: ignore[arg-type]


def test_spearman_and_auroc():
    r = spearman([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])
    assert r.rho == pytest.approx(1.0) and r.n == 5
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]).rho == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]).rho)
    a = auroc([3, 4, 5, 6], [0, 1, 2, 3.5])
    assert a.auroc == pytest.approx(15 / 16) and (a.n_pos, a.n_neg) == (4, 4)
    assert 0 < a.p_value < 1
    assert math.isnan(auroc([], [1.0]).auroc)


def test_auroc_ci_brackets_the_auroc_and_narrows_with_n():
    """The stratified bootstrap CI of the AUROC holds the point value, narrows as n grows, and covers the true
    AUROC of two unit normals one apart (Φ(1/√2) ≈ 0.760)."""
    rng = np.random.default_rng(0)
    widths = []
    for n in (30, 300):
        pos, neg = rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)
        lo, hi = auroc_ci(pos, neg, n_resamples=1000, seed=1)
        assert lo <= auroc(pos, neg).auroc <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2 and lo < 0.760 < hi
    assert auroc_ci([2.0, 3.0], [0.0, 1.0]) == (1.0, 1.0)  # every resample separates perfectly
    assert all(math.isnan(x) for x in auroc_ci([], [1.0]))


def test_results_are_json_serializable():
    items = [
        binomial_rate(1, 3), mcnemar_exact([True], [False]), permutation_pvalue(1.0, [0.0, 2.0]),
        adjust_pvalues([0.1, 0.2]), spearman([1, 2, 3], [1, 3, 2]), auroc([1.0], [0.0]),
    ]
    text = json.dumps([x.to_dict() for x in items])
    assert "NaN" not in text
    assert jsonable({"a": (np.float32(1.5), np.int64(2), float("nan"))}) == {"a": [1.5, 2, None]}


def test_bootstrap_ci_covers_the_mean_and_handles_pairs():
    import numpy as np

    from mech.stats import bootstrap_ci

    x = np.random.default_rng(0).normal(2.0, 1.0, 200)
    lo, hi = bootstrap_ci(x, n_resamples=500)
    assert lo < x.mean() < hi and hi - lo < 0.5
    a, b = x, x * 2
    lo, hi = bootstrap_ci((a, b), lambda u, v: float(np.mean(u) / np.mean(v)), n_resamples=300)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # paired: the ratio never moves
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_detectable_effects():
    from mech.stats import (
        binomial_detectable_rate,
        binomial_pvalue,
        mcnemar_detectable_flips,
        null_detectable_shift,
    )

    r = binomial_detectable_rate(121, 0.8, 0.05, "greater")
    k = round(r * 121)
    assert binomial_pvalue(k, 121, 0.8, "greater") < 0.05 <= binomial_pvalue(k - 1, 121, 0.8, "greater")
    assert binomial_detectable_rate(11, 0.8, 0.05, "greater") != binomial_detectable_rate(11, 0.8, 0.05, "greater")  # NaN
    assert mcnemar_detectable_flips(0.05, 30) == 5 and mcnemar_detectable_flips(0.01, 6) is None
    null = list(range(100))  # mean 49.5; with 100 draws at most 4 as extreme keeps p = 5/101 < 0.05
    assert null_detectable_shift(null, 0.05, "less") == pytest.approx(4 - 49.5)
    assert null_detectable_shift(null[:10], 0.05, "less") != null_detectable_shift(null[:10], 0.05, "less")  # NaN


def test_intersection_union_p_is_the_max_and_fails_closed():
    """The composite p of a claim that ANDs tests: the largest part; 1 when a gate fails, a part is NaN or None,
    or there is no part; a value outside [0, 1] is a bug, not a p."""
    assert intersection_union_p({"mc": 0.01, "bound": 0.03}) == 0.03
    assert intersection_union_p({"mc": 0.01, "bound": 0.03}, {"filters": True, "refused": True}) == 0.03
    assert intersection_union_p({"mc": 0.001}, {"filters": False}) == 1.0
    assert intersection_union_p({"mc": 0.001, "floor": math.nan}) == 1.0
    assert intersection_union_p({"mc": 0.001, "floor": None}) == 1.0  # type: ignore[dict-item]
    assert intersection_union_p({}) == 1.0
    assert intersection_union_p({"one": 0.2}) == 0.2
    with pytest.raises(ValueError, match="not a p-value"):
        intersection_union_p({"x": 1.5})


def test_bootstrap_pvalue_agrees_with_the_one_sided_bound():
    """p < alpha exactly when the one-sided (1 - alpha) percentile bound excludes the null value; a sample
    centred on the null is not rejected, one far from it is, in the stated direction only."""
    rng = np.random.default_rng(1)
    shifted = rng.normal(0.5, 1.0, 40)
    p = bootstrap_pvalue(shifted, 0.0, "greater", n_resamples=2000, seed=0)
    lo, _ = bootstrap_ci(shifted, confidence=0.90, n_resamples=2000, seed=0)  # its lower bound is the 5% quantile
    assert (p < 0.05) == (lo > 0)
    assert bootstrap_pvalue(shifted, 0.0, "less", seed=0) > 0.5
    assert bootstrap_pvalue(-shifted, 0.0, "less", seed=0) == pytest.approx(p)
    assert bootstrap_pvalue([0.1, -0.1, 0.2, -0.2, 0.0], 0.0, "greater") > 0.2
    assert bootstrap_pvalue([1.0, 1.0], 0.0, "greater", n_resamples=99) == 0.01  # too few to resample: all beyond
    assert bootstrap_pvalue([1.0, -1.0], 0.0, "greater") == 1.0
    assert bootstrap_pvalue([], 0.0) == 1.0 and bootstrap_pvalue([math.nan] * 4) == 1.0
    with pytest.raises(ValueError, match="alternative"):
        bootstrap_pvalue([1.0, 2.0, 3.0], 0.0, "two-sided")  # type: ignore[arg-type]


def test_bootstrap_pvalue_holds_its_size_where_there_is_nothing_to_find():
    rng = np.random.default_rng(2)
    rejections = sum(bootstrap_pvalue(rng.normal(0, 1, 30), 0.0, "greater", n_resamples=500, seed=i) < 0.05
                     for i in range(200))
    assert rejections / 200 <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 200) + 0.03  # percentile bootstrap runs a little hot
