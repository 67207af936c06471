"""The refusal direction (Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction").

1. **Candidates** (:func:`diff_in_means`): for every layer ``L`` and every post-instruction position ``p``
   (end-aligned, e.g. the 5 template tokens ``<|im_end|>\\n<|im_start|>assistant\\n``), the difference between the
   mean ``blocks.L.hook_resid_pre`` of harmful and of harmless prompts of a *train* split, accumulated in float64
   on the CPU: ``[n_layers, n_pos, d_model]``.
2. **Selection** (:func:`select_direction`) on a *validation* split, Arditi's criteria: for each candidate
   compute the mean harmful refusal score under directional ablation (``bypass``), the mean harmless refusal
   score under activation addition (``induce``) and the mean harmless first-token KL under directional ablation
   (``kl``); discard candidates with ``induce <= induce_threshold`` (0), ``kl > kl_threshold`` (0.1) or a layer in
   the last ``prune_last_fraction`` (20 %) of layers (``layer >= int(n_layers * (1 - 0.2))``); select the lowest
   ``bypass``. If every candidate is discarded, the lowest ``bypass`` among the unpruned layers is returned with
   ``passed_filters=False`` (never silently).
3. **Interventions** (context managers; nothing is ever written to disk):

   * :func:`directional_ablation` — project the unit direction ``r`` out of ``resid_pre`` of every layer and of
     ``attn_out`` and ``mlp_out`` of every block: ``x <- x - (x . r) r`` (:class:`mech.interventions.ProjectOut`).
   * :func:`activation_addition` — add ``coeff *`` the (unnormalized) diff-in-means vector to ``resid_pre`` of
     the selected layer at every position (:class:`mech.interventions.AddVector`).
   * :func:`orthogonalized_weights` — the weight edit equivalent to directional ablation, **in memory only**:
     the rows of ``embed_tokens`` and the output side of every ``o_proj`` and ``down_proj`` (weights and any
     bias) are orthogonalized against ``r``: ``W <- (I - r r^T) W``. The edited tensors are *new* parameters
     swapped into the modules; the original parameter objects are never modified and are put back on exit,
     even on error, so the weights are restored bit-exactly. A tied ``lm_head`` keeps the original embedding
     (directional ablation does not touch the unembedding). Not defined for archs that normalize a block's
     output before the residual add (Gemma-2/3 "sandwich" norms) nor for quantized weights: both raise.

:func:`evaluate_direction` measures the three with :func:`mech.evaluation.evaluate_intervention` (refusal scores,
KL, CE, benign-but-alarming set, optional generations).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from mech.architectures import architecture_of
from mech.chat import post_instruction_positions
from mech.evaluation import Baseline, InterventionResult, evaluate_intervention
from mech.hooks import decoder_layers, hook_name, run_with_cache
from mech.interventions import AddVector, ProjectOut
from mech.scoring import refusal_scores
from mech.set_scores import direction_set_scores  # every candidate as rows of one batch, clean run once
from mech.stats import fields_dict, jsonable
from mech.vectors import DirectionError

if TYPE_CHECKING:
    from mech.models import LoadedModel

DirectionIntervention = Literal["directional_ablation", "activation_addition", "weight_orthogonalization"]

__all__ = [
    "CandidateScore",
    "DiffInMeans",
    "DirectionIntervention",
    "DirectionSelection",
    "activation_addition",
    "diff_in_means",
    "directional_ablation",
    "evaluate_direction",
    "orthogonalized_weights",
    "select_direction",
]


# --------------------------------------------------------------------------------------- diff in means


@dataclass
class DiffInMeans:
    """Candidate refusal directions: mean(harmful) - mean(harmless) of ``resid_pre``.

    ``candidates``: ``[len(layers), len(positions), d_model]`` float64 on the CPU; row ``i`` is layer
    ``layers[i]``, column ``j`` the end-aligned position ``positions[j]``.
    """

    candidates: Tensor
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    n_harmful: int
    n_harmless: int

    def vector(self, layer: int, pos: int) -> Tensor:
        """The unnormalized diff-in-means vector ``[d_model]`` (float64) at ``(layer, pos)``."""
        return self.candidates[self.layers.index(layer), self.positions.index(pos)]

    def norms(self) -> Tensor:
        """``[len(layers), len(positions)]`` L2 norms."""
        return self.candidates.norm(dim=-1)


@torch.inference_mode()
def _mean_resid(lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int], positions: Sequence[int], bs: int) -> Tensor:
    names = [hook_name(L, "hook_resid_pre") for L in layers]
    total = torch.zeros(len(layers), len(positions), lm.shape.d_model, dtype=torch.float64)
    for i in range(0, len(prompts), bs):
        enc = lm.batch(list(prompts[i : i + bs]))
        if int(enc["attention_mask"].sum(-1).min()) < len(positions):
            raise ValueError("diff_in_means: a prompt is shorter than the requested end-aligned positions")
        _, cache = run_with_cache(lm, enc, names, positions=list(positions), to_cpu=True, stop_after_last=True,
                                  use_cache=False)
        for j, n in enumerate(names):
            total[j] += cache[n].double().sum(0)  # [n_pos, d_model]
    return total / len(prompts)


def diff_in_means(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> DiffInMeans:
    """Candidate directions at ``resid_pre`` of ``layers`` (default all) and end-aligned ``positions``.

    ``positions`` default: :func:`post_instruction_positions`. The forward stops after the last requested layer.
    """
    if not harmful or not harmless:
        raise ValueError("diff_in_means needs harmful and harmless prompts")
    positions = tuple(positions) if positions is not None else post_instruction_positions(lm)
    if any(p >= 0 for p in positions):
        raise ValueError(f"positions are end-aligned (negative) indices, got {positions}")
    layers = tuple(range(lm.shape.n_layers)) if layers is None else tuple(layers)
    diff = _mean_resid(lm, harmful, layers, positions, batch_size) - _mean_resid(lm, harmless, layers, positions, batch_size)
    return DiffInMeans(diff, layers, positions, len(harmful), len(harmless))


# -------------------------------------------------------------------------------------- interventions


def _unit(direction: Tensor) -> Tensor:
    r = direction.detach().double().cpu().flatten()
    n = r.norm()
    if not torch.isfinite(n) or n == 0:
        raise DirectionError("the direction must be a finite non-zero vector")
    return r / n


def directional_ablation(lm: LoadedModel, direction: Tensor) -> AbstractContextManager[object]:
    """Project ``direction`` (normalized here) out of ``resid_pre`` of every layer and ``attn_out`` /
    ``mlp_out`` of every block, at every position, for the duration of the block: the
    :class:`~mech.interventions.ProjectOut` value applied."""
    return ProjectOut.of(lm, direction).apply(lm)


def activation_addition(lm: LoadedModel, vector: Tensor, layer: int, coeff: float = 1.0) -> AbstractContextManager[object]:
    """Add ``coeff * vector`` (not normalized) to ``blocks.{layer}.hook_resid_pre`` at every position: the
    :class:`~mech.interventions.AddVector` value applied."""
    return AddVector.of(lm, vector, layer, coeff).apply(lm)


def _orth_targets(lm: LoadedModel) -> list[tuple[nn.Module, str, str]]:
    """(module, parameter name, how) for every parameter the weight edit touches: rows of the embedding
    (``how="rows"``: each row is a d_model vector) and the output side of o_proj/down_proj (``"out"``)."""
    model = lm.model
    out: list[tuple[nn.Module, str, str]] = [(model.get_input_embeddings(), "weight", "rows")]
    arch = architecture_of(model)
    block: Any  # a decoder layer: attention's output projection (o_proj), MLP's (down_proj)
    for L, block in enumerate(decoder_layers(model)):
        if any(hasattr(block, n) for n in ("post_feedforward_layernorm", "pre_feedforward_layernorm")):
            raise NotImplementedError(
                f"layer {L} normalizes block outputs before the residual add (sandwich norms): weight "
                "orthogonalization is not equivalent to directional ablation there; use directional_ablation"
            )
        for lin in (arch.attn_out_proj(block), arch.mlp_out_proj(block)):
            out.append((lin, "weight", "out"))
            if getattr(lin, "bias", None) is not None:
                out.append((lin, "bias", "rows"))
    return out


def _orthogonalize(w: Tensor, r: Tensor, how: str, chunk: int = 8192) -> Tensor:
    """A new tensor: ``w`` with ``r`` projected out, computed in float64 (in row chunks), cast to ``w.dtype``.

    ``rows``: ``w`` is ``[..., d_model]`` (embedding rows, a bias); ``out``: ``w`` is ``[d_model, d_in]``, the
    output side along dim 0 (``W <- (I - r r^T) W``).
    """
    rr = r.to(w.device)
    if how == "out":
        wd = w.double()
        return (wd - rr[:, None] * (rr @ wd)[None, :]).to(w.dtype)
    if w.dim() == 1:
        wd = w.double()
        return (wd - (wd @ rr) * rr).to(w.dtype)
    new = torch.empty_like(w)
    for i in range(0, w.shape[0], chunk):
        wd = w[i : i + chunk].double()  # [chunk, d_model]
        new[i : i + chunk] = (wd - (wd @ rr)[:, None] * rr).to(w.dtype)
    return new


@contextmanager
def orthogonalized_weights(lm: LoadedModel, direction: Tensor) -> Iterator[None]:
    """Orthogonalize the weights that write to the residual stream against ``direction``, in memory only.

    ``embed_tokens`` rows and ``o_proj`` / ``down_proj`` output columns (and biases) get ``(I - r r^T)``
    (computed in float64, cast back). New parameter tensors are swapped in; the original parameter objects
    are untouched and swapped back on exit, also on error. Equivalent to :func:`directional_ablation`.
    """
    r = ProjectOut.of(lm, direction).direction
    targets = _orth_targets(lm)
    for module, name, _ in targets:
        p = getattr(module, name)
        if getattr(p, "quant_state", None) is not None or not p.dtype.is_floating_point:
            raise NotImplementedError("weight orthogonalization needs unquantized weights; use directional_ablation")
        if p.device.type == "meta":
            raise NotImplementedError("weight orthogonalization needs the weights in memory, but this model is "
                                      "offloaded (accelerate); use directional_ablation, which works on hooks")
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module, name, how in targets:
            orig = getattr(module, name)
            swapped.append((module, name, orig))
            setattr(module, name, nn.Parameter(_orthogonalize(orig.detach(), r, how), requires_grad=False))
        yield
    finally:
        for module, name, orig in reversed(swapped):
            setattr(module, name, orig)


# ------------------------------------------------------------------------------------------ selection


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's validation scores and whether it passed the filters (``reasons`` says why not)."""

    layer: int
    pos: int
    norm: float
    bypass: float  # mean harmful refusal score under directional ablation (lower is better)
    induce: float  # mean harmless refusal score under activation addition
    kl: float  # mean harmless first-token KL(base || ablated)
    passed: bool
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


@dataclass
class DirectionSelection:
    """The selected refusal direction and every candidate's scores."""

    layer: int
    pos: int
    direction: Tensor  # [d_model] float64 unit vector
    vector: Tensor  # [d_model] float64 unnormalized diff-in-means (for activation addition)
    norm: float
    passed_filters: bool
    selected: CandidateScore
    candidates: tuple[CandidateScore, ...]
    baseline_harmful: float  # mean harmful refusal score on the validation split, no intervention
    baseline_harmless: float
    criteria: dict[str, Any] = field(default_factory=dict)
    n_layers: int = 0
    positions: tuple[int, ...] = ()

    def grid(self, metric: Literal["bypass", "induce", "kl", "norm"] = "bypass") -> np.ndarray:
        """``[n_layers, n_pos]`` array of a candidate metric (bypass | induce | kl | norm); NaN where unscored."""
        g = np.full((self.n_layers, len(self.positions)), np.nan)
        for c in self.candidates:
            g[c.layer, self.positions.index(c.pos)] = getattr(c, metric)
        return g

    def to_dict(self, include_vectors: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "layer": self.layer, "pos": self.pos, "norm": self.norm, "passed_filters": self.passed_filters,
            "selected": self.selected, "candidates": list(self.candidates), "baseline_harmful": self.baseline_harmful,
            "baseline_harmless": self.baseline_harmless, "criteria": self.criteria, "n_layers": self.n_layers,
            "positions": list(self.positions),
        }
        if include_vectors:
            d["direction"] = self.direction.tolist()
            d["vector"] = self.vector.tolist()
        return jsonable(d)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)


@torch.inference_mode()
def select_direction(
    lm: LoadedModel,
    dim: DiffInMeans,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    refusal_ids: Sequence[int],
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    induce_threshold: float = 0.0,
    kl_threshold: float = 0.1,
    prune_last_fraction: float = 0.2,
    coeff: float = 1.0,
    batch_size: int = 16,
) -> DirectionSelection:
    """Score candidates of ``dim`` (optionally only ``layers`` × ``positions``) on a validation split and
    select one by Arditi's criteria (see the module docstring). Every candidate's ablation (harmful and harmless
    prompts, with the harmless first-token KL) and addition are rows of batched partial forwards
    (:func:`mech.set_scores.direction_set_scores`: the clean run once, additions from their own layer), equal to
    one hook-based forward per candidate within float32 round-off. ``batch_size``: at least this many rows per
    partial forward (128 by default).

    The lowest bypass score among candidates that pass every filter wins. If none does, the induce filter is
    relaxed first (the KL filter guards side effects), then the KL filter; ``passed_filters`` says so."""
    ids = list(refusal_ids)
    hv, lv = list(harmful_val), list(harmless_val)
    nh = len(hv)
    layers = dim.layers if layers is None else tuple(layers)
    positions = dim.positions if positions is None else tuple(positions)
    n_layers = lm.shape.n_layers
    max_layer = int(n_layers * (1.0 - prune_last_fraction))

    cands = [(L, p, dim.vector(L, p)) for L in layers for p in positions]
    # e.g. layer 0 at a template token: the same embedding on both sides gives a zero vector, not scored
    live = [i for i, (_, _, v) in enumerate(cands) if float(v.norm()) > 0]
    rows = max(batch_size, 128)
    if live:
        abl = direction_set_scores(lm, hv + lv, ids, [("ablate", cands[i][2]) for i in live], kl=True, max_rows=rows)
        add = direction_set_scores(lm, lv, ids, [("add", coeff * cands[i][2], cands[i][0]) for i in live],
                                   max_rows=rows)
        base_scores = abl.clean
    else:
        base_scores = refusal_scores(lm, hv + lv, ids, [None], batch_size=batch_size)[0]
    at = {i: j for j, i in enumerate(live)}
    scored: list[CandidateScore] = []
    for i, (L, p, v) in enumerate(cands):
        if i not in at:
            nan = float("nan")
            scored.append(CandidateScore(L, p, 0.0, nan, nan, nan, False, ("zero vector",)))
            continue
        j = at[i]
        bypass = float(abl.scores[j, :nh].double().mean())
        assert abl.kl is not None
        kl = float(abl.kl[j, nh:].double().mean())
        induce = float(add.scores[j].double().mean())
        reasons = []
        if not np.isfinite(bypass):
            reasons.append("bypass score is not finite")
        if not induce > induce_threshold:
            reasons.append(f"addition does not induce refusal (induce {induce:.3g} <= {induce_threshold})")
        if not kl <= kl_threshold:
            reasons.append(f"harmless KL {kl:.3g} > {kl_threshold}")
        if L >= max_layer:
            reasons.append(f"layer {L} in the last {prune_last_fraction:.0%} of layers (>= {max_layer})")
        scored.append(CandidateScore(L, p, float(v.norm()), bypass, induce, kl, not reasons, tuple(reasons)))
    if not scored:
        raise ValueError("select_direction: no candidate to score (empty layers or positions)")
    passed = [c for c in scored if c.passed]
    # None passes every filter: relax the induce filter first and keep the side-effect (KL) and depth filters,
    # then keep depth only, then take any candidate.
    in_depth = [c for c in scored if c.layer < max_layer and np.isfinite(c.bypass)]
    pool = passed or [c for c in in_depth if c.kl <= kl_threshold] or in_depth or scored
    best = min(pool, key=lambda c: c.bypass)
    vec = dim.vector(best.layer, best.pos).clone()
    return DirectionSelection(
        layer=best.layer, pos=best.pos, direction=_unit(vec), vector=vec, norm=float(vec.norm()),
        passed_filters=bool(passed), selected=best, candidates=tuple(scored),
        baseline_harmful=float(base_scores[:nh].double().mean()), baseline_harmless=float(base_scores[nh:].double().mean()),
        criteria={"induce_threshold": induce_threshold, "kl_threshold": kl_threshold,
                  "prune_last_fraction": prune_last_fraction, "max_layer_exclusive": max_layer, "coeff": coeff,
                  "n_harmful_val": nh, "n_harmless_val": len(lv), "n_harmful_train": dim.n_harmful,
                  "n_harmless_train": dim.n_harmless},
        n_layers=n_layers, positions=tuple(dim.positions),
    )


# ----------------------------------------------------------------------------------------- evaluation


def evaluate_direction(
    lm: LoadedModel,
    baseline: Baseline,
    selection: DirectionSelection,
    coeff: float = 1.0,
    which: Sequence[DirectionIntervention] = ("directional_ablation", "activation_addition", "weight_orthogonalization"),
) -> dict[str, InterventionResult]:
    """Measure the selected direction's interventions against ``baseline`` (held-out prompts)."""
    target = {"layer": selection.layer, "pos": selection.pos, "norm": selection.norm,
              "passed_filters": selection.passed_filters}
    makers: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
        "directional_ablation": (lambda: directional_ablation(lm, selection.direction), dict(target)),
        "activation_addition": (
            lambda: activation_addition(lm, selection.vector, selection.layer, coeff), dict(target, coeff=coeff)
        ),
        "weight_orthogonalization": (lambda: orthogonalized_weights(lm, selection.direction), dict(target)),
    }
    out: dict[str, InterventionResult] = {}
    for kind in which:
        if kind not in makers:
            raise ValueError(f"unknown direction intervention {kind!r}; use one of {', '.join(makers)}")
        make, tgt = makers[kind]
        out[kind] = evaluate_intervention(lm, baseline, make, name=f"{kind}@L{selection.layer}p{selection.pos}",
                                          kind=kind, target=tgt)
    return out
