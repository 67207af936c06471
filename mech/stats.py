"""Thin wrappers over :mod:`scipy.stats` for the claims of the suite, returning small frozen dataclasses.

Every result has ``to_dict()`` (JSON-ready: NaN becomes ``None``) so the hypothesis suite and the report can
store it next to the claim it supports.

* :func:`binomial_rate` — a rate with a 95 % CI (``binomtest(...).proportion_ci``; Clopper–Pearson "exact" by
  default, "wilson" / "wilsoncc" on request).
* :func:`mcnemar_exact` — exact McNemar test of paired binary outcomes (refused before / after an
  intervention): a two-sided ``binomtest`` on the discordant pairs.
* :func:`permutation_pvalue` — the p-value of an observed statistic against a null sample (e.g. random
  component controls), with the +1 correction ``(1 + #{null at least as extreme}) / (1 + n_null)``.
* :func:`adjust_pvalues` — Holm (step-down, by hand) or Benjamini–Hochberg (``false_discovery_control``).
* :func:`spearman` — rank agreement (``spearmanr``).
* :func:`auroc` — AUROC from the Mann–Whitney U statistic with its p-value.
* :func:`bootstrap_pvalue` — a one-sided bootstrap p of a mean against a null value (the bootstrap distribution
  of :func:`scipy.stats.bootstrap`): p < alpha exactly when the one-sided (1 − alpha) percentile bound excludes it.
* :func:`intersection_union_p` — the one p of a claim that ANDs several tests: the max of their p-values, 1 when a
  gating condition fails or a part is NaN.
* :func:`auroc` — AUROC from the Mann–Whitney U statistic with its p-value; :func:`auroc_ci` its bootstrap CI
  (``scipy.stats.bootstrap``, the two groups resampled independently).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
from scipy import stats as _st

__all__ = [
    "AdjustedPValues",
    "AurocResult",
    "McNemarResult",
    "PermutationResult",
    "RankAgreement",
    "RateCI",
    "adjust_pvalues",
    "auroc",
    "auroc_ci",
    "benjamini_hochberg",
    "binomial_detectable_rate",
    "binomial_pvalue",
    "binomial_rate",
    "bootstrap_ci",
    "bootstrap_pvalue",
    "fields_dict",
    "holm",
    "intersection_union_p",
    "jsonable",
    "mcnemar_detectable_flips",
    "mcnemar_exact",
    "null_detectable_shift",
    "permutation_pvalue",
    "spearman",
]


def jsonable(obj: Any) -> Any:
    """``obj`` with dataclasses, tuples, numpy and torch scalars/arrays turned into JSON types; NaN → ``None``."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if type(obj).__module__.startswith("torch"):
        return jsonable(obj.detach().cpu().tolist())
    return obj


def fields_dict(obj: Any, *properties: str, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """A dataclass's fields (less ``exclude``) and ``properties``, as JSON types (:func:`jsonable`). Shallow, unlike
    :func:`dataclasses.asdict`: a nested result is written by its own ``to_dict`` (with its properties)."""
    d = {f.name: getattr(obj, f.name) for f in fields(obj) if f.name not in exclude}
    d.update({p: getattr(obj, p) for p in properties})
    return jsonable(d)


class _Dict:
    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------- rates


@dataclass(frozen=True)
class RateCI(_Dict):
    """``k`` successes out of ``n``: the rate and its two-sided CI (``nan`` when ``n == 0``)."""

    k: int
    n: int
    rate: float
    low: float
    high: float
    confidence: float
    method: str  # "exact" (Clopper–Pearson) | "wilson" | "wilsoncc"


def binomial_rate(
    k: int | Sequence[bool], n: int | None = None, confidence: float = 0.95, method: str = "exact"
) -> RateCI:
    """Rate ``k/n`` with a ``confidence`` CI from :func:`scipy.stats.binomtest`.

    ``k`` may be a sequence of booleans (then ``n`` is its length). ``method``: ``exact`` (Clopper–Pearson),
    ``wilson`` or ``wilsoncc``.

    >>> r = binomial_rate(97, 121)
    >>> round(r.rate, 3), round(r.low, 3), round(r.high, 3)
    (0.802, 0.719, 0.869)
    """
    if not isinstance(k, (int, np.integer)):
        flags = [bool(x) for x in k]
        k, n = sum(flags), len(flags)
    if n is None:
        raise ValueError("binomial_rate needs n when k is a count")
    k, n = int(k), int(n)
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"binomial_rate needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return RateCI(0, 0, math.nan, math.nan, math.nan, confidence, method)
    ci = _st.binomtest(k, n).proportion_ci(confidence_level=confidence, method=method)
    return RateCI(k, n, k / n, float(ci.low), float(ci.high), confidence, method)


# --------------------------------------------------------------------------------------------- McNemar


@dataclass(frozen=True)
class McNemarResult(_Dict):
    """Paired binary outcomes before/after: ``b`` = True→False flips, ``c`` = False→True flips."""

    n: int
    b: int  # before True, after False (e.g. refusal removed)
    c: int  # before False, after True (e.g. refusal induced)
    p_value: float  # exact two-sided binomial test of b vs c on the b + c discordant pairs
    alternative: str


def mcnemar_exact(
    before: Sequence[bool], after: Sequence[bool], alternative: Literal["two-sided", "greater", "less"] = "two-sided"
) -> McNemarResult:
    """Exact McNemar test: ``binomtest(b, b + c, 0.5)`` on the discordant pairs.

    ``alternative="greater"`` tests that True→False flips (``b``) outnumber False→True flips (``c``).
    With no discordant pair the p-value is 1.

    >>> before = [True] * 10 + [False] * 2  # refused before the intervention
    >>> after = [False] * 8 + [True] * 2 + [False] * 2
    >>> r = mcnemar_exact(before, after, alternative="greater")
    >>> r.b, r.c, round(r.p_value, 4)
    (8, 0, 0.0039)
    """
    if len(before) != len(after):
        raise ValueError(f"mcnemar_exact needs paired outcomes, got {len(before)} and {len(after)}")
    b = sum(1 for x, y in zip(before, after, strict=True) if x and not y)
    c = sum(1 for x, y in zip(before, after, strict=True) if y and not x)
    p = 1.0 if b + c == 0 else float(_st.binomtest(b, b + c, 0.5, alternative=alternative).pvalue)
    return McNemarResult(len(before), b, c, p, alternative)


# ----------------------------------------------------------------------------------------- permutation


@dataclass(frozen=True)
class PermutationResult(_Dict):
    """An observed statistic against a null sample (random controls)."""

    observed: float
    null_mean: float
    null_std: float
    n_null: int
    n_extreme: int  # null values at least as extreme as the observed one
    p_value: float  # (1 + n_extreme) / (1 + n_null)
    alternative: str


def permutation_pvalue(
    observed: float, null: Sequence[float] | np.ndarray, alternative: Literal["greater", "less", "two-sided"] = "greater"
) -> PermutationResult:
    """Monte-Carlo p-value of ``observed`` against ``null`` with the +1 correction (never 0).

    ``greater``: how often the null is ≥ observed; ``less``: ≤ observed; ``two-sided``: ``|null - mean| ≥
    |observed - mean|`` about the null mean.
    """
    arr = np.asarray(list(null), dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        raise ValueError("permutation_pvalue needs a non-empty null sample")
    mu = float(arr.mean())
    if alternative == "greater":
        extreme = int((arr >= observed).sum())
    elif alternative == "less":
        extreme = int((arr <= observed).sum())
    elif alternative == "two-sided":
        extreme = int((np.abs(arr - mu) >= abs(observed - mu)).sum())
    else:
        raise ValueError(f"unknown alternative {alternative!r}; use greater, less or two-sided")
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return PermutationResult(float(observed), mu, sd, int(arr.size), extreme, (1 + extreme) / (1 + arr.size), alternative)


# ----------------------------------------------------------------------------------- multiple testing


@dataclass(frozen=True)
class AdjustedPValues(_Dict):
    """Raw and adjusted p-values (same order) and the rejections at ``alpha``."""

    method: str  # "holm" | "bh"
    p_values: tuple[float, ...]
    adjusted: tuple[float, ...]
    alpha: float
    reject: tuple[bool, ...]


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error), in the input order.

    >>> holm([0.01, 0.04, 0.03]).round(3).tolist()
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(list(p_values), dtype=float)
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adj_sorted = np.minimum(np.maximum.accumulate(scaled), 1.0)
    adj = np.empty(m)
    adj[order] = adj_sorted
    return adj


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (false discovery rate): ``scipy.stats.false_discovery_control``."""
    p = np.asarray(list(p_values), dtype=float)
    if p.size == 0:
        return p
    return np.asarray(_st.false_discovery_control(p, method="bh"), dtype=float)


def adjust_pvalues(p_values: Sequence[float], method: Literal["holm", "bh"] = "holm", alpha: float = 0.05) -> AdjustedPValues:
    """Adjust a family of p-values (``holm`` or ``bh``) and say which are rejected at ``alpha``."""
    if method == "holm":
        adj = holm(p_values)
    elif method == "bh":
        adj = benjamini_hochberg(p_values)
    else:
        raise ValueError(f"unknown adjustment {method!r}; use holm or bh")
    return AdjustedPValues(
        method, tuple(float(x) for x in p_values), tuple(float(x) for x in adj), alpha, tuple(bool(x <= alpha) for x in adj)
    )


# ------------------------------------------------------------------------------------- rank, AUROC


@dataclass(frozen=True)
class RankAgreement(_Dict):
    """Spearman rank correlation of two paired score lists."""

    rho: float
    p_value: float
    n: int


def spearman(a: Sequence[float], b: Sequence[float]) -> RankAgreement:
    """``scipy.stats.spearmanr`` of paired scores (``nan`` when a list is constant or shorter than 3)."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs paired scores, got {len(a)} and {len(b)}")
    if len(a) < 3 or np.ptp(np.asarray(a, dtype=float)) == 0 or np.ptp(np.asarray(b, dtype=float)) == 0:
        return RankAgreement(math.nan, math.nan, len(a))
    res = _st.spearmanr(a, b)
    return RankAgreement(float(res.statistic), float(res.pvalue), len(a))


@dataclass(frozen=True)
class AurocResult(_Dict):
    """AUROC = P(score of a positive > score of a negative) (+½ ties), with the Mann–Whitney p-value."""

    auroc: float
    p_value: float  # two-sided Mann–Whitney U test
    n_pos: int
    n_neg: int


def auroc(pos_scores: Sequence[float], neg_scores: Sequence[float]) -> AurocResult:
    """AUROC = U / (n_pos n_neg) from one Mann–Whitney U test (:func:`scipy.stats.mannwhitneyu`), with its
    two-sided p-value.

    >>> r = auroc([0.9, 0.8, 0.4], [0.5, 0.1, 0.2])
    >>> round(r.auroc, 3), r.n_pos, r.n_neg
    (0.889, 3, 3)
    """
    pos, neg = [float(x) for x in pos_scores], [float(x) for x in neg_scores]
    if not pos or not neg:
        return AurocResult(math.nan, math.nan, len(pos), len(neg))
    res = _st.mannwhitneyu(pos, neg, alternative="two-sided")
    return AurocResult(float(res.statistic) / (len(pos) * len(neg)), float(res.pvalue), len(pos), len(neg))


def _auroc_vec(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC of every resample at once: P(pos > neg) + ½ P(pos = neg), over the last axis."""
    p, n = np.moveaxis(pos, axis, -1), np.moveaxis(neg, axis, -1)
    gt = (p[..., :, None] > n[..., None, :]).mean((-2, -1))
    eq = (p[..., :, None] == n[..., None, :]).mean((-2, -1))
    return gt + 0.5 * eq


def auroc_ci(pos_scores: Sequence[float], neg_scores: Sequence[float], confidence: float = 0.95,
             n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC (:func:`scipy.stats.bootstrap`, the positive and negative scores
    resampled independently: a stratified two-sample bootstrap). NaN when a group is empty; the point value twice
    when both groups are constant (no resample can differ)."""
    pos, neg = np.asarray(list(pos_scores), dtype=float), np.asarray(list(neg_scores), dtype=float)
    if pos.size == 0 or neg.size == 0:
        return math.nan, math.nan
    if (pos.size < 2 or np.ptp(pos) == 0) and (neg.size < 2 or np.ptp(neg) == 0):
        v = float(_auroc_vec(pos, neg))
        return v, v
    res = _st.bootstrap((pos, neg), _auroc_vec, paired=False, vectorized=True, confidence_level=confidence,
                        n_resamples=n_resamples, batch=200, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


# --------------------------------------------------------------------------- bounds and detectable effects


def bootstrap_ci(
    samples: Sequence[Sequence[float]] | Sequence[float] | Sequence[np.ndarray] | np.ndarray,
    statistic: Any = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile CI of ``statistic`` (default the mean) by :func:`scipy.stats.bootstrap`.

    ``samples``: one sequence (a mean's CI) or a tuple of equally long sequences resampled together (paired:
    e.g. per-prompt scores before and after, for a ratio of means). NaN when fewer than 3 values or constant."""
    one = np.ndim(samples[0]) == 0
    arrays = [np.asarray(samples, dtype=float)] if one else [np.asarray(x, dtype=float) for x in samples]
    stat = statistic if statistic is not None else (lambda x: float(np.mean(x)))
    n = len(arrays[0])
    if n == 0:
        return math.nan, math.nan
    if n < 3 or all(np.ptp(a) == 0 for a in arrays):
        v = float(stat(*arrays))
        return v, v
    res = _st.bootstrap(tuple(arrays), stat, paired=len(arrays) > 1, vectorized=False, confidence_level=confidence,
                        n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def binomial_pvalue(k: int, n: int, p0: float, alternative: Literal["greater", "less", "two-sided"]) -> float:
    """Exact binomial test of ``k`` successes in ``n`` against rate ``p0`` (:func:`scipy.stats.binomtest`)."""
    return float(_st.binomtest(int(k), int(n), p0, alternative=alternative).pvalue) if n else math.nan


def binomial_detectable_rate(n: int, p0: float, alpha: float, alternative: Literal["greater", "less"]) -> float:
    """The rate at the smallest (``greater``) or largest (``less``) count out of ``n`` whose exact binomial test
    against ``p0`` reaches p < alpha: the smallest effect that test can detect at this n (NaN if none can)."""
    counts = range(n + 1) if alternative == "greater" else range(n, -1, -1)
    for k in counts:
        if binomial_pvalue(k, n, p0, alternative) < alpha:
            return k / n
    return math.nan


def mcnemar_detectable_flips(alpha: float, max_flips: int) -> int | None:
    """The fewest one-way discordant flips (none the other way) for which the one-sided exact McNemar test
    reaches p < alpha (5 at alpha 0.05), or None if ``max_flips`` are too few."""
    for b in range(1, max_flips + 1):
        if 0.5**b < alpha:
            return b
    return None


def null_detectable_shift(null: Sequence[float], alpha: float, alternative: Literal["greater", "less"]) -> float:
    """How far from the null mean an observed statistic must lie for a Monte-Carlo test against ``null`` to reach
    p < alpha (the alpha-quantile of the null, as a shift from its mean)."""
    arr = np.sort(np.asarray(list(null), dtype=float))
    arr = arr[~np.isnan(arr)]
    m = int(np.floor(alpha * (arr.size + 1))) - 1  # at most m null values as extreme keeps (1+m)/(1+N) < alpha
    if m < 0:
        return math.nan
    q = arr[arr.size - 1 - m] if alternative == "greater" else arr[m]
    return float(q - arr.mean())


def bootstrap_pvalue(
    samples: Sequence[float], null_value: float = 0.0, alternative: Literal["greater", "less"] = "greater",
    n_resamples: int = 2000, seed: int = 0,
) -> float:
    """One-sided bootstrap p-value of the mean of ``samples`` against ``null_value``: the share of the bootstrap
    distribution of the mean (:func:`scipy.stats.bootstrap`, ``n_resamples`` resamples) on the null side of
    ``null_value``, +1 corrected: ``(1 + #{mean* <= null_value}) / (1 + n_resamples)`` for ``greater`` (``>=`` for
    ``less``). It is below alpha exactly when the one-sided percentile bound at level 1 − alpha excludes the null
    value, so a claim that needs "the CI excludes no effect" can enter a composite p with it. NaN values are
    dropped; fewer than 3 values (or all equal) give 1 unless every value lies strictly on the claimed side."""
    x = np.asarray(list(samples), dtype=float)
    x = x[~np.isnan(x)]
    if alternative not in ("greater", "less"):
        raise ValueError(f"unknown alternative {alternative!r}; use greater or less")
    sign = 1.0 if alternative == "greater" else -1.0
    if x.size == 0:
        return 1.0
    if x.size < 3 or np.ptp(x) == 0:
        return 1.0 / (1 + n_resamples) if bool(np.all(sign * (x - null_value) > 0)) else 1.0
    res = _st.bootstrap((x,), np.mean, vectorized=True, n_resamples=n_resamples, method="percentile",
                        rng=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    at_null = int((sign * (dist - null_value) <= 0).sum())
    return (1 + at_null) / (1 + dist.size)


def intersection_union_p(parts: Mapping[str, float], gates: Mapping[str, bool] | None = None) -> float:
    """The p-value of a claim that holds only if every one of its tests rejects (an intersection–union test,
    Berger 1982): the largest of the parts' p-values. It is 1.0 when any gate (a condition with no p-value, e.g.
    "the direction passed the selection filters") is False, when a part is NaN or None (a test that could not be
    computed never supports a claim), and when there are no parts. Rejecting at alpha when this p < alpha keeps
    the claim's size at alpha without a multiplicity correction, because the claim's null is the union of the
    parts' nulls.

    >>> intersection_union_p({"sets": 0.0099, "prompts": 0.0015, "selections": 0.208})
    0.208
    >>> intersection_union_p({"sets": 0.0099}, gates={"passed the filters": False})
    1.0
    """
    if gates is not None and not all(bool(g) for g in gates.values()):
        return 1.0
    if not parts:
        return 1.0
    ps = []
    for name, p in parts.items():
        if p is None or not math.isfinite(float(p)):
            return 1.0
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"intersection_union_p: part {name!r} is not a p-value: {p}")
        ps.append(float(p))
    return max(ps)
