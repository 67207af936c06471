"""Necessity: zero- and mean-ablation of heads, neurons and blocks.

Patching shows that a component is *sufficient* to move refusal; ablation asks whether it is *necessary*.
Components (:class:`~mech.components.Component`: ``L12.H3``, ``L5.N1234``, ``L7.attn``, ``L7.mlp``) and their
parameter accounting live in :mod:`mech.components`; measuring an intervention in :mod:`mech.evaluation`; the
cumulative curve and its random-component controls in :mod:`mech.controls`.

Ablation (:func:`ablate`: the :class:`mech.interventions.Ablate` value applied, a context manager over
:func:`mech.hooks.hooks`, so hooks are removed on error)
    ``zero``: the activation is set to 0. ``mean``: it is set to its mean over a reference set (the harmless
    prompts; :func:`mean_activations`). Two mean conventions (``mode``):

    * ``"end_aligned"`` (default): the last ``n_end`` positions of a forward (the chat template's
      post-instruction tokens, identical across prompts) get the mean *at that end-aligned position*; every
      earlier position gets the mean over all real (non-pad) tokens of the reference prompts. A forward shorter
      than ``n_end`` (a cached decoding step during generation) gets the all-token mean.
    * ``"averaged"``: every position gets the mean over all real tokens.

    ``positions`` (optional, negative = end-aligned) restricts the ablation to those positions of each forward.
    :class:`Ablation` holds the four choices (method, means, mode, positions) as one value, e.g. for
    :func:`mech.controls.cumulative_ablation`; :meth:`Ablation.of` gives the :class:`mech.interventions.Ablate` value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mech.components import HOOK_OF_KIND as _HOOK_OF_KIND
from mech.components import Component, as_component, param_fraction
from mech.evaluation import (
    Baseline,
    InterventionResult,
    evaluate_intervention,
)
from mech.hooks import HookPoint, hook_name, hooks
from mech.interventions import ABLATION_METHODS, MEAN_MODES, Ablate, AblationMethod, MeanMode

if TYPE_CHECKING:
    from mech.models import LoadedModel

__all__ = [
    "Ablation",
    "MeanActivations",
    "ablate",
    "evaluate_ablation",
    "individual_ablations",
    "mean_activations",
]

# -------------------------------------------------------------------------------------------- means


@dataclass
class MeanActivations:
    """Means of hook activations over a reference (harmless) prompt set, for mean-ablation.

    ``averaged[name]``: ``[*feat]`` mean over every real (non-pad) token; ``end_aligned[name]``:
    ``[n_end, *feat]`` mean at the end-aligned positions ``-n_end..-1`` (float32, CPU). ``*feat`` is
    ``[n_heads, d_head]`` for ``attn.hook_z``, ``[d_mlp]`` for ``mlp.hook_post``, ``[d_model]`` otherwise.
    """

    averaged: dict[str, Tensor]
    end_aligned: dict[str, Tensor]
    n_end: int
    n_prompts: int
    _cache: dict[tuple, Tensor] = field(default_factory=dict, repr=False)

    def replacement(self, name: str, n_pos: int, mode: MeanMode, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The mean to write at each of ``n_pos`` positions of one forward: ``[n_pos, *feat]``."""
        key = (name, n_pos, mode, device, dtype)
        if key not in self._cache:
            if name not in self.averaged:
                raise KeyError(f"no mean cached for {name}; compute mean_activations for its component kind")
            avg = self.averaged[name]
            rep = avg.expand(n_pos, *avg.shape).clone()
            if mode == "end_aligned" and n_pos >= self.n_end:
                rep[n_pos - self.n_end :] = self.end_aligned[name]
            elif mode not in ("end_aligned", "averaged"):
                raise ValueError(f"unknown mean mode {mode!r}; use end_aligned or averaged")
            self._cache[key] = rep.to(device=device, dtype=dtype)
        return self._cache[key]


@torch.inference_mode()
def mean_activations(
    lm: LoadedModel,
    prompts: Sequence[str],
    kinds: Sequence[str] = ("head",),
    n_end: int = 5,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> MeanActivations:
    """Mean activations of the hook points of ``kinds`` (all layers, or ``layers``) over ``prompts``.

    Accumulated in float64 on the CPU. Every prompt must have at least ``n_end`` tokens.
    """
    layers = list(range(lm.shape.n_layers)) if layers is None else list(layers)
    names = [hook_name(L, _HOOK_OF_KIND[k]) for k in kinds for L in layers]
    sums: dict[str, Tensor] = {}
    ends: dict[str, Tensor] = {}
    count = 0
    n_tok = 0
    state: dict[str, Tensor] = {}

    def make(name: str) -> Callable[[Tensor, HookPoint], None]:
        def acc(x: Tensor, hook: HookPoint) -> None:
            mask = state["mask"].to(x.device, x.dtype).view(*state["mask"].shape, *[1] * (x.dim() - 2))
            s = (x * mask).sum((0, 1)).double().cpu()  # [*feat]
            e = x[:, -n_end:].sum(0).double().cpu()  # [n_end, *feat]
            sums[name] = sums[name] + s if name in sums else s
            ends[name] = ends[name] + e if name in ends else e

        return acc

    for i in range(0, len(prompts), batch_size):
        enc = lm.batch(list(prompts[i : i + batch_size]))
        lengths = enc["attention_mask"].sum(-1)
        if int(lengths.min()) < n_end:
            raise ValueError(f"mean_activations: a prompt has fewer than n_end={n_end} tokens")
        state["mask"] = enc["attention_mask"]
        with hooks(lm, [(n, make(n)) for n in names]):
            lm.model(**enc, logits_to_keep=1, use_cache=False)
        count += enc["input_ids"].shape[0]
        n_tok += int(lengths.sum())
    return MeanActivations(
        averaged={n: (sums[n] / n_tok).float() for n in names},
        end_aligned={n: (ends[n] / count).float() for n in names},
        n_end=n_end,
        n_prompts=count,
    )


# ------------------------------------------------------------------------------------------- ablation


def ablate(
    lm: LoadedModel,
    components: Sequence[Component | str],
    method: AblationMethod = "zero",
    means: MeanActivations | None = None,
    mode: MeanMode = "end_aligned",
    positions: Sequence[int] | None = None,
) -> AbstractContextManager[object]:
    """Zero- or mean-ablate ``components`` for the duration of the block (hooks removed on exit or error): the
    :class:`~mech.interventions.Ablate` value's :meth:`~mech.interventions.Ablate.apply`.

    ``positions``: ``None`` ablates every position; otherwise the listed indices of each forward's sequence
    (negative = end-aligned). ``means`` is required for ``method="mean"`` (see :func:`mean_activations`).
    Ablating no component is the identity (no hook is attached).
    """
    comps = tuple(as_component(c) for c in components)
    return Ablate(comps, method, means, mode, None if positions is None else tuple(positions)).apply(lm)


@dataclass(frozen=True)
class Ablation:
    """How components are ablated, as one value: ``method`` (zero | mean), the ``means`` mean-ablation writes,
    their ``mode`` (end_aligned | averaged) and the ``positions`` ablated (``None``: all). Calling it with a
    model and components gives the :func:`ablate` context manager."""

    method: AblationMethod = "zero"
    means: MeanActivations | None = field(default=None, repr=False)
    mode: MeanMode = "end_aligned"
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in ABLATION_METHODS:
            raise ValueError(f"unknown ablation method {self.method!r}; use zero or mean")
        if self.mode not in MEAN_MODES:
            raise ValueError(f"unknown mean mode {self.mode!r}; use end_aligned or averaged")
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))

    def of(self, components: Sequence[Component | str]) -> Ablate:
        """This ablation of ``components``, as an intervention value."""
        return Ablate(tuple(as_component(c) for c in components), self.method, self.means, self.mode, self.positions)

    def __call__(self, lm: LoadedModel, components: Sequence[Component | str]) -> AbstractContextManager[object]:
        return self.of(components).apply(lm)

    def evaluate(
        self, lm: LoadedModel, baseline: Baseline, components: Sequence[Component | str], name: str | None = None
    ) -> InterventionResult:
        """Ablate ``components`` together and measure everything ``baseline`` measured."""
        comps = [as_component(c) for c in components]
        ids = [c.id for c in comps]
        target: dict[str, Any] = {"components": ids, "method": self.method,
                                  "positions": list(self.positions) if self.positions else None}
        if self.method == "mean":
            target["mean_mode"] = self.mode
        return evaluate_intervention(
            lm, baseline, lambda: self(lm, comps),
            name=name or f"{self.method}-ablate[{','.join(ids[:4])}{',...' if len(ids) > 4 else ''}]",
            kind=f"{self.method}_ablation", target=target, param_fraction=param_fraction(lm, comps),
        )


def evaluate_ablation(
    lm: LoadedModel,
    baseline: Baseline,
    components: Sequence[Component | str],
    method: AblationMethod = "zero",
    means: MeanActivations | None = None,
    mode: MeanMode = "end_aligned",
    positions: Sequence[int] | None = None,
    name: str | None = None,
) -> InterventionResult:
    """Ablate ``components`` together and measure everything the baseline measured (:meth:`Ablation.evaluate`)."""
    return Ablation(method, means, mode, None if positions is None else tuple(positions)).evaluate(
        lm, baseline, components, name)


def individual_ablations(
    lm: LoadedModel, baseline: Baseline, components: Sequence[Component | str], ablation: Ablation = Ablation()
) -> list[InterventionResult]:
    """One :meth:`Ablation.evaluate` per component (a per-component necessity sweep)."""
    return [ablation.evaluate(lm, baseline, [c], name=str(c)) for c in components]
