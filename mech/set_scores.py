"""Refusal scores of many ablation sets at once: the clean run once, each set from its first ablated layer.

The random-component nulls score hundreds of ablation sets (layer-matched random head sets) on the same prompts.
:func:`mech.scoring.scores_under` does that one set at a time: per set, the shared chat prefix runs as one row
and the rest of every prompt runs from layer 0 under mean-ablation hooks. :func:`ablation_set_scores` gives the
same numbers (float32 round-off: ≤ 2e-4 absolute on the log-odds, tested on tiny models and the default model)
for many sets together:

1. **The clean run happens once.** Prompts are chat-encoded and split at the same shared prefix as
   :func:`~mech.scoring.shared_prefix_len` (``min_rest=8``). The residual stream entering every layer some set
   starts at is kept, for the prefix row and for each prompt's rest (right-padded).
2. **A set starts at its first ablated layer.** Nothing below it changes, so the set's rows join there from
   the clean residual; every position from that layer on is recomputed (later attention reads them all).
   Per set, its prefix row runs first (one row, the position-independent mean, as
   :func:`~mech.scoring.ablation_intervention` does on the prefix) and its K/V is recorded; then its prompt rows
   run on top of that set's own prefix K/V.
3. **Sets are rows of one batch** (row = set x prompt) with per-row unit masks in the ablation hooks, rows
   joining at their own first layer (:meth:`mech.patching.engine.Engine.run`'s staircase), chunked by
   ``max_rows``. Prompts of similar rest length share a chunk (little padding). End-aligned means go to each
   rest row's last ``means.n_end`` real tokens, as :meth:`~mech.ablation.MeanActivations.replacement` does
   for the rest forward of the hook loop (whose left padding puts the real last tokens last).
4. **Scores from the last position only**: final norm and ``lm_head`` on one row per (set, prompt), then
   :func:`mech.refusal.refusal_log_odds`.

What it saves over the hook loop: the layers below each set's first ablated layer (for prefix and rest), the
hook loop's left padding to the longest prompt, and small per-set forwards. What it cannot save: from the first
ablated layer on, every position of every prompt is recomputed per set (the ablation changes them all).

Written here rather than taken from a library because none batches *ablation sets* as rows over cached
clean activations: TransformerLens and nnsight run one intervention per forward (a batch holds prompts, not
interventions), and transformers' KV cache cannot give each row its own prefix K/V from a mid-network start.
The pieces are the patching engine's (:class:`~mech.patching.engine.Engine`: ``run``, its prefix cache,
``unembed``, the :class:`~mech.patching.engine.Work` counter).

Edge case: if a whole chat-formatted prompt is shorter than ``means.n_end`` (no shared prefix, and a hook-loop
batch all shorter than ``n_end``), the hook loop falls back to the all-token mean there; this function still
end-aligns that prompt's real tokens. Chat templates make every prompt far longer than ``n_end``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mech.ablation import _unit_masks
from mech.components import Component, as_component, check_component
from mech.hooks import HookFn, HookPoint
from mech.patching.engine import Engine, PrefixKV, Work
from mech.refusal import check_refusal_ids, refusal_log_odds
from mech.scoring import shared_prefix_len

if TYPE_CHECKING:
    from mech.ablation import AblationMethod, MeanActivations, MeanMode
    from mech.models import LoadedModel

__all__ = ["MIN_REST", "ablation_set_scores"]

MIN_REST = 8  # tokens each prompt keeps outside the shared prefix: mech.scoring.last_logits_under's default


def _check(
    lm: LoadedModel, prompts: Sequence[str], refusal_ids: Sequence[int], sets: Sequence[Sequence[Component | str]],
    method: str, means: MeanActivations | None, mode: str, max_rows: int,
) -> list[list[Component]]:
    """Every input checked before any forward: one-line ValueErrors."""
    if not prompts:
        raise ValueError("ablation_set_scores needs at least one prompt")
    if isinstance(sets, (str, Component)) or not len(sets):
        raise ValueError("ablation_set_scores needs a non-empty list of component sets (a list of lists)")
    if method not in ("zero", "mean"):
        raise ValueError(f"unknown ablation method {method!r}; use zero or mean")
    if mode not in ("end_aligned", "averaged"):
        raise ValueError(f"unknown mean mode {mode!r}; use end_aligned or averaged")
    if method == "mean" and means is None:
        raise ValueError("mean-ablation needs means=mean_activations(lm, harmless_prompts, kinds)")
    if int(max_rows) < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    check_refusal_ids(refusal_ids, lm.shape.d_vocab)
    out: list[list[Component]] = []
    for i, s in enumerate(sets):
        if isinstance(s, (str, Component)):
            raise ValueError(f"set {i} is a single component {s!s}; pass each set as a list of components")
        comps = []
        for c in s:
            try:
                comp = as_component(c)
            except (ValueError, AttributeError, TypeError) as e:
                raise ValueError(f"set {i}: {e}" if isinstance(e, ValueError) else
                                 f"set {i}: {c!r} is not a component; use ids such as L12.H3") from None
            check_component(lm, comp)
            if means is not None and method == "mean":
                table = means.averaged if mode == "averaged" else means.end_aligned
                if comp.hook not in means.averaged or comp.hook not in table:
                    raise ValueError(f"set {i}: no mean cached for {comp.hook}; compute mean_activations for "
                                     f"{comp.kind} components")
            comps.append(comp)
        out.append(comps)
    return out


def _groups(lengths: list[int], order: list[int], n_sets: int, max_rows: int) -> list[list[int]]:
    """Prompts (ascending rest length) in groups padded to their longest: a group closes at a length change once
    its rows (``n_sets`` x prompts) fill a batch, so groups have little padding and full batches."""
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and lengths[i] > lengths[cur[-1]] and n_sets * len(cur) >= max_rows:
            groups.append(cur)
            cur = []
        cur.append(i)
    groups.append(cur)
    return groups


def _balanced(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` chunks of ``0..n`` of at most ``size`` items, as equal as possible."""
    k = -(-n // size)
    step = -(-n // k)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _ablation_hook(mask: Tensor, rep: Tensor, idx: Tensor | None = None) -> HookFn:
    """Per-row ablation: ``mask [B, *feat]`` (rows in join order); the replacement is ``rep`` (broadcast: a
    scalar or ``[*feat]``) or, with ``idx [B, W]``, ``rep[idx]`` (``rep``: a table ``[n_rows, *feat]``)."""

    def fn(x: Tensor, hook: HookPoint) -> Tensor:  # x: [n, W, *feat], the rows that have joined so far
        n = x.shape[0]
        return torch.where(mask[:n].unsqueeze(1), rep if idx is None else rep[idx[:n]], x)

    return fn


@torch.inference_mode()
def ablation_set_scores(
    lm: LoadedModel,
    prompts: Sequence[str],
    refusal_ids: Sequence[int],
    sets: Sequence[Sequence[Component | str]],
    method: AblationMethod = "mean",
    means: MeanActivations | None = None,
    mode: MeanMode = "end_aligned",
    max_rows: int = 128,
    progress: bool = False,
    work: Work | None = None,
) -> Tensor:
    """Refusal log-odds of every prompt with each set's components ablated: ``[n_sets, n_prompts]`` float32 CPU.

    Equal (float32: ≤ 2e-4 absolute) to ``torch.stack([scores_under(lm, prompts, refusal_ids,
    ablation_intervention(lm, s, method, means, mode)) for s in sets])``; see the module doc for how it is
    faster. ``sets``: lists of components (heads, neurons, attn / mlp blocks; ids such as ``L12.H3`` or
    :class:`~mech.components.Component`); an empty set gives the clean scores. ``max_rows``: rows (set x prompt,
    or prefix rows) per partial forward (memory grows with it). ``work``: receives what was computed (a
    :class:`~mech.patching.engine.Work`, for FLOP counts). Bad input raises a one-line ValueError before any
    forward; hooks are removed even when a forward raises.
    """
    comp_sets = _check(lm, prompts, refusal_ids, sets, method, means, mode, max_rows)
    t0 = time.perf_counter()
    eng = Engine(lm)
    dev, dtype, n_layers = eng.device, eng.dtype, eng.n_layers
    rids = torch.as_tensor(check_refusal_ids(refusal_ids, lm.shape.d_vocab), device=dev)

    def metric(logits: Tensor) -> Tensor:
        return refusal_log_odds(logits, rids)

    seqs = lm.encode_chat(list(prompts))
    n_prompts = len(seqs)
    P = shared_prefix_len(seqs, MIN_REST)
    lens = [len(s) - P for s in seqs]
    W_max = max(lens)
    order = sorted(range(n_prompts), key=lambda i: lens[i])
    first = [min((c.layer for c in s), default=n_layers) for s in comp_sets]
    slots = sorted({f for f in first if f < n_layers})
    masks = [_unit_masks(lm, s) for s in comp_sets]  # per set: {hook name: bool [*feat]}

    # 1. the clean run: prefix row (its K/V and residuals) and every prompt's rest (residuals, clean scores)
    pre_resid: dict[int, Tensor] = {}
    kv_clean: PrefixKV | None = None
    if P > 0:
        rec: dict[int, tuple[Tensor, Tensor]] = {}

        def keep_prefix(slot: int, h: Tensor) -> Tensor:
            if slot in slots:
                pre_resid[slot] = h
            return h

        ids = torch.tensor([seqs[0][:P]], device=dev)
        eng.run([(0, eng.embed(ids))], torch.arange(P, device=dev)[None], resid_fn=keep_prefix, kv_record=rec)
        kv_clean = PrefixKV([rec[L][0] for L in range(n_layers)], [rec[L][1] for L in range(n_layers)])
    rest_resid = {s: torch.empty(n_prompts, W_max, lm.shape.d_model, device=dev, dtype=dtype) for s in slots}
    clean = torch.empty(n_prompts)
    for a, b in _balanced(n_prompts, max_rows):
        rows = order[a:b]
        W = max(lens[i] for i in rows)
        ids = torch.tensor([seqs[i][P:] + [seqs[i][-1]] * (W - lens[i]) for i in rows], device=dev)  # right-padded
        rows_t = torch.tensor(rows, device=dev)

        def keep_rest(slot: int, h: Tensor, rows_t: Tensor = rows_t) -> Tensor:
            if slot in rest_resid:
                rest_resid[slot][rows_t] = F.pad(h, (0, 0, 0, W_max - h.shape[1]))
            return h

        pos = P + torch.arange(W, device=dev)[None].expand(len(rows), W)
        final = eng.run([(0, eng.embed(ids))], pos, shared=kv_clean, resid_fn=keep_rest,
                        out_slot=torch.tensor([lens[i] - 1 for i in rows], device=dev))
        assert final is not None
        clean[rows] = eng.logits_metric(final, metric, False)[0].cpu()

    out = clean.expand(len(comp_sets), n_prompts).clone()  # empty sets keep the clean scores

    # replacement tables: [1 + n_end, *feat] (row 0: the all-token mean; 1..n_end: the end-aligned means)
    tables: dict[str, Tensor] = {}

    def table(name: str) -> Tensor:
        if name not in tables:
            assert means is not None
            parts = [means.averaged[name][None]] + ([means.end_aligned[name]] if mode == "end_aligned" else [])
            tables[name] = torch.cat(parts).to(device=dev, dtype=dtype)
        return tables[name]

    def fwd_hooks(set_idx: list[int], row_sets: Tensor, idx: Tensor | None) -> list[tuple[str, HookFn]]:
        """Hooks for rows whose sets are ``set_idx[row_sets]``; ``idx [B, W]``: each slot's table row (None: 0)."""
        names = sorted({n for s in set_idx for n in masks[s]})
        hs: list[tuple[str, HookFn]] = []
        for name in names:
            feat = next(masks[s][name] for s in set_idx if name in masks[s])
            per_set = torch.stack([masks[s].get(name, torch.zeros_like(feat)) for s in set_idx]).to(dev)
            m = per_set.index_select(0, row_sets)  # [B, *feat]
            if method == "zero":
                hs.append((name, _ablation_hook(m, torch.zeros((), device=dev, dtype=dtype))))
            elif idx is None:
                hs.append((name, _ablation_hook(m, table(name)[0])))
            else:
                hs.append((name, _ablation_hook(m, table(name), idx)))
        return hs

    # 2.-4. the sets, in groups of max_rows sets ordered by first layer (the staircase)
    active = sorted((i for i in range(len(comp_sets)) if first[i] < n_layers), key=lambda i: first[i])
    groups = [active[a:b] for a, b in _balanced(len(active), max_rows)] if active else []
    n_chunks = 0
    plan = []
    for sg in groups:
        pg = _groups(lens, order, len(sg), max_rows)
        plan.append((sg, pg))
        n_chunks += sum(len(_balanced(len(sg) * len(g), max_rows)) for g in pg)
    bar = tqdm(total=n_chunks, desc="ablation sets", disable=not progress, leave=False)
    for sg, pgs in plan:
        n_sg = len(sg)
        kv_sets: PrefixKV | None = None
        if P > 0:  # each set's prefix row from its first layer, position-independent mean, K/V recorded
            assert kv_clean is not None
            rec = {}
            joins = []
            for slot in sorted({first[s] for s in sg}):
                cnt = sum(first[s] == slot for s in sg)
                joins.append((slot, pre_resid[slot].expand(cnt, -1, -1).contiguous()))
            local = torch.arange(n_sg, device=dev)
            eng.run(joins, torch.arange(P, device=dev)[None].expand(n_sg, P), fwd_hooks=fwd_hooks(sg, local, None),
                    kv_record=rec)
            kv_sets = PrefixKV([rec[L][0] if L in rec else kv_clean.k[L][:0] for L in range(n_layers)],
                               [rec[L][1] if L in rec else kv_clean.v[L][:0] for L in range(n_layers)])
        for g in pgs:
            W = max(lens[i] for i in g)
            pairs = [(j, p) for j in range(n_sg) for p in g]  # set-major: sets ascend in first layer
            for a, b in _balanced(len(pairs), max_rows):
                chunk = pairs[a:b]
                B = len(chunk)
                row_sets = torch.tensor([j for j, _ in chunk], device=dev)
                row_prompts = torch.tensor([p for _, p in chunk], device=dev)
                row_lens = torch.tensor([lens[p] for _, p in chunk], device=dev)
                idx = None
                if method == "mean" and mode == "end_aligned":
                    assert means is not None
                    e = torch.arange(W, device=dev)[None] - (row_lens[:, None] - means.n_end)  # [B, W]
                    real = torch.arange(W, device=dev)[None] < row_lens[:, None]
                    idx = torch.where((e >= 0) & real, e + 1, 0)
                joins = []
                for slot in sorted({first[sg[j]] for j, _ in chunk}):
                    sel = torch.tensor([r for r, (j, _) in enumerate(chunk) if first[sg[j]] == slot], device=dev)
                    joins.append((slot, rest_resid[slot].index_select(0, row_prompts[sel])[:, :W]))
                final = eng.run(
                    joins, P + torch.arange(W, device=dev)[None].expand(B, W), rem=kv_sets,
                    rowmap=row_sets if kv_sets is not None else None,
                    rem_valid=torch.ones(B, P, dtype=torch.bool, device=dev) if kv_sets is not None else None,
                    fwd_hooks=fwd_hooks(sg, row_sets, idx), out_slot=row_lens - 1,
                )
                assert final is not None
                vals = eng.logits_metric(final, metric, False)[0].cpu()
                out[torch.tensor([sg[j] for j, _ in chunk]), torch.tensor([p for _, p in chunk])] = vals
                bar.update(1)
    bar.close()
    eng.work.seconds += time.perf_counter() - t0
    if work is not None:
        work.add(eng.work)
    return out
