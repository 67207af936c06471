"""Interventions as values: ablate components, project out a direction, add a vector at a layer.

An intervention is a frozen value that says what it changes, not how a forward is run:

* :class:`Ablate` — zero- or mean-ablate components (:class:`~mech.components.Component`: heads, neurons,
  attn / mlp blocks): ``x <- rep`` on the units' slice of their hook point. ``zero``: ``rep = 0``; ``mean``:
  ``rep`` = the reference mean (:class:`~mech.ablation.MeanActivations`), end-aligned at the last ``n_end``
  positions (``mode="end_aligned"``) or the all-token mean everywhere (``"averaged"``); optionally only at
  ``positions`` (negative = end-aligned).
* :class:`ProjectOut` — directional ablation (Arditi et al. 2024): ``x <- x - (x . r) r`` with the unit direction
  ``r`` at ``resid_pre`` of every layer and ``attn_out`` / ``mlp_out`` of every block (:data:`PROJECTED_KINDS`).
* :class:`AddVector` — activation addition: ``x <- x + coeff * v`` at ``resid_pre`` of one layer.

Each kind has ONE hook function (:func:`ablation_hook`, :func:`projection_hook`, :func:`addition_hook`) whose
arithmetic is written once. Its parameters are read off the activation ``x`` the hook sees, by one of two
variants of a :data:`Param`:

1. **a plain forward** (:meth:`Ablate.apply` etc., a context manager over :func:`mech.hooks.hooks`, hooks removed
   on exit or error): the same parameter for every row of the batch (:func:`every_row`, cast once per
   device/dtype; mean-ablation's replacement and the position mask depend on the forward's length);
2. **the batched-rows engine** (:mod:`mech.set_scores` over :class:`mech.engine.Engine`): one parameter per row
   (row = intervention x prompt, rows in join order; :func:`per_row` keeps the rows that have joined so far),
   built for a group of interventions of one kind by :class:`AblationRows` / :class:`DirectionRows`. A row that
   a hook does not concern gets an exact no-op (a false mask, a zero direction, a zero vector).

The two variants give the same numbers to float32 round-off (the batched engine runs other matrix shapes);
each keeps the arithmetic it always had, so neither path's numbers changed when they were unified
(``tests/test_interventions.py``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from mech.components import Component, as_component, check_component
from mech.hooks import HookFn, HookPoint, hook_name, hooks
from mech.vectors import DirectionError, as_vector

if TYPE_CHECKING:
    from mech.ablation import MeanActivations
    from mech.models import LoadedModel

__all__ = [
    "ABLATION_METHODS",
    "MEAN_MODES",
    "PROJECTED_KINDS",
    "Ablate",
    "AblationMethod",
    "AblationRows",
    "AddVector",
    "DirectionRows",
    "Intervention",
    "MeanMode",
    "Param",
    "ProjectOut",
    "ablation_hook",
    "addition_hook",
    "every_row",
    "per_row",
    "projection_hook",
]

AblationMethod = Literal["zero", "mean"]
MeanMode = Literal["end_aligned", "averaged"]
ABLATION_METHODS: tuple[str, ...] = ("zero", "mean")
MEAN_MODES: tuple[str, ...] = ("end_aligned", "averaged")
PROJECTED_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")  # ProjectOut's hook points, per layer

# A hook's parameter for the activation it sees: x [rows, pos, *feat] -> a tensor that broadcasts against x
# (for projection_hook: [d_model] for every row, or [rows, d_model] one per row).
Param = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------ the hook functions


def ablation_hook(mask: Param, rep: Param) -> HookFn:
    """``x <- rep`` where ``mask``, else ``x`` (zero / mean ablation)."""

    def fn(x: Tensor, hook: HookPoint) -> Tensor:  # x: [batch, pos, *feat]
        return torch.where(mask(x), rep(x), x)

    return fn


def projection_hook(r: Param) -> HookFn:
    """``x <- x - (x . r) r`` (directional ablation); ``r(x)``: ``[d_model]`` for every row or ``[rows, d_model]``
    one per row (a zero row leaves its row exactly unchanged). The per-row form is a batched product (``bmm``),
    the shared one a matrix-vector product: each the kernel its path always ran."""

    def fn(x: Tensor, hook: HookPoint) -> Tensor:  # x: [batch, pos, d_model]
        rr = r(x)
        if rr.dim() == 1:
            return x - (x @ rr)[..., None] * rr
        return x - torch.bmm(x, rr[:, :, None]) * rr[:, None, :]

    return fn


def addition_hook(v: Param) -> HookFn:
    """``x <- x + v`` (activation addition)."""

    def fn(x: Tensor, hook: HookPoint) -> Tensor:  # x: [batch, pos, d_model]
        return x + v(x)

    return fn


def every_row(t: Tensor, cast: bool = True) -> Param:
    """The same tensor for every row: ``t`` moved (once per device/dtype it meets) to the activation's device
    and, with ``cast``, its dtype (a mask keeps its bool dtype with ``cast=False``)."""
    by: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def param(x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        if key not in by:
            by[key] = t.to(device=x.device, dtype=x.dtype if cast else t.dtype)
        return by[key]

    return param


def _gathered(table: Tensor, idx: Tensor) -> Param:
    """Per row and position a row of ``table [n, *feat]``: ``table[idx[:rows]]`` (``idx [B, W]``)."""

    def param(x: Tensor) -> Tensor:
        return table[idx[: x.shape[0]]]

    return param


def per_row(t: Tensor, pos_axis: bool = True) -> Param:
    """One row of ``t [rows, ...]`` per row of the activation, in join order: the first ``x.shape[0]`` rows (the
    rows that have joined so far), with a broadcast position axis (``pos_axis``)."""

    def param(x: Tensor) -> Tensor:
        rows = t[: x.shape[0]]
        return rows.unsqueeze(1) if pos_axis else rows

    return param


# --------------------------------------------------------------------------------------------- ablation


def _unit_masks(lm: LoadedModel, components: Sequence[Component]) -> dict[str, Tensor]:
    """``{hook name: bool mask [*feat]}`` of the units to ablate at each hook point."""
    s = lm.shape
    masks: dict[str, Tensor] = {}
    for c in components:
        check_component(lm, c)
        if c.kind == "head":
            m = masks.setdefault(c.hook, torch.zeros(s.n_heads, s.d_head, dtype=torch.bool))
            m[c.index] = True
        elif c.kind == "neuron":
            m = masks.setdefault(c.hook, torch.zeros(s.d_mlp, dtype=torch.bool))
            m[c.index] = True
        else:
            masks[c.hook] = torch.ones(s.d_model, dtype=torch.bool)
    return masks


def check_ablation(method: str, means: MeanActivations | None, mode: str) -> None:
    """One-line ValueErrors for an unknown method or mode, or mean-ablation without means."""
    if method not in ABLATION_METHODS:
        raise ValueError(f"unknown ablation method {method!r}; use zero or mean")
    if mode not in MEAN_MODES:
        raise ValueError(f"unknown mean mode {mode!r}; use end_aligned or averaged")
    if method == "mean" and means is None:
        raise ValueError("mean-ablation needs means=mean_activations(lm, harmless_prompts, kinds)")


@dataclass(frozen=True, eq=False)
class Ablate:
    """Zero- or mean-ablate ``components`` together (ids such as ``L12.H3`` or :class:`Component` s).

    ``means`` is required for ``method="mean"`` (:func:`mech.ablation.mean_activations`); ``positions``: ``None``
    ablates every position, else those indices of each forward (negative = end-aligned). No component: the
    identity (no hook)."""

    components: tuple[Component, ...]
    method: AblationMethod = "zero"
    means: MeanActivations | None = field(default=None, repr=False)
    mode: MeanMode = "end_aligned"
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "components", tuple(as_component(c) for c in self.components))
        check_ablation(self.method, self.means, self.mode)
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))

    def first_layer(self, n_layers: int) -> int:
        """The lowest layer it changes (``n_layers`` when it changes none)."""
        return min((c.layer for c in self.components), default=n_layers)

    def on_prefix(self) -> Ablate:
        """The same ablation for a prefix shared by prompts of different lengths: the position-independent mean."""
        return replace(self, mode="averaged")

    def hooks(self, lm: LoadedModel) -> list[tuple[str, HookFn]]:
        """Hooks for a plain forward (every row ablated alike); none when no component is ablated."""
        masks = _unit_masks(lm, self.components)
        return [(name, ablation_hook(self._mask(m), self._rep(name))) for name, m in masks.items()]

    def apply(self, lm: LoadedModel) -> AbstractContextManager[object]:
        """A context manager that ablates for the duration of the block (hooks removed on exit or error)."""
        hs = self.hooks(lm)
        return hooks(lm, hs) if hs else nullcontext()

    def _mask(self, unit_mask: Tensor) -> Param:
        units = every_row(unit_mask, cast=False)
        positions = self.positions

        def param(x: Tensor) -> Tensor:
            m = units(x)  # [*feat] bool
            if positions is None:
                return m
            n_pos = x.shape[1]
            pm = torch.zeros(n_pos, dtype=torch.bool, device=x.device)
            idx = [p if p >= 0 else n_pos + p for p in positions]
            pm[[i for i in idx if 0 <= i < n_pos]] = True
            return pm.view(n_pos, *[1] * m.dim()) & m  # [pos, *feat]

        return param

    def _rep(self, name: str) -> Param:
        if self.method == "zero":
            return lambda x: x.new_zeros(())
        means, mode = self.means, self.mode
        assert means is not None
        return lambda x: means.replacement(name, x.shape[1], mode, x.device, x.dtype)  # [pos, *feat]


class AblationRows:
    """Hooks for rows of the batched engine, each row ablating one of ``ablations`` (all with the same method,
    means and mode): per hook point one :func:`ablation_hook` with per-row masks (a false mask for a row whose
    ablation does not touch that hook point) and replacements (zero; the all-token mean for the prefix rows and
    ``mode="averaged"``; else each rest row's own end-aligned means at its last ``means.n_end`` real tokens)."""

    def __init__(self, lm: LoadedModel, ablations: Sequence[Ablate], device: torch.device, dtype: torch.dtype) -> None:
        first = ablations[0] if ablations else Ablate(())
        if any((a.method, a.mode, a.positions) != (first.method, first.mode, None) or a.means is not first.means
               for a in ablations):
            raise ValueError("batched ablation rows need one method, means and mode and no positions")
        self.method, self.means, self.mode = first.method, first.means, first.mode
        self.masks = [_unit_masks(lm, a.components) for a in ablations]  # per ablation: {hook name: bool [*feat]}
        self.device, self.dtype = device, dtype
        self._tables: dict[str, Tensor] = {}

    def _table(self, name: str) -> Tensor:
        """``[1 + n_end, *feat]``: row 0 the all-token mean; rows 1..n_end the end-aligned means."""
        if name not in self._tables:
            means = self.means
            assert means is not None
            parts = [means.averaged[name][None]] + ([means.end_aligned[name]] if self.mode == "end_aligned" else [])
            self._tables[name] = torch.cat(parts).to(device=self.device, dtype=self.dtype)
        return self._tables[name]

    def hooks(self, ids: list[int], row_ivs: Tensor, row_lens: Tensor | None, W: int) -> list[tuple[str, HookFn]]:
        """Hooks for rows whose ablations are ``ids[row_ivs]``; ``row_lens`` the real rest tokens per row
        (``None``: the prefix rows), ``W`` the window width."""
        dev, means = self.device, self.means
        idx = None
        if row_lens is not None and self.method == "mean" and self.mode == "end_aligned":
            assert means is not None
            e = torch.arange(W, device=dev)[None] - (row_lens[:, None] - means.n_end)  # [B, W]
            real = torch.arange(W, device=dev)[None] < row_lens[:, None]
            idx = torch.where((e >= 0) & real, e + 1, 0)
        masks = self.masks
        names = sorted({n for s in ids for n in masks[s]})
        hs: list[tuple[str, HookFn]] = []
        for name in names:
            feat = next(masks[s][name] for s in ids if name in masks[s])
            per_iv = torch.stack([masks[s].get(name, torch.zeros_like(feat)) for s in ids]).to(dev)
            m = per_row(per_iv.index_select(0, row_ivs))  # [B, *feat] -> [n, 1, *feat]
            if self.method == "zero":
                rep = every_row(torch.zeros((), device=dev, dtype=self.dtype))
            elif idx is None:
                rep = every_row(self._table(name)[0])  # the all-token mean
            else:
                rep = _gathered(self._table(name), idx)  # [n, W, *feat]: each row's end-aligned means
            hs.append((name, ablation_hook(m, rep)))
        return hs


# ------------------------------------------------------------------------------------------- directions


def _layer_index(layer: object, n_layers: int) -> int:
    try:
        L = operator.index(layer) if not isinstance(layer, bool) else None  # type: ignore[arg-type]
    except TypeError:
        L = None
    if L is None:
        raise DirectionError(f"the layer must be an integer layer index, got {layer!r}")
    if not 0 <= L < n_layers:
        raise DirectionError(f"layer {L} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return L


@dataclass(frozen=True, eq=False)
class ProjectOut:
    """Directional ablation: project the unit ``direction`` (float64 CPU ``[d_model]``) out of ``resid_pre`` of
    every layer and ``attn_out`` / ``mlp_out`` of every block, at every position. Build it with :meth:`of`."""

    direction: Tensor

    @classmethod
    def of(cls, lm: LoadedModel, direction: object) -> ProjectOut:
        """Checked against ``lm`` (one-line :class:`~mech.vectors.DirectionError`) and normalized."""
        r = as_vector(lm, direction, "direction")
        n = r.norm()
        if not torch.isfinite(n) or n == 0:
            raise DirectionError("the direction must be a finite non-zero vector")
        return cls(r / n)

    def first_layer(self, n_layers: int) -> int:
        return 0

    def hooks(self, lm: LoadedModel) -> list[tuple[str, HookFn]]:
        project = projection_hook(every_row(self.direction))
        return [(hook_name(L, k), project) for L in range(lm.shape.n_layers) for k in PROJECTED_KINDS]

    def apply(self, lm: LoadedModel) -> AbstractContextManager[object]:
        return hooks(lm, self.hooks(lm))


@dataclass(frozen=True, eq=False)
class AddVector:
    """Activation addition: add ``coeff * vector`` (float64 CPU ``[d_model]``, not normalized) to
    ``blocks.{layer}.hook_resid_pre`` at every position. Build it with :meth:`of`."""

    vector: Tensor
    layer: int
    coeff: float = 1.0

    @classmethod
    def of(cls, lm: LoadedModel, vector: object, layer: object, coeff: float = 1.0) -> AddVector:
        """Checked against ``lm``: one-line :class:`~mech.vectors.DirectionError` for a bad vector, layer or coeff."""
        try:
            ok = not isinstance(coeff, bool) and math.isfinite(float(coeff))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise DirectionError(f"coeff must be a finite number, got {coeff!r}")
        L = _layer_index(layer, lm.shape.n_layers)
        return cls(as_vector(lm, vector, "steering vector"), L, coeff)

    @property
    def scaled(self) -> Tensor:
        """``coeff * vector`` (float64): what is added."""
        return self.vector * self.coeff

    def first_layer(self, n_layers: int) -> int:
        return self.layer

    def hooks(self, lm: LoadedModel) -> list[tuple[str, HookFn]]:
        return [(hook_name(self.layer, "hook_resid_pre"), addition_hook(every_row(self.scaled)))]

    def apply(self, lm: LoadedModel) -> AbstractContextManager[object]:
        return hooks(lm, self.hooks(lm))


class DirectionRows:
    """Hooks for rows of the batched engine, each row under one of ``interventions`` (:class:`ProjectOut` or
    :class:`AddVector`, in any mix): one :func:`projection_hook` at every projected hook point (per-row
    directions, zero for the addition rows), one :func:`addition_hook` at ``resid_pre`` of each layer some row adds
    at (per-row vectors, zero for rows adding elsewhere or projecting)."""

    def __init__(self, interventions: Sequence[ProjectOut | AddVector], n_layers: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.n_layers, self.device = n_layers, device
        vecs = [iv.direction if isinstance(iv, ProjectOut) else iv.scaled for iv in interventions]
        self.vecs = torch.stack(vecs).to(device=device, dtype=dtype)  # as the hooks cast them
        self.project = torch.tensor([isinstance(iv, ProjectOut) for iv in interventions], device=device)
        self.layer_of = torch.tensor([iv.first_layer(n_layers) for iv in interventions], device=device)

    def hooks(self, ids: list[int], row_ivs: Tensor, row_lens: Tensor | None, W: int) -> list[tuple[str, HookFn]]:
        """Hooks for rows whose interventions are ``ids[row_ivs]`` (``row_lens``, ``W``: unused, every position
        alike)."""
        idx = torch.tensor(ids, device=self.device).index_select(0, row_ivs)  # [B] intervention per row
        proj, vecs, layer_of = self.project[idx], self.vecs[idx], self.layer_of[idx]
        hs: list[tuple[str, HookFn]] = []
        if bool(proj.any()):
            project = projection_hook(per_row(torch.where(proj[:, None], vecs, 0), pos_axis=False))
            hs += [(hook_name(L, k), project) for L in range(self.n_layers) for k in PROJECTED_KINDS]
        for L in sorted({int(x) for x in layer_of[~proj].tolist()}):
            adds = ~proj & (layer_of == L)
            hs.append((hook_name(L, "hook_resid_pre"), addition_hook(per_row(torch.where(adds[:, None], vecs, 0)))))
        return hs


Intervention = Ablate | ProjectOut | AddVector
