"""Refusal scores of many interventions at once: the clean run once, each intervention from its first changed
layer, interventions as rows of one batch.

The random-component nulls score hundreds of ablation sets (layer-matched random head sets) on the same prompts,
and Arditi et al.'s direction selection (:func:`mech.directions.select_direction`) scores ~100 candidate
directions by directional ablation and activation addition, plus random directions of the same norm.
:func:`mech.scoring.refusal_scores` with ``backend="hooks"`` does that one intervention at a time: per
intervention, the shared chat prefix runs as one row and the rest of every prompt runs from layer 0 under hooks.
This module is its ``backend="batched"``: the same numbers (float32 round-off: ≤ 2e-4 absolute on the log-odds,
tested on tiny models and the default model) for many interventions together, of two kinds (the hooks of both
are :mod:`mech.interventions`' :class:`~mech.interventions.AblationRows` and
:class:`~mech.interventions.DirectionRows`):

* :func:`ablation_set_scores` — sets of components (heads, neurons, attn / mlp blocks), zero- or mean-ablated
  as :class:`~mech.interventions.Ablate` does; a set's first changed layer is its lowest component's;
* :func:`direction_set_scores` — ``("ablate", direction)`` (:func:`~mech.directions.directional_ablation`:
  the direction projected out of every layer's ``resid_pre``, ``attn_out`` and ``mlp_out``, so it starts at
  layer 0, the embedding output) and ``("add", vector, layer)``
  (:func:`~mech.directions.activation_addition`: the vector added to ``resid_pre`` of ``layer``, which is
  where it starts); optionally with the first-token KL of each prompt against the clean run.

How (one driver, :func:`_run_sets`, for both kinds):

1. **The clean run happens once.** Prompts are chat-encoded and split at the same shared prefix as
   :func:`~mech.chat.shared_prefix_len` (``min_rest=8``). The residual stream entering every layer some
   intervention starts at is kept, for the prefix row and for each prompt's rest (right-padded).
2. **An intervention starts at its first changed layer.** Nothing below it changes, so its rows join there from
   the clean residual; every position from that layer on is recomputed (later attention reads them all).
   Per intervention, its prefix row runs first (one row: the intervention changes the prefix too; mean-ablation
   uses the position-independent mean there, as the hooks backend does) and its K/V
   is recorded; then its prompt rows run on top of that intervention's own prefix K/V.
3. **Interventions are rows of one batch** (row = intervention x prompt) with per-row tensors in the hooks
   (unit masks, replacement means, directions, steering vectors; a row another hook does not concern gets an
   exact no-op: a false mask, a zero direction, a zero vector), rows joining at their own first layer
   (:meth:`mech.engine.Engine.run`'s staircase), chunked by ``max_rows``. Prompts of similar rest
   length share a chunk (little padding). End-aligned means go to each rest row's last ``means.n_end`` real
   tokens, as :meth:`~mech.ablation.MeanActivations.replacement` does for the rest forward of the hook loop
   (whose left padding puts the real last tokens last).
4. **Scores from the last position only**: final norm and ``lm_head`` on one row per (intervention, prompt),
   then :func:`mech.refusal.refusal_log_odds` (and :func:`mech.evaluation.first_token_kl` against the clean
   run's logits).

What it saves over the hook loop: the layers below each intervention's first changed layer (for prefix and
rest; none for directional ablation), the hook loop's left padding to the longest prompt, and small
per-intervention forwards (many rows make larger, faster matrix products). What it cannot save: from the first
changed layer on, every position of every prompt is recomputed per intervention (the intervention changes them
all).

Written here rather than taken from a library because none batches *interventions* as rows over cached
clean activations: TransformerLens and nnsight run one intervention per forward (a batch holds prompts, not
interventions), and transformers' KV cache cannot give each row its own prefix K/V from a mid-network start.
The pieces are the partial-forward engine's (:class:`~mech.engine.Engine`, which patching runs on too: ``run``,
its prefix cache, ``unembed``, the :class:`~mech.engine.Work` counter).

Edge case: if a whole chat-formatted prompt is shorter than ``means.n_end`` (no shared prefix, and a hook-loop
batch all shorter than ``n_end``), the hook loop falls back to the all-token mean there; this function still
end-aligns that prompt's real tokens. Chat templates make every prompt far longer than ``n_end``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mech.chat import shared_prefix_len
from mech.components import Component, as_component, check_component
from mech.engine import Engine, PrefixKV, Work
from mech.evaluation import first_token_kl
from mech.hooks import HookFn
from mech.interventions import Ablate, AblationRows, AddVector, DirectionRows, ProjectOut
from mech.refusal import check_refusal_ids, refusal_log_odds

if TYPE_CHECKING:
    from mech.ablation import MeanActivations
    from mech.interventions import AblationMethod, MeanMode
    from mech.models import LoadedModel

__all__ = ["MIN_REST", "DirectionSetScores", "ablation_set_scores", "direction_set_scores"]

MIN_REST = 8  # tokens each prompt keeps outside the shared prefix: mech.scoring.last_logits_under's default
UNEMBED_ROWS = 128  # rows per lm_head product (logits [rows, d_vocab] in memory at once)


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


# -------------------------------------------------------------------------------------- the shared driver


@dataclass
class _Clean:
    """The clean run: shared prefix length, rest lengths, prompts by ascending rest length, and the residual
    stream entering each needed slot (prefix row ``[1, P, d]``; rests ``[n_prompts, W_max, d]``, right-padded)."""

    P: int
    lens: list[int]
    order: list[int]
    pre_resid: dict[int, Tensor]
    kv: PrefixKV | None
    rest_resid: dict[int, Tensor]


# make_hooks(set_ids, row_sets, row_lens, W): hooks for rows of interventions ``set_ids[row_sets]`` (rows in join
# order), ``row_lens [B]`` real rest tokens per row (None: the prefix rows), ``W`` window width.
MakeHooks = Callable[[list[int], Tensor, "Tensor | None", int], list[tuple[str, HookFn]]]


def _clean_run(eng: Engine, seqs: list[list[int]], slots: set[int], max_rows: int,
               take: Callable[[Tensor, list[int]], None]) -> _Clean:
    """Run every prompt once (the shared prefix as one row); ``take(final [k, d_model], prompt ids)`` per chunk."""
    dev, dtype, n_layers = eng.device, eng.dtype, eng.n_layers
    n_prompts = len(seqs)
    P = shared_prefix_len(seqs, MIN_REST)
    lens = [len(s) - P for s in seqs]
    W_max = max(lens)
    order = sorted(range(n_prompts), key=lambda i: lens[i])
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
    rest_resid = {s: torch.empty(n_prompts, W_max, eng.lm.shape.d_model, device=dev, dtype=dtype) for s in slots}
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
        take(final, rows)
    return _Clean(P, lens, order, pre_resid, kv_clean, rest_resid)


def _run_sets(eng: Engine, cl: _Clean, first: list[int], make_hooks: MakeHooks,
              take: Callable[[Tensor, Tensor, Tensor], None], max_rows: int, desc: str, progress: bool) -> None:
    """Every intervention ``i`` with ``first[i] < n_layers`` on every prompt, from its first layer; ``take(final
    [B, d_model], intervention ids [B], prompt ids [B])`` per chunk. Interventions go in groups of ``max_rows``
    ordered by first layer (the staircase); per group the prefix rows first (their K/V recorded), then
    (intervention x prompt) rows on top of them."""
    dev, n_layers, P, lens = eng.device, eng.n_layers, cl.P, cl.lens
    active = sorted((i for i in range(len(first)) if first[i] < n_layers), key=lambda i: first[i])
    groups = [active[a:b] for a, b in _balanced(len(active), max_rows)] if active else []
    n_chunks = 0
    plan = []
    for sg in groups:
        pg = _groups(lens, cl.order, len(sg), max_rows)
        plan.append((sg, pg))
        n_chunks += sum(len(_balanced(len(sg) * len(g), max_rows)) for g in pg)
    bar = tqdm(total=n_chunks, desc=desc, disable=not progress, leave=False)
    for sg, pgs in plan:
        n_sg = len(sg)
        kv_sets: PrefixKV | None = None
        if P > 0:  # each intervention's prefix row from its first layer, K/V recorded
            assert cl.kv is not None
            rec: dict[int, tuple[Tensor, Tensor]] = {}
            joins = []
            for slot in sorted({first[s] for s in sg}):
                cnt = sum(first[s] == slot for s in sg)
                joins.append((slot, cl.pre_resid[slot].expand(cnt, -1, -1).contiguous()))
            local = torch.arange(n_sg, device=dev)
            eng.run(joins, torch.arange(P, device=dev)[None].expand(n_sg, P), fwd_hooks=make_hooks(sg, local, None, P),
                    kv_record=rec)
            kv_sets = PrefixKV([rec[L][0] if L in rec else cl.kv.k[L][:0] for L in range(n_layers)],
                               [rec[L][1] if L in rec else cl.kv.v[L][:0] for L in range(n_layers)])
        for g in pgs:
            W = max(lens[i] for i in g)
            pairs = [(j, p) for j in range(n_sg) for p in g]  # intervention-major: first layers ascend (join order)
            for a, b in _balanced(len(pairs), max_rows):
                chunk = pairs[a:b]
                B = len(chunk)
                row_sets = torch.tensor([j for j, _ in chunk], device=dev)
                row_prompts = torch.tensor([p for _, p in chunk], device=dev)
                row_lens = torch.tensor([lens[p] for _, p in chunk], device=dev)
                joins = []
                for slot in sorted({first[sg[j]] for j, _ in chunk}):
                    sel = torch.tensor([r for r, (j, _) in enumerate(chunk) if first[sg[j]] == slot], device=dev)
                    joins.append((slot, cl.rest_resid[slot].index_select(0, row_prompts[sel])[:, :W]))
                final = eng.run(
                    joins, P + torch.arange(W, device=dev)[None].expand(B, W), rem=kv_sets,
                    rowmap=row_sets if kv_sets is not None else None,
                    rem_valid=torch.ones(B, P, dtype=torch.bool, device=dev) if kv_sets is not None else None,
                    fwd_hooks=make_hooks(sg, row_sets, row_lens, W), out_slot=row_lens - 1,
                )
                assert final is not None
                take(final, torch.tensor([sg[j] for j, _ in chunk]), torch.tensor([p for _, p in chunk]))
                bar.update(1)
    bar.close()


# ---------------------------------------------------------------------------------------- ablation sets


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

    Equal (float32: ≤ 2e-4 absolute) to ``refusal_scores(lm, prompts, refusal_ids, [Ablate(s, method, means,
    mode) for s in sets], backend="hooks")``; this is that call's ``backend="batched"``; see the module doc for how it is
    faster. ``sets``: lists of components (heads, neurons, attn / mlp blocks; ids such as ``L12.H3`` or
    :class:`~mech.components.Component`); an empty set gives the clean scores. ``max_rows``: rows (set x prompt,
    or prefix rows) per partial forward (memory grows with it). ``work``: receives what was computed (a
    :class:`~mech.engine.Work`, for FLOP counts). Bad input raises a one-line ValueError before any
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
    ablations = [Ablate(tuple(c), method, means, mode) for c in comp_sets]
    first = [a.first_layer(n_layers) for a in ablations]
    # per-row hooks: the prefix rows and mode="averaged" take the all-token mean, rest rows their end-aligned means
    row_hooks = AblationRows(lm, ablations, dev, dtype)

    # 1. the clean run: prefix row (its K/V and residuals) and every prompt's rest (residuals, clean scores)
    clean = torch.empty(len(seqs))

    def take_clean(final: Tensor, rows: list[int]) -> None:
        clean[rows] = eng.logits_metric(final, metric, False)[0].cpu()

    cl = _clean_run(eng, seqs, {f for f in first if f < n_layers}, max_rows, take_clean)
    out = clean.expand(len(comp_sets), len(seqs)).clone()  # empty sets keep the clean scores

    def take(final: Tensor, set_ids: Tensor, prompt_ids: Tensor) -> None:
        out[set_ids, prompt_ids] = eng.logits_metric(final, metric, False)[0].cpu()

    # 2.-4. the sets, in groups of max_rows sets ordered by first layer (the staircase)
    _run_sets(eng, cl, first, row_hooks.hooks, take, max_rows, "ablation sets", progress)
    eng.work.seconds += time.perf_counter() - t0
    if work is not None:
        work.add(eng.work)
    return out


# ------------------------------------------------------------------------------- direction interventions

@dataclass
class DirectionSetScores:
    """What :func:`direction_set_scores` measured (float32 CPU tensors).

    ``scores [n_interventions, n_prompts]``: refusal log-odds under each intervention; ``clean [n_prompts]``: with
    none; ``kl [n_interventions, n_prompts]`` (with ``kl=True``, else None): first-token ``KL(clean || intervened)``
    per prompt, as :func:`mech.evaluation.first_token_kl` (nats)."""

    scores: Tensor
    clean: Tensor
    kl: Tensor | None = None


def _check_directions(lm: LoadedModel, prompts: Sequence[str], refusal_ids: Sequence[int],
                      interventions: Sequence[Any], max_rows: int) -> list[ProjectOut | AddVector]:
    """Every input checked before any forward: one-line ValueErrors."""
    if not prompts or isinstance(prompts, str):
        raise ValueError("direction_set_scores needs at least one prompt (a list of strings)")
    if isinstance(interventions, (str, Tensor)) or not len(interventions):
        raise ValueError("direction_set_scores needs a non-empty list of interventions such as "
                         "('ablate', direction) or ('add', vector, layer)")
    if isinstance(interventions[0], str):
        raise ValueError("direction_set_scores got a single intervention; pass a list of them, e.g. "
                         "[('ablate', direction)]")
    if int(max_rows) < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    check_refusal_ids(refusal_ids, lm.shape.d_vocab)
    out: list[ProjectOut | AddVector] = []
    for i, iv in enumerate(interventions):
        if isinstance(iv, (ProjectOut, AddVector)):  # a value: checked when it was built
            out.append(iv)
            continue
        if not isinstance(iv, (tuple, list)) or not iv or not isinstance(iv[0], str):
            raise ValueError(f"intervention {i}: {type(iv).__name__} is not ('ablate', direction) or "
                             "('add', vector, layer)")
        kind = iv[0]
        if kind == "ablate":
            if len(iv) != 2:
                raise ValueError(f"intervention {i}: ('ablate', direction) takes one direction, got {len(iv) - 1} "
                                 "items")
            try:
                out.append(ProjectOut.of(lm, iv[1]))
            except ValueError as e:
                raise ValueError(f"intervention {i}: {e}") from None
        elif kind == "add":
            if len(iv) != 3:
                raise ValueError(f"intervention {i}: ('add', vector, layer) takes a vector and a layer, got "
                                 f"{len(iv) - 1} items")
            try:
                out.append(AddVector.of(lm, iv[1], iv[2]))
            except ValueError as e:
                raise ValueError(f"intervention {i}: {e}") from None
        else:
            raise ValueError(f"intervention {i}: unknown kind {kind!r}; use 'ablate' or 'add'")
    return out


@torch.inference_mode()
def direction_set_scores(
    lm: LoadedModel,
    prompts: Sequence[str],
    refusal_ids: Sequence[int],
    interventions: Sequence[tuple[str, Tensor] | tuple[str, Tensor, int] | ProjectOut | AddVector],
    kl: bool = False,
    max_rows: int = 128,
    progress: bool = False,
    work: Work | None = None,
) -> DirectionSetScores:
    """Refusal log-odds (and optionally first-token KL) of every prompt under each direction intervention.

    ``interventions``: ``("ablate", direction)`` or a :class:`~mech.interventions.ProjectOut` —
    :func:`~mech.directions.directional_ablation` (the direction is normalized here; its norm does not matter) —
    or ``("add", vector, layer)`` or an :class:`~mech.interventions.AddVector` —
    :func:`~mech.directions.activation_addition` (a tuple has ``coeff=1``: pass ``coeff * vector`` for another
    coeff), in any mix. Returns a :class:`DirectionSetScores`: ``.scores [n_interventions, n_prompts]`` equal (float32:
    ≤ 2e-4 absolute) to ``refusal_scores(lm, prompts, refusal_ids, [ProjectOut.of(lm, d)])`` (resp.
    ``AddVector.of(lm, v, layer)``) per intervention; ``.clean``
    the scores with none; with ``kl=True``, ``.kl`` equal (≤ 1e-4 absolute) to ``first_token_kl(clean_logits,
    intervened_logits)`` per prompt, the logits as :func:`~mech.scoring.last_logits_under` gives them (which is
    what :func:`~mech.directions.select_direction` computes; it keeps the clean logits, ``n_prompts x d_vocab``
    float32, on the model's device).

    Arditi's selection in these terms, per candidate ``v`` at layer ``L``: ``r = direction_set_scores(lm, hv +
    lv, ids, [("ablate", v), ...], kl=True)`` gives ``bypass = r.scores[:, :len(hv)].mean(1)`` and ``kl =
    r.kl[:, len(hv):].mean(1)``; ``direction_set_scores(lm, lv, ids, [("add", v, L), ...]).scores.mean(1)``
    gives ``induce``. See the module doc for how it is faster. ``max_rows``: rows (intervention x prompt, or
    prefix rows) per partial forward. ``work``: receives what was computed. Bad input raises a one-line
    ValueError before any forward; hooks are removed even when a forward raises.
    """
    ivs = _check_directions(lm, prompts, refusal_ids, interventions, max_rows)
    t0 = time.perf_counter()
    eng = Engine(lm)
    dev, dtype, n_layers = eng.device, eng.dtype, eng.n_layers
    rids = torch.as_tensor(check_refusal_ids(refusal_ids, lm.shape.d_vocab), device=dev)
    seqs = lm.encode_chat(list(prompts))
    n_prompts = len(seqs)
    first = [iv.first_layer(n_layers) for iv in ivs]
    row_hooks = DirectionRows(ivs, n_layers, dev, dtype)

    clean = torch.empty(n_prompts)
    clean_logits = torch.empty(n_prompts, lm.shape.d_vocab, device=dev) if kl else None
    scores = torch.empty(len(ivs), n_prompts)
    kls = torch.empty(len(ivs), n_prompts) if kl else None

    def take_clean(final: Tensor, rows: list[int]) -> None:
        for a in range(0, len(rows), UNEMBED_ROWS):
            r = rows[a : a + UNEMBED_ROWS]
            logits = eng.unembed(final[a : a + UNEMBED_ROWS]).float()
            clean[r] = refusal_log_odds(logits, rids).cpu()
            if clean_logits is not None:
                clean_logits[torch.tensor(r, device=dev)] = logits

    cl = _clean_run(eng, seqs, set(first), max_rows, take_clean)

    def take(final: Tensor, set_ids: Tensor, prompt_ids: Tensor) -> None:
        for a in range(0, final.shape[0], UNEMBED_ROWS):
            s, p = set_ids[a : a + UNEMBED_ROWS], prompt_ids[a : a + UNEMBED_ROWS]
            logits = eng.unembed(final[a : a + UNEMBED_ROWS]).float()
            scores[s, p] = refusal_log_odds(logits, rids).cpu()
            if kls is not None:
                assert clean_logits is not None
                kls[s, p] = first_token_kl(clean_logits[p.to(dev)], logits).cpu()

    _run_sets(eng, cl, first, row_hooks.hooks, take, max_rows, "direction interventions", progress)
    eng.work.seconds += time.perf_counter() - t0
    if work is not None:
        work.add(eng.work)
    return DirectionSetScores(scores, clean, kls)
