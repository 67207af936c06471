"""Exact activation patching: every patch in every pair, by the batched fast path or the naive reference loop.

``method="fast"`` (the default), on :class:`~mech.engine.Engine`:

1. the reference runs (:func:`~mech.patching.reference.reference_runs`) run each receiver and source once, the
   prompts' common prefix once;
2. each patched run starts at its first patched layer from the receiver's cached residual stream and runs
   only the patched window (the last ``W`` positions) on top of the receiver's cached prefix K/V;
3. patches are rows of one batch; rows join the batch at their first patched layer (a staircase), so one pass
   over the layers serves every patch of a chunk;
4. the unembedding runs at the last position only, under ``torch.inference_mode``, with one host sync per sweep.

``method="naive"``: one full HF forward per (pair, patch) with hooks doing the replacement; tests check the two
agree, and benchmarks use it as the baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mech.engine import Engine, Work
from mech.hooks import HookFn, HookPoint, hook_name, hooks, run_with_cache
from mech.patching.plan import Metric, Plan, SweepOptions, prepare_sweep, sweep_positions
from mech.patching.reference import engine, reference_runs
from mech.patching.result import PatchResult
from mech.patching.spec import (
    COMPONENT_REGISTRY,
    LAYER_COMPONENTS,
    Patch,
    Site,
    head_patches,
    kind_hook,
    layer_patches,
    neuron_patches,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from mech.models import LoadedModel


@dataclass
class _Row:
    pair: int
    patch: int
    window: int
    start: int
    sites: list[tuple[Site, tuple[int, ...]]]


def _rows(plan: Plan, n_layers: int) -> list[_Row]:
    rows = []
    for i, per_patch in enumerate(plan.neg):
        for j, sites in enumerate(per_patch):
            w = max((-min(pos) for _, pos in sites), default=1)
            start = min((s.slot for s, _ in sites), default=n_layers)
            rows.append(_Row(i, j, w, start, sites))
    rows.sort(key=lambda r: (r.window, r.start, r.pair, r.patch))
    return rows


def _default_chunk_rows(eng: Engine, window: int) -> int:
    """Rows per patched forward: about 2048 window tokens (bounded MLP activations), at least 8 rows."""
    return max(8, 2048 // max(window, 1))


def _fast_sweep(
    lm: LoadedModel,
    plan: Plan,
    metric: Metric,
    batch_rows: int | None,
    progress: bool | None,
    keep_logits: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Work]:
    """The batched exact sweep; returns device tensors raw [n_pairs, n_patches], clean, source, logits, work."""
    eng = engine(lm)
    dev, n_layers = eng.device, eng.n_layers
    n_pairs, n_patches = len(plan.neg), len(plan.neg[0]) if plan.neg else 0
    rows = _rows(plan, n_layers)
    resid_slots = {r.start for r in rows}
    src_needs = {(s.kind, s.slot) for r in rows for s, _ in r.sites}
    refs, _ = reference_runs(eng, plan.recv, plan.src, plan.window, resid_slots, src_needs, metric)
    W_max = plan.window
    size = batch_rows or _default_chunk_rows(eng, W_max)
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    out_vals: list[Tensor] = []
    out_idx: list[int] = []
    out_logits: list[Tensor] = []
    show = progress if progress is not None else len(chunks) >= 8
    for chunk in tqdm(chunks, desc="patching", disable=not show, leave=False):
        chunk = sorted(chunk, key=lambda r: r.start)  # staircase: rows join in start order
        w = max(r.window for r in chunk)
        B = len(chunk)
        r_idx = torch.tensor([plan.pair_recv[r.pair] for r in chunk], device=dev)
        s_idx = torch.tensor([plan.pair_src[r.pair] for r in chunk], device=dev)
        rem_len = torch.tensor([refs.rem_len[plan.pair_recv[r.pair]] for r in chunk], device=dev)
        pos = refs.n_shared + rem_len[:, None] - w + torch.arange(w, device=dev)[None]  # [B, w]
        rem_valid = None
        if refs.rem is not None:
            R = refs.rem.slots
            rem_valid = torch.arange(R, device=dev)[None] < (rem_len - w)[:, None]  # [B, R]
        joins = []
        for start in sorted({r.start for r in chunk}):
            sel = [b for b, r in enumerate(chunk) if r.start == start]
            sel_t = torch.tensor(sel, device=dev)
            joins.append((start, refs.resid[start].index_select(0, r_idx[sel_t])[:, W_max - w :]))
        # interventions grouped by (kind, slot): rows, mask and source values
        groups: dict[tuple[str, int], list[tuple[int, Site, tuple[int, ...]]]] = {}
        for b, r in enumerate(chunk):
            for site, p in r.sites:
                groups.setdefault((site.kind, site.slot), []).append((b, site, p))
        interventions: dict[tuple[str, int], tuple[Tensor, Tensor, Tensor]] = {}
        for key, items in groups.items():
            kind, slot = key
            brows = sorted({b for b, _, _ in items})
            local = {b: i for i, b in enumerate(brows)}
            comp = COMPONENT_REGISTRY[kind] if kind != "resid" else None
            nf = comp.features(lm.shape) if comp is not None else 1
            m = torch.zeros(len(brows), w, nf, dtype=torch.bool)  # per row: OR over its sites of pos x features
            for b, site, p in items:
                row_pm = torch.zeros(w, dtype=torch.bool)
                row_pm[[w + q for q in p]] = True
                row_f = torch.ones(nf, dtype=torch.bool)
                if site.index is not None:
                    row_f = torch.zeros(nf, dtype=torch.bool)
                    row_f[list(site.index)] = True
                m[local[b]] |= row_pm[:, None] & row_f[None, :]
            trailing = comp.trailing_dims if comp is not None else 0
            mask = m.view(*m.shape, *[1] * trailing)  # z: [n, w, H, 1]; mlp_post: [n, w, d_mlp]; else [n, w, 1]
            rows_t = torch.tensor(brows, device=dev)
            src_vals = refs.acts[key].index_select(0, s_idx[rows_t])[:, W_max - w :]
            interventions[key] = (rows_t, mask.to(dev), src_vals)

        def apply(x: Tensor, iv: tuple[Tensor, Tensor, Tensor]) -> Tensor:
            rows_t, mask, vals = iv
            return x.index_put((rows_t,), torch.where(mask, vals, x.index_select(0, rows_t)))

        def make(iv: tuple[Tensor, Tensor, Tensor]) -> HookFn:
            return lambda x, hook: apply(x, iv)

        fh = [(kind_hook(k, s, n_layers), make(iv)) for (k, s), iv in interventions.items() if k != "resid"]
        resid_iv = {s: iv for (k, s), iv in interventions.items() if k == "resid"}

        def resid_fn(slot: int, h: Tensor, resid_iv: dict = resid_iv) -> Tensor:
            return apply(h, resid_iv[slot]) if slot in resid_iv else h

        final = eng.run(
            joins, pos, shared=refs.shared, rem=refs.rem, rowmap=r_idx, rem_valid=rem_valid, fwd_hooks=fh,
            resid_fn=resid_fn, out_slot=torch.full((B,), w - 1, device=dev),
        )
        assert final is not None
        vals, lg = eng.logits_metric(final, metric, keep_logits)
        out_vals.append(vals)
        out_idx += [r.pair * n_patches + r.patch for r in chunk]
        if lg is not None:
            out_logits.append(lg)
    flat = torch.empty(n_pairs * n_patches, device=dev)
    if out_vals:
        flat[torch.tensor(out_idx, device=dev)] = torch.cat(out_vals)
    raw = flat.view(n_pairs, n_patches)
    clean = refs.recv_metric[torch.tensor(plan.pair_recv, device=dev)]
    source = refs.src_metric[torch.tensor(plan.pair_src, device=dev)]
    logits = None
    if keep_logits:
        logits = torch.empty(n_pairs * n_patches, lm.shape.d_vocab if not out_logits else out_logits[0].shape[-1])
        if out_logits:
            logits[torch.tensor(out_idx)] = torch.cat(out_logits).cpu()
        logits = logits.view(n_pairs, n_patches, -1)
    return raw, clean, source, logits, eng.work


# ------------------------------------------------------------------------------------------- naive path


def _site_hook(site: Site, rcv_pos: list[int], src_act: Tensor, src_pos: list[int]) -> HookFn:
    """Replace ``site``'s activation at receiver positions by the source run's (full-sequence cache)."""
    rp = torch.tensor(rcv_pos, device=src_act.device)
    sp = torch.tensor(src_pos, device=src_act.device)

    def fn(x: Tensor, hook: HookPoint) -> Tensor:
        y = x.clone()
        if site.index is None:
            y[:, rp.to(y.device)] = src_act[:, sp].to(y.device, y.dtype)
        else:
            ix = torch.tensor(site.index, device=src_act.device)
            y[:, rp.to(y.device)[:, None], ix.to(y.device)[None, :]] = src_act[:, sp[:, None], ix[None, :]].to(y.device, y.dtype)
        return y

    return fn


def _hf_name(site: Site) -> str:
    return hook_name(site.layer, site.spec.hook)


def _naive_sweep(
    lm: LoadedModel, plan: Plan, metric: Metric, progress: bool | None, keep_logits: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Work]:
    """One full HF forward per (pair, patch), hooks doing the replacement: the reference implementation."""
    model, dev = lm.model, lm.input_device
    work = Work()
    n_pairs, n_patches = len(plan.neg), len(plan.neg[0]) if plan.neg else 0
    n_layers = lm.shape.n_layers
    raw = torch.empty(n_pairs, n_patches, device=dev)
    clean = torch.empty(n_pairs, device=dev)
    source = torch.empty(n_pairs, device=dev)
    logits_all = torch.empty(n_pairs, n_patches, lm.shape.d_vocab) if keep_logits else None

    def forward(ids: Tensor, fwd: list[tuple[str, HookFn]]) -> Tensor:
        with hooks(model, fwd):
            out = model(input_ids=ids, logits_to_keep=1, use_cache=False)
        work.full_forwards += 1
        work.full_rows += 1
        work.full_tokens += ids.shape[1]
        work.layer_tokens += ids.shape[1] * n_layers
        work.unembed_rows += 1
        return out.logits[:, -1]

    total = n_pairs * n_patches
    bar = tqdm(total=total, desc="patching (naive)", disable=not (progress if progress is not None else total >= 64),
               leave=False)
    for i in range(n_pairs):
        rcv = torch.tensor([plan.recv[plan.pair_recv[i]]], device=dev)
        src = torch.tensor([plan.src[plan.pair_src[i]]], device=dev)
        names = sorted({_hf_name(s) for sites in plan.neg[i] for s, _ in sites})
        out, cache = run_with_cache(model, src, names_filter=names, logits_to_keep=1, use_cache=False)
        work.full_forwards += 1
        work.full_rows += 1
        work.full_tokens += src.shape[1]
        work.layer_tokens += src.shape[1] * n_layers
        work.unembed_rows += 1
        source[i] = metric(out.logits[:, -1])[0]
        clean[i] = metric(forward(rcv, []))[0]
        n_r, n_s = rcv.shape[1], src.shape[1]
        for j, sites in enumerate(plan.neg[i]):
            fwd = [
                (_hf_name(s), _site_hook(s, [n_r + q for q in p], cache[_hf_name(s)], [n_s + q for q in p]))
                for s, p in sites
            ]
            logits = forward(rcv, fwd)
            raw[i, j] = metric(logits)[0]
            if logits_all is not None:
                logits_all[i, j] = logits[0].float().cpu()
            bar.update(1)
    bar.close()
    return raw, clean, source, logits_all, work




def patch_sweep(
    lm: LoadedModel,
    pairs: Any,
    patches: Sequence[Patch],
    *,
    batch_rows: int | None = None,
    progress: bool | None = None,
    return_logits: bool = False,
    kind: str = "custom",
    **options: Unpack[SweepOptions],
) -> PatchResult:
    """Exact activation patching of every patch in every pair: a :class:`PatchResult`.

    ``options``: ``direction``, ``refusal_ids`` or ``metric``, ``method`` (``auto`` | ``fast`` | ``naive``),
    ``system``, ``check_aligned`` (see :func:`~mech.patching.plan.prepare_sweep`). ``batch_rows``: rows per
    patched forward (fast). ``return_logits`` keeps the patched logits ``[n_pairs, n_patches, d_vocab]`` in
    ``result.logits``.
    """
    sw = prepare_sweep(lm, pairs, patches, **options)
    sw.start()
    with torch.inference_mode():
        if sw.method == "fast":
            raw, clean, source, logits, work = _fast_sweep(lm, sw.plan, sw.metric, batch_rows, progress, return_logits)
        else:
            raw, clean, source, logits, work = _naive_sweep(lm, sw.plan, sw.metric, progress, return_logits)
        return sw.result(lm, raw, clean, source, work, kind=kind, logits=logits)


def layer_sweep(
    lm: LoadedModel,
    pairs: Any,
    *,
    components: Sequence[str] = LAYER_COMPONENTS,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    per_position: bool = False,
    together: bool = True,
    **kw: Any,
) -> PatchResult:
    """Layer x component (resid_pre, attn_out, mlp_out) x position: ``as_array("layer", "component")``.

    ``positions`` default: the template's post-instruction positions (end-aligned). ``per_position`` adds one
    patch per position (label ``position=-k..-1``); ``together`` keeps the all-positions patch (``"all"``).
    Other keywords go to :func:`patch_sweep`.
    """
    pos = sweep_positions(lm, positions, kw.get("system"))
    patches = layer_patches(lm.shape.n_layers, components, layers, pos, per_position, together)
    return patch_sweep(lm, pairs, patches, kind="layer", **kw)


def head_sweep(
    lm: LoadedModel,
    pairs: Any,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    per_position: bool = False,
    together: bool = True,
    **kw: Any,
) -> PatchResult:
    """Every attention head (``attn.hook_z``) at the end positions together (optionally per position):
    ``as_array("layer", "head")`` -> ``[n_layers, n_heads]``."""
    pos = sweep_positions(lm, positions, kw.get("system"))
    patches = head_patches(lm.shape.n_layers, lm.shape.n_heads, layers, heads, pos, per_position, together)
    return patch_sweep(lm, pairs, patches, kind="head", **kw)


def neuron_sweep(
    lm: LoadedModel,
    pairs: Any,
    *,
    neurons: Sequence[tuple[int, int]] | Mapping[int, Sequence[int]] | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    per_position: bool = False,
    together: bool = True,
    **kw: Any,
) -> PatchResult:
    """MLP neurons (columns of ``mlp.hook_post``): all of ``layers`` or a candidate set (e.g. the top AtP
    neurons). Every neuron of a 24-layer model is ~10^5 patches per pair: prefer candidates."""
    pos = sweep_positions(lm, positions, kw.get("system"))
    patches = neuron_patches(lm.shape.n_layers, lm.shape.d_mlp, neurons, layers, pos, per_position, together)
    return patch_sweep(lm, pairs, patches, kind="neuron", **kw)
