"""Controls for necessity claims: cumulative ablation of a ranking against random component sets.

:func:`cumulative_ablation`, for each ``k``:

1. ablates the top-``k`` of a ranking together and measures everything the baseline measures
   (:meth:`mech.ablation.Ablation.evaluate`);
2. draws ``n_random`` sets of the same size and kinds (:func:`mech.components.random_components`, seeded
   :class:`numpy.random.Generator`; optionally with the same count per layer);
3. scores each random set by the mean harmful logit refusal score under its ablation, with a **scorer**: by
   default :func:`mech.scoring.refusal_scores` on this model (``backend="hooks"``);
   :func:`mech.distributed.refusal_scores` bound to a Ray pool spreads the sets over its workers (same sets,
   same numbers);
4. tests "the ranked set lowers the harmful refusal score more than chance" with a permutation p-value
   (+1 corrected, :func:`mech.stats.permutation_pvalue`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from torch import Tensor

from mech.ablation import Ablation
from mech.components import Component, as_component, param_fraction, random_components
from mech.evaluation import Baseline, InterventionResult
from mech.interventions import Intervention
from mech.scoring import refusal_scores
from mech.stats import PermutationResult, jsonable, permutation_pvalue

if TYPE_CHECKING:
    from mech.models import LoadedModel

__all__ = ["CumulativePoint", "CumulativeResult", "Scorer", "cumulative_ablation"]


class Scorer(Protocol):
    """Logit refusal scores ``[n_interventions, n_prompts]`` of ``prompts`` under each intervention:
    :func:`mech.scoring.refusal_scores` with its first argument (the model) bound, or
    :func:`mech.distributed.refusal_scores` with a Ray pool bound."""

    def __call__(self, prompts: Sequence[str], refusal_ids: Sequence[int],
                 interventions: Sequence[Intervention | None], *, batch_size: int = ...) -> Tensor: ...


@dataclass(frozen=True)
class CumulativePoint:
    """Ablating the top-``k`` of a ranking together vs ``n_random`` random sets of the same size and kind."""

    k: int
    ranked: InterventionResult
    random_sets: tuple[tuple[str, ...], ...]
    random_deltas: tuple[float, ...]  # change of the mean harmful refusal score per random set
    random_param_fraction: float  # mean over the random sets
    test: PermutationResult  # alternative "less": the ranked set lowers the score more than chance

    @property
    def delta(self) -> float:
        return self.ranked.harmful.delta

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {"k": self.k, "delta": self.delta, "param_fraction": self.ranked.param_fraction,
             "random_param_fraction": self.random_param_fraction, "p_value": self.test.p_value, "test": self.test,
             "random_deltas": list(self.random_deltas), "random_sets": [list(s) for s in self.random_sets],
             "ranked": self.ranked}
        )


@dataclass(frozen=True)
class CumulativeResult:
    """A cumulative ablation curve with its random controls."""

    name: str
    method: str
    ranking: tuple[str, ...]
    points: tuple[CumulativePoint, ...]
    n_random: int
    seed: int
    baseline_harmful_score: float

    def curve(self) -> dict[str, list[float]]:
        """Plot-ready columns: k, ranked delta, random mean delta, p-value, param fraction."""
        return {
            "k": [p.k for p in self.points],
            "delta": [p.delta for p in self.points],
            "random_mean_delta": [float(np.mean(p.random_deltas)) for p in self.points],
            "p_value": [p.test.p_value for p in self.points],
            "param_fraction": [p.ranked.param_fraction or 0.0 for p in self.points],
        }

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {"name": self.name, "method": self.method, "ranking": list(self.ranking), "n_random": self.n_random,
             "seed": self.seed, "baseline_harmful_score": self.baseline_harmful_score, "curve": self.curve(),
             "points": list(self.points)}
        )

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)



def cumulative_ablation(
    lm: LoadedModel,
    baseline: Baseline,
    ranking: Sequence[Component | str],
    ks: Sequence[int],
    ablation: Ablation = Ablation(),
    n_random: int = 20,
    seed: int = 0,
    pool: Sequence[Component | str] | None = None,
    name: str = "cumulative",
    scorer: Scorer | None = None,
    match_layers: bool = False,
) -> CumulativeResult:
    """Ablate the top-k of ``ranking`` (most important first) for each k in ``ks``, with random controls.

    Each ranked set gets the full :meth:`~mech.ablation.Ablation.evaluate` (everything the baseline measures);
    each of the ``n_random`` control sets (same size and kinds, :func:`random_components` from ``pool``) only its
    mean harmful logit refusal score, from ``scorer`` (default :func:`mech.scoring.refusal_scores` on ``lm``;
    pass ``functools.partial(mech.distributed.refusal_scores, ray_pool)`` to score them on Ray workers). The p-value
    is :func:`mech.stats.permutation_pvalue` with ``alternative="less"`` on the change of the mean harmful
    score. ``match_layers``: the random sets have the ranked set's count per layer (see
    :func:`random_components`).
    """
    if n_random < 1:
        raise ValueError("cumulative_ablation needs n_random >= 1 (use >= 20 for a p-value below 0.05)")
    comps = [as_component(c) for c in ranking]
    if not ks or max(ks) > len(comps) or min(ks) < 1:
        raise ValueError(f"ks must lie in 1..{len(comps)} (the ranking's length), got {list(ks)}")
    score: Scorer = scorer if scorer is not None else partial(refusal_scores, lm)
    rng = np.random.default_rng(seed)
    base_mean = float(baseline.harmful_scores.double().mean())
    points = []
    for k in ks:
        top = comps[:k]
        ranked = ablation.evaluate(lm, baseline, top, name=f"{name}-top{k}")
        rands = [random_components(lm, top, rng, pool, match_layers) for _ in range(n_random)]
        sets = [tuple(c.id for c in rand) for rand in rands]
        fracs = [param_fraction(lm, rand) for rand in rands]
        scores = score(baseline.harmful, baseline.refusal_ids, [ablation.of(s) for s in sets],
                       batch_size=baseline.batch_size)
        deltas = [float(row.double().mean()) - base_mean for row in scores]
        test = permutation_pvalue(ranked.harmful.delta, deltas, alternative="less")
        points.append(CumulativePoint(k, ranked, tuple(sets), tuple(deltas), float(np.mean(fracs)), test))
    return CumulativeResult(name, ablation.method, tuple(c.id for c in comps), tuple(points), n_random, seed, base_mean)
