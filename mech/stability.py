"""Stability of a selection: how often it recurs when the data it was selected on is resampled.

A claim that judges "the top-k heads", "the probe layer" or "the selected direction" on held-out data is only as
good as that selection: one made on noise recurs rarely when the selection data change. The bootstrap of the
selection (Efron & Tibshirani 1993, ch. 17; as a stability check of selected features, Meinshausen & Bühlmann
2010, "Stability selection"):

1. **Resample** (:func:`bootstrap_indices`): ``B`` draws, each resampling every group of units the selection read
   (train pairs; validation pairs too for a selection made there) with replacement at its own size, from one
   seeded generator (``numpy.random.default_rng(seed)``), so the draws are a function of the seed. A group can be
   stratified (e.g. by category: every draw keeps each category's count).
2. **Re-select** (:func:`reselect`): apply the selection rule to each draw. The rule receives index arrays and
   re-aggregates per-unit quantities computed once (per-pair attribution scores, per-prompt residuals), so a
   resample costs an aggregation, not a forward pass, wherever the rule allows.
3. **Recurrence** (:func:`set_recurrence`, :func:`value_recurrence`): the share of draws whose selection matches
   the one reported on the full data — for a set of ``k`` items, an overlap of at least ``min_overlap`` (50 %) of
   ``k``; for a layer, the same layer; for a site, the same (layer, position) — with the distribution of what was
   selected (``{value: count}``; for sets, the number of draws that contain each item). A selection with
   recurrence below :data:`FLAG_BELOW` (0.5) is ``flagged``: it recurs in fewer than half of the resamples.

The direction's re-selection (:func:`reselect_direction`): per-prompt ``resid_pre`` at the candidate layers and
end-aligned positions (:func:`resid_at`, one forward of the train prompts), whose resampled means are the
resampled difference-in-means candidates of :func:`mech.directions.diff_in_means`; each draw then runs
:func:`mech.directions.select_direction` on the resampled validation prompts (new forwards: the cost of one
selection per draw; a prompt drawn twice is scored twice, so the means are exactly the bootstrap means).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from mech.directions import DiffInMeans, select_direction
from mech.hooks import hook_name, run_with_cache

if TYPE_CHECKING:
    from torch import Tensor

    from mech.models import LoadedModel

FLAG_BELOW = 0.5  # a selection that recurs in fewer than half of the resamples is flagged
MIN_OVERLAP = 0.5  # a resampled top-k set "recurs" when it holds at least this share of the reported k items

T = TypeVar("T")

__all__ = ["FLAG_BELOW", "MIN_OVERLAP", "bootstrap_indices", "reselect", "reselect_direction", "resid_at",
           "set_recurrence", "top_k", "value_recurrence"]


def bootstrap_indices(n: int, rng: np.random.Generator, strata: Sequence[Hashable] | None = None) -> np.ndarray:
    """One bootstrap draw of ``n`` units: indices into ``range(n)``, with replacement. With ``strata`` (one label per
    unit), each stratum is resampled within itself at its own size (sorted by label, so the draw is a function of
    the generator's state only)."""
    if n < 1:
        raise ValueError(f"bootstrap_indices needs at least one unit, got n={n}")
    if strata is None:
        return rng.integers(0, n, size=n)
    if len(strata) != n:
        raise ValueError(f"bootstrap_indices: {len(strata)} strata labels for {n} units")
    by: dict[Hashable, list[int]] = {}
    for i, s in enumerate(strata):
        by.setdefault(s, []).append(i)
    out = [np.asarray(by[s])[rng.integers(0, len(by[s]), size=len(by[s]))] for s in sorted(by, key=str)]
    return np.concatenate(out)


def reselect(select: Callable[..., T], sizes: Sequence[int], n_resamples: int, seed: int,
             strata: Sequence[Sequence[Hashable] | None] | None = None) -> list[T]:
    """``select(*indices)`` on ``n_resamples`` bootstrap draws: each draw resamples every group (``sizes[g]``
    units, optionally ``strata[g]``) with replacement, in order, from ``numpy.random.default_rng(seed)``."""
    if n_resamples < 1:
        raise ValueError(f"reselect needs at least one resample, got {n_resamples}")
    strata = list(strata) if strata is not None else [None] * len(sizes)
    if len(strata) != len(sizes):
        raise ValueError(f"reselect: {len(strata)} strata for {len(sizes)} groups")
    rng = np.random.default_rng(seed)
    return [select(*[bootstrap_indices(n, rng, s) for n, s in zip(sizes, strata, strict=True)])
            for _ in range(n_resamples)]


def top_k(per_unit: np.ndarray, idx: np.ndarray | None, k: int) -> list[int]:
    """Columns of the ``k`` most negative means of ``per_unit`` (``[units, items]``) over the rows ``idx`` (all rows
    when None; NaN ignored), ties broken by column order (a stable sort): the rule of
    :func:`fixtures.h1_circuit.top_heads` on a resample."""
    rows = per_unit if idx is None else per_unit[idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column sorts last, as on the full data
        mean = np.nanmean(rows, axis=0)
    return [int(j) for j in np.argsort(mean, kind="stable")[:k]]


def _flag(rec: dict[str, Any]) -> dict[str, Any]:
    rec["flagged"] = bool(rec["recurrence"] < FLAG_BELOW)
    return rec


def set_recurrence(full: Sequence[str], resampled: Sequence[Sequence[str]],
                   min_overlap: float = MIN_OVERLAP) -> dict[str, Any]:
    """How a reported set of ``k`` items recurs: ``recurrence`` = share of resampled sets holding at least
    ``min_overlap`` x k of its items; ``mean_overlap`` = mean share of its items held; ``distribution`` = per item,
    the number of resampled sets that hold it (most frequent first); ``flagged``."""
    if not resampled:
        raise ValueError("set_recurrence needs at least one resampled selection")
    ref = set(full)
    if not ref:
        raise ValueError("set_recurrence: the reported set is empty")
    shares = np.array([len(ref & set(s)) / len(ref) for s in resampled])
    counts = Counter(x for s in resampled for x in set(s))
    return _flag({"B": len(resampled), "full": list(full), "criterion": f"overlap >= {min_overlap:g} of the {len(ref)}",
                  "recurrence": float(np.mean(shares >= min_overlap - 1e-12)), "mean_overlap": float(shares.mean()),
                  "distribution": dict(sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))))})


def value_recurrence(full: Hashable, resampled: Sequence[Hashable], criterion: str = "same value") -> dict[str, Any]:
    """How a reported value (a layer; a site as a string) recurs: ``recurrence`` = share of resamples that select
    it; ``distribution`` = ``{value: count}`` (most frequent first); ``flagged``."""
    if not resampled:
        raise ValueError("value_recurrence needs at least one resampled selection")
    counts = Counter(resampled)
    return _flag({"B": len(resampled), "full": full, "criterion": criterion,
                  "recurrence": counts.get(full, 0) / len(resampled),
                  "distribution": dict(sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))))})


def resid_at(lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int], positions: Sequence[int],
             batch_size: int = 16) -> Tensor:
    """Per prompt, ``blocks.L.hook_resid_pre`` at ``layers`` and end-aligned ``positions``: ``[n, len(layers),
    len(positions), d_model]`` float64 on the CPU (the forward stops after the last layer). Its mean over prompts is
    one side of :func:`mech.directions.diff_in_means`."""


    if not prompts:
        raise ValueError("resid_at needs at least one prompt")
    if any(p >= 0 for p in positions):
        raise ValueError(f"positions are end-aligned (negative) indices, got {tuple(positions)}")
    names = [hook_name(L, "hook_resid_pre") for L in layers]
    out = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            enc = lm.batch(list(prompts[i : i + batch_size]))
            if int(enc["attention_mask"].sum(-1).min()) < len(positions):
                raise ValueError("resid_at: a prompt is shorter than the requested end-aligned positions")
            _, cache = run_with_cache(lm, enc, names, positions=list(positions), to_cpu=True, stop_after_last=True,
                                      use_cache=False)
            out.append(torch.stack([cache[n].double() for n in names], dim=1))  # [b, L, P, d]
    return torch.cat(out)


def reselect_direction(lm: LoadedModel, train_harmful: Sequence[str], train_harmless: Sequence[str],
                       val_harmful: Sequence[str], val_harmless: Sequence[str], refusal_ids: Sequence[int],
                       layers: Sequence[int], positions: Sequence[int], n_resamples: int, seed: int,
                       with_direction: bool = False, **select_kw: Any) -> list[dict[str, Any]]:
    """The refusal direction re-selected on ``n_resamples`` bootstrap draws of its four prompt groups (train harmful,
    train harmless, validation harmful, validation harmless; each with replacement at its own size): per draw the
    selected ``layer``, ``pos``, whether it ``passed_filters`` and, ``with_direction``, its unit ``direction``
    (float64 tensor). ``select_kw`` go to :func:`mech.directions.select_direction` (its thresholds), which scores
    ``layers`` x ``positions``."""


    groups = [list(train_harmful), list(train_harmless), list(val_harmful), list(val_harmless)]
    if not all(groups):
        raise ValueError(f"reselect_direction needs prompts in every group, got sizes {[len(g) for g in groups]}")
    layers, positions = tuple(layers), tuple(positions)
    ah, a_s = resid_at(lm, groups[0], layers, positions), resid_at(lm, groups[1], layers, positions)
    vh, vs = groups[2], groups[3]

    def select(hi: np.ndarray, si: np.ndarray, vhi: np.ndarray, vsi: np.ndarray) -> dict[str, Any]:
        dim = DiffInMeans(ah[torch.as_tensor(hi)].mean(0) - a_s[torch.as_tensor(si)].mean(0), layers, positions,
                          len(hi), len(si))
        sel = select_direction(lm, dim, [vh[i] for i in vhi], [vs[i] for i in vsi], refusal_ids, layers=layers,
                               **select_kw)
        out = {"layer": sel.layer, "pos": sel.pos, "passed_filters": sel.passed_filters}
        return out | ({"direction": sel.direction} if with_direction else {})

    return reselect(select, [len(g) for g in groups], n_resamples, seed)
