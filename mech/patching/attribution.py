"""Attribution patching (AtP; Nanda 2022, Syed et al. 2023): every patch estimated at once, checked by exact patching.

For a site with receiver activation ``a_r`` and source activation ``a_s``, AtP estimates the metric change of
patching it as ``(a_s - a_r) . d metric / d a`` with the gradient taken on the unpatched receiver run
(Nanda 2022; Syed et al. 2023). One backward pass gives the gradient at every site, so every head
(``attn.hook_z``), every neuron (``mlp.hook_post``) and every layer component (resid_pre, attn_out, mlp_out)
is estimated from the same two forwards and one backward; a patch of several sites is the sum of its sites.

``method="fast"`` (default) reuses the batched machinery of :mod:`mech.patching`: the reference runs share the
common prefix, and the gradient pass runs only the patched window (the last ``W`` positions) of every pair in
one batch, on top of the receivers' cached prefix K/V. This is exact, not an approximation: the gradient at a
window position flows only through that position and later ones, all of which the window pass contains; the
prefix K/V do not depend on window activations. ``method="naive"`` is the textbook version: per pair, one
source forward, one full receiver forward with gradients and one backward.

Results are :class:`~mech.patching.PatchResult` s with ``method="atp"``: ``raw`` = clean + estimate, so
``normalized``, ``as_array`` and the labels work exactly as for exact sweeps. :func:`verify_against_exact`
runs exact patching on the top patches by ``|AtP|`` and reports the Spearman rank correlation and the top-K
overlap.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mech.engine import Work
from mech.hooks import HookFn, HookPoint, hook_name, hooks, run_with_cache
from mech.patching.exact import patch_sweep
from mech.patching.plan import Metric, Plan, SweepOptions, prepare_sweep, sweep_positions
from mech.patching.reference import Key, engine, reference_runs
from mech.patching.result import PatchResult
from mech.patching.spec import (
    COMPONENT_REGISTRY,
    Patch,
    PatchingError,
    kind_hook,
    layer_patches,
    unit_patches,
)
from mech.stats import jsonable

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from mech.models import LoadedModel


log = logging.getLogger(__name__)


def _contribution(kind: str, diff: Tensor, grad: Tensor) -> Tensor:
    """Per-position linear contribution ``[P, W, F]``: F = the kind's units (heads of z, neurons of mlp_post;
    each summed over its trailing dims) or 1 (a whole vector)."""
    prod = diff.float() * grad.float()
    comp = COMPONENT_REGISTRY[kind] if kind != "resid" else None
    if comp is None or comp.unit is None:
        return prod.sum(-1, keepdim=True)  # [P, W, 1]
    return prod.sum(tuple(range(-comp.trailing_dims, 0))) if comp.trailing_dims else prod  # [P, W, n_units]


def _assemble(plan: Plan, n_patches: int, contrib: Mapping[Key, Tensor], device: torch.device) -> Tensor:
    """Sum each patch's site contributions: ``[n_pairs, n_patches]`` estimates of the metric change."""
    n_pairs = len(plan.neg)
    W = plan.window
    est = torch.zeros(n_pairs, n_patches, device=device)
    # End-aligned sites resolve to the same positions in every pair: one group per (kind, slot, positions).
    same = all(plan.neg[i][j] == plan.neg[0][j] for i in range(n_pairs) for j in range(n_patches))
    pair_sets = [list(range(n_pairs))] if same else [[i] for i in range(n_pairs)]
    for pairs in pair_sets:
        groups: dict[tuple[str, int, tuple[int, ...]], list[tuple[int, tuple[int, ...] | None]]] = {}
        for j, sites in enumerate(plan.neg[pairs[0]]):
            for site, pos in sites:
                groups.setdefault((site.kind, site.slot, pos), []).append((j, site.index))
        p_t = torch.tensor(pairs, device=device)
        for (kind, slot, pos), items in groups.items():
            c = contrib[(kind, slot)].index_select(0, p_t)  # [p, W, F]
            cp = c[:, [W + q for q in pos]].sum(1)  # [p, F]
            single = [(j, idx[0]) for j, idx in items if idx is not None and len(idx) == 1]
            cols = [j for j, _ in single]
            vals = [cp[:, torch.tensor([f for _, f in single], device=device)]] if single else []  # [p, n]
            for j, idx in items:
                if idx is None or len(idx) > 1:
                    cols.append(j)
                    vals.append((cp.sum(-1) if idx is None else cp[:, list(idx)].sum(-1))[:, None])
            if cols:
                v = torch.cat(vals, 1)  # [p, n_cols]
                rows = p_t[:, None].expand_as(v)
                c_t = torch.tensor(cols, device=device)[None, :].expand_as(v)
                est.index_put_((rows.reshape(-1), c_t.reshape(-1)), v.reshape(-1), accumulate=True)
    return est


def _atp_fast(lm: LoadedModel, plan: Plan, metric: Metric, batch_rows: int = 64) -> tuple[Tensor, Tensor, Tensor, Work]:
    eng = engine(lm)
    dev = eng.device
    W = plan.window
    needs: set[Key] = {(s.kind, s.slot) for per_patch in plan.neg for sites in per_patch for s, _ in sites}
    with torch.no_grad():  # not inference_mode: these tensors enter the autograd graph below
        refs, _ = reference_runs(eng, plan.recv, plan.src, W, {0}, needs, metric)
    n_pairs = len(plan.neg)
    r_all = torch.tensor(plan.pair_recv, device=dev)
    s_all = torch.tensor(plan.pair_src, device=dev)
    rem_all = torch.tensor([refs.rem_len[i] for i in plan.pair_recv], device=dev)
    fh_keys = [k for k in sorted(needs) if k[0] != "resid"]
    parts: dict[Key, list[Tensor]] = {k: [] for k in needs}
    for c0 in range(0, n_pairs, batch_rows):
        rows = torch.arange(c0, min(n_pairs, c0 + batch_rows), device=dev)
        r_idx, s_idx, rem_len = r_all[rows], s_all[rows], rem_all[rows]
        pos = refs.n_shared + rem_len[:, None] - W + torch.arange(W, device=dev)[None]  # [P, W]
        rem_valid = None
        if refs.rem is not None:
            rem_valid = torch.arange(refs.rem.slots, device=dev)[None] < (rem_len - W)[:, None]
        acts: dict[Key, Tensor] = {}

        def make(key: Key, acts: dict[Key, Tensor] = acts) -> HookFn:
            def cap(x: Tensor, hook: HookPoint) -> Tensor:
                y = x.clone()  # a graph node the rest of the forward uses: its grad is d metric / d x
                acts[key] = y
                return y

            return cap

        def resid_fn(slot: int, h: Tensor, acts: dict[Key, Tensor] = acts) -> Tensor:
            if ("resid", slot) in needs:
                h = h.clone()
                acts[("resid", slot)] = h
            return h

        fh = [(kind_hook(*k, eng.n_layers), make(k)) for k in fh_keys]
        with torch.enable_grad():
            h0 = refs.resid[0].index_select(0, r_idx).detach().requires_grad_(True)  # [P, W, d_model]
            final = eng.run(
                [(0, h0)], pos, shared=refs.shared, rem=refs.rem, rowmap=r_idx, rem_valid=rem_valid, fwd_hooks=fh,
                resid_fn=resid_fn, out_slot=torch.full((len(rows),), W - 1, device=dev),
            )
            assert final is not None
            m, _ = eng.logits_metric(final, metric, keep_logits=False)
            keys = sorted(acts)
            grads = torch.autograd.grad(m.sum(), [acts[k] for k in keys])  # rows are independent: one backward
        eng.work.backward_calls += 1
        eng.work.backward_layer_tokens += len(rows) * W * eng.n_layers
        with torch.no_grad():
            for k, g in zip(keys, grads, strict=True):
                diff = refs.acts[k].index_select(0, s_idx) - acts[k].detach()
                parts[k].append(_contribution(k[0], diff, g))
    with torch.no_grad():
        contrib = {k: torch.cat(v) for k, v in parts.items()}
        est = _assemble(plan, len(plan.neg[0]), contrib, dev)
    r_idx, s_idx = r_all, s_all
    clean = refs.recv_metric.index_select(0, r_idx)
    source = refs.src_metric.index_select(0, s_idx)
    return est, clean, source, eng.work


def _atp_naive(lm: LoadedModel, plan: Plan, metric: Metric, batch_rows: int = 0) -> tuple[Tensor, Tensor, Tensor, Work]:
    model, dev = lm.model, lm.input_device
    n_layers = lm.shape.n_layers
    W = plan.window
    work = Work()
    needs: set[Key] = {(s.kind, s.slot) for per_patch in plan.neg for sites in per_patch for s, _ in sites}
    keys = sorted(needs)
    names = {k: kind_hook(*k, n_layers) for k in keys}
    n_pairs = len(plan.neg)
    per_pair: list[dict[Key, Tensor]] = []
    clean = torch.empty(n_pairs, device=dev)
    source = torch.empty(n_pairs, device=dev)
    for i in range(n_pairs):
        rcv = torch.tensor([plan.recv[plan.pair_recv[i]]], device=dev)
        src = torch.tensor([plan.src[plan.pair_src[i]]], device=dev)
        with torch.no_grad():
            out, cache = run_with_cache(
                model, src, names_filter=sorted(set(names.values())), positions=slice(-W, None),
                logits_to_keep=1, use_cache=False,
            )
            source[i] = metric(out.logits[:, -1])[0]
        acts: dict[str, Tensor] = {}

        def cap(x: Tensor, hook: HookPoint, acts: dict[str, Tensor] = acts) -> Tensor:
            # layer 0's input becomes the leaf; later activations are graph nodes the forward goes on using
            y = x.detach().requires_grad_(True) if not x.requires_grad else x.clone()
            acts[hook.name] = y
            return y

        fwd = [(n, cap) for n in sorted(set(names.values()) | {hook_name(0, "hook_resid_pre")})]
        with torch.enable_grad(), hooks(model, fwd):
            logits = model(input_ids=rcv, logits_to_keep=1, use_cache=False).logits[:, -1]
            m = metric(logits)
            uniq = sorted(set(names.values()))
            grads = dict(zip(uniq, torch.autograd.grad(m.sum(), [acts[n] for n in uniq]), strict=True))
        clean[i] = m.detach()[0]
        work.full_forwards += 2
        work.full_rows += 2
        work.full_tokens += rcv.shape[1] + src.shape[1]
        work.layer_tokens += (rcv.shape[1] + src.shape[1]) * n_layers
        work.backward_layer_tokens += rcv.shape[1] * n_layers
        work.unembed_rows += 2
        work.backward_calls += 1
        contrib = {}
        for k in keys:
            n = names[k]
            diff = cache[n] - acts[n].detach()[:, -W:]
            contrib[k] = _contribution(k[0], diff, grads[n][:, -W:])
        per_pair.append(contrib)
    stacked = {k: torch.cat([c[k] for c in per_pair]) for k in keys}
    est = _assemble(plan, len(plan.neg[0]), stacked, dev)
    return est, clean, source, work


def attribution_sweep(
    lm: LoadedModel,
    pairs: Any,
    patches: Sequence[Patch],
    *,
    batch_rows: int = 64,
    kind: str = "custom",
    **options: Unpack[SweepOptions],
) -> PatchResult:
    """AtP estimates of ``patches`` (same arguments as :func:`mech.patching.patch_sweep`): a PatchResult with
    ``method="atp"`` whose ``raw`` is the clean metric plus the linear estimate. ``batch_rows``: pairs per
    gradient pass (fast path; one backward per chunk). ``method="auto"``: fast, or naive (hooks, one full
    forward and backward per pair) on a model sharded or offloaded by accelerate."""
    sw = prepare_sweep(lm, pairs, patches, **options)
    sw.start()
    est, clean, source, work = (_atp_fast if sw.method == "fast" else _atp_naive)(lm, sw.plan, sw.metric, batch_rows)
    return sw.result(lm, est, clean, source, work, kind=kind, estimate=True)


def attribution_patching(
    lm: LoadedModel,
    pairs: Any,
    *,
    components: Sequence[str] = ("z", "mlp_post", "resid_pre", "attn_out", "mlp_out"),
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    per_position: bool = False,
    together: bool = True,
    **kw: Any,
) -> dict[str, PatchResult]:
    """AtP of every head, every neuron and every layer component at once (one gradient pass).

    Returns ``{"head": ..., "neuron": ..., "layer": ...}`` (those asked for by ``components``), each labelled
    exactly like :func:`~mech.patching.head_sweep` / ``neuron_sweep`` / ``layer_sweep`` with the same
    ``positions``/``per_position``/``together``, so :func:`verify_against_exact` can rerun any of them exactly.
    Keywords go to :func:`attribution_sweep` (``direction``, ``refusal_ids``/``metric``, ``method``, ...).
    """
    shape = lm.shape
    pos = sweep_positions(lm, positions, kw.get("system"))
    unknown = set(components) - set(COMPONENT_REGISTRY)
    if unknown:
        raise PatchingError(f"unknown component(s) {sorted(unknown)}; use {', '.join(COMPONENT_REGISTRY)}")
    layer_range = range(shape.n_layers) if layers is None else layers
    groups: dict[str, list[Patch]] = {}
    for c in COMPONENT_REGISTRY.values():  # unit kinds, one group each under their unit's name ("head", "neuron")
        if c.unit is not None and c.name in components:
            units = [(L, u) for L in layer_range for u in range(c.features(shape))]
            groups[c.unit] = unit_patches(c.name, units, pos, per_position, together)
    layer_comps = [c for c in components if COMPONENT_REGISTRY[c].unit is None]
    if layer_comps:
        groups["layer"] = layer_patches(shape.n_layers, layer_comps, layers, pos, per_position, together)
    everything = [p for ps in groups.values() for p in ps]
    res = attribution_sweep(lm, pairs, everything, kind="atp", **kw)
    out, start = {}, 0
    for name, ps in groups.items():
        sub = res.subset(range(start, start + len(ps)))
        sub.kind = name
        out[name] = sub
        start += len(ps)
    return out


# ---------------------------------------------------------------------------------------------- verify


@dataclass
class Verification:
    """How well AtP ranks patches, judged by exact patching.

    ``spearman``/``p_value``: rank correlation (scipy.stats.spearmanr) of the mean normalized AtP and exact
    effects over the top ``k`` patches by ``|AtP|``. ``overlap``: share of the top ``k`` by ``|AtP|`` that are
    also in the top ``k`` by ``|exact|`` — among all patches when a full exact result was given
    (``overlap_scope="all"``), else among the ``n_candidates`` exact-patched candidates.
    """

    k: int
    spearman: float
    p_value: float
    overlap: float
    overlap_scope: str
    labels: list[dict[str, Any]]
    atp: list[float]
    exact: list[float]
    spearman_candidates: float = math.nan
    exact_result: PatchResult | None = field(default=None, repr=False)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return jsonable({f.name: getattr(self, f.name) for f in fields(self) if f.name != "exact_result"})


def _spearman(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import spearmanr

    ok = ~(np.isnan(a) | np.isnan(b))
    if ok.sum() < 3:
        return math.nan, math.nan
    r = spearmanr(a[ok], b[ok])
    return float(r.statistic), float(r.pvalue)


def verify_against_exact(
    lm: LoadedModel,
    pairs: Any,
    atp: PatchResult,
    *,
    k: int = 20,
    n_candidates: int | None = None,
    exact: PatchResult | None = None,
    **sweep_kw: Any,
) -> Verification:
    """Exact-patch the top patches by ``|AtP|`` and compare rankings.

    Without ``exact``: runs :func:`~mech.patching.patch_sweep` on the top ``n_candidates`` (default ``2k``)
    patches by ``|AtP|`` (same pairs, direction and refusal ids as ``atp``; ``sweep_kw`` go to patch_sweep).
    With ``exact`` (a full exact sweep over the same patches, same order), nothing is recomputed.
    """
    t0 = time.perf_counter()
    m = atp.mean
    order = np.argsort(-np.nan_to_num(np.abs(m), nan=-np.inf), kind="stable")
    k = min(k, len(order))
    top = order[:k]
    if exact is not None:
        if exact.n_patches != atp.n_patches:
            raise PatchingError(f"exact has {exact.n_patches} patches, AtP {atp.n_patches}: pass the same sweep")
        ex_mean = exact.mean
        scope = "all"
        cand = order
        ex_res = exact
    else:
        n_c = max(k, n_candidates or 2 * k)
        cand = order[:n_c]
        kw = dict(sweep_kw)
        if "metric" not in kw and "refusal_ids" not in kw:
            if atp.meta.get("refusal_ids") is None:
                raise PatchingError("the AtP result used a custom metric: pass the same metric= to verify")
            kw["refusal_ids"] = atp.meta["refusal_ids"]
        kw.setdefault("direction", atp.direction)
        ex_res = patch_sweep(lm, pairs, [atp.patches[j] for j in cand], kind=atp.kind, **kw)
        ex_mean = np.full(atp.n_patches, np.nan)
        ex_mean[cand] = ex_res.mean
        scope = "candidates"
    rho, p = _spearman(m[top], ex_mean[top])
    rho_c, _ = _spearman(m[cand], ex_mean[cand])
    pool = cand if scope == "candidates" else np.arange(atp.n_patches)
    ex_order = pool[np.argsort(-np.nan_to_num(np.abs(ex_mean[pool]), nan=-np.inf), kind="stable")]
    overlap = len(set(top.tolist()) & set(ex_order[:k].tolist())) / max(k, 1)
    return Verification(
        k=k,
        spearman=rho,
        p_value=p,
        overlap=overlap,
        overlap_scope=scope,
        labels=[atp.labels[j] for j in top],
        atp=[float(m[j]) for j in top],
        exact=[float(ex_mean[j]) for j in top],
        spearman_candidates=rho_c,
        exact_result=ex_res,
        seconds=time.perf_counter() - t0,
    )

