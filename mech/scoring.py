"""Refusal scores of prompts under interventions: the one entry point, :func:`refusal_scores`, with a backend.

``refusal_scores(lm, prompts, refusal_ids, interventions, backend)`` gives the logit refusal score of every prompt
under each intervention (:mod:`mech.interventions` values: :class:`~mech.interventions.Ablate`,
:class:`~mech.interventions.ProjectOut`, :class:`~mech.interventions.AddVector`; ``None`` for none), as
``[n_interventions, n_prompts]`` float32 on the CPU. The backends give the same numbers to float32 round-off
(≤ 2e-4 absolute on the log-odds, tested on tiny models and the default model):

* ``"hooks"`` — one hooked forward per intervention (:func:`last_logits_under`), with the prompts' shared token
  prefix run once: chat-formatted prompts start with the same tokens (the system prompt and the user turn's
  header: about half of each prompt for Qwen). An intervention that treats every position alike (directional
  ablation, activation addition, mean-ablation with the position-independent mean) changes that prefix the same
  way in every prompt, so its K/V is computed once (one row) and shared by the batch; only the rest of each prompt
  runs per row. Mean-ablation with end-aligned means uses the position-independent mean on the prefix
  (:meth:`~mech.interventions.Ablate.on_prefix`) and its usual mode on the rest; an ablation restricted to
  ``positions`` runs without a shared prefix (its positions count from each whole prompt).
* ``"batched"`` — interventions as rows of one batch on the partial-forward engine, the clean run once
  (:mod:`mech.set_scores`); ablations of one method, means and mode, without ``positions``.
* the Ray pool — :func:`mech.distributed.refusal_scores` is this function with a :class:`~mech.distributed.RayPool`
  in place of the model: the interventions are spread over its workers, each running this function.

Written here rather than taken from a library because neither transformers nor TransformerLens shares a prefix K/V
*under hooks* across a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from mech.chat import shared_prefix_len
from mech.interventions import Ablate, AddVector, Intervention, ProjectOut
from mech.refusal import check_refusal_ids, refusal_log_odds, vocab_size
from mech.set_scores import MIN_REST, ablation_set_scores, direction_set_scores

if TYPE_CHECKING:
    from mech.engine import Work
    from mech.models import LoadedModel

__all__ = ["BACKENDS", "Backend", "last_logits_under", "refusal_scores"]

Backend = Literal["hooks", "batched"]
BACKENDS: tuple[str, ...] = ("hooks", "batched")


def _phase(lm: LoadedModel, intervention: Intervention | None, prefix: bool) -> AbstractContextManager[object]:
    """The intervention on the shared prefix (``prefix``) or on the rest of each prompt."""
    if intervention is None:
        return nullcontext()
    if prefix and isinstance(intervention, Ablate):
        return intervention.on_prefix().apply(lm)
    return intervention.apply(lm)


@torch.inference_mode()
def last_logits_under(
    lm: LoadedModel, prompts: Sequence[str], intervention: Intervention | None = None, batch_size: int = 64,
    min_rest: int = MIN_REST,
) -> Tensor:
    """Next-token logits at each prompt's last position under ``intervention``: ``[n, d_vocab]`` float32 CPU.

    ``min_rest``: tokens each prompt keeps outside the shared prefix (≥ the end-aligned window of a mean)."""
    if not prompts:
        raise ValueError("last_logits_under needs at least one prompt")
    seqs = lm.encode_chat(list(prompts))
    positional = isinstance(intervention, Ablate) and intervention.positions is not None
    P = 0 if positional else shared_prefix_len(seqs, min_rest)
    dev = lm.input_device
    pad = lm.tokenizer.pad_token_id
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: little padding
    out = torch.empty(len(seqs), lm.shape.d_vocab)
    prefix = torch.tensor(seqs[0][:P], dtype=torch.long, device=dev)[None]
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        rest = [seqs[i][P:] for i in idx]
        B, S = len(rest), max(len(r) for r in rest)
        ids = torch.full((B, S), pad, dtype=torch.long)
        mask = torch.zeros(B, S, dtype=torch.long)
        for r, toks in enumerate(rest):
            ids[r, S - len(toks) :] = torch.tensor(toks)
            mask[r, S - len(toks) :] = 1
        pos = (P + mask.cumsum(-1) - 1).clamp(min=P)
        cache = None
        if P > 0:
            with _phase(lm, intervention, prefix=True):
                cache = lm.model(input_ids=prefix, position_ids=torch.arange(P, device=dev)[None], use_cache=True,
                                 logits_to_keep=1).cache
            cache.batch_repeat_interleave(B)
        full_mask = torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1)
        with _phase(lm, intervention, prefix=False):
            logits = lm.model(input_ids=ids.to(dev), attention_mask=full_mask.to(dev), position_ids=pos.to(dev),
                              cache=cache, use_cache=cache is not None, logits_to_keep=1).logits[:, -1]
        out[idx] = logits.float().cpu()
    return out


def _batched(
    lm: LoadedModel, prompts: Sequence[str], refusal_ids: Sequence[int], ivs: Sequence[Intervention | None],
    max_rows: int, progress: bool, work: Work | None,
) -> Tensor:
    """The engine backend: the ablations in one :func:`~mech.set_scores.ablation_set_scores` call, the direction
    interventions in one :func:`~mech.set_scores.direction_set_scores` call; ``None``: the clean scores."""
    abl = [i for i, iv in enumerate(ivs) if isinstance(iv, Ablate)]
    dirs = [i for i, iv in enumerate(ivs) if isinstance(iv, (ProjectOut, AddVector))]
    none = [i for i, iv in enumerate(ivs) if iv is None]
    out = torch.empty(len(ivs), len(prompts))
    clean: Tensor | None = None
    if abl:
        group = [iv for iv in ivs if isinstance(iv, Ablate)]
        first = group[0]
        if any(a.positions is not None or (a.method, a.mode) != (first.method, first.mode) or a.means is not first.means
               for a in group):
            raise ValueError("the batched backend scores ablations of one method, means and mode, without positions; "
                             "use backend='hooks' for the others")
        sets = [list(a.components) for a in group] + ([[]] if none else [])  # an empty set: the clean scores
        got = ablation_set_scores(lm, prompts, refusal_ids, sets, first.method, first.means, first.mode,
                                  max_rows=max_rows, progress=progress, work=work)
        out[abl] = got[: len(abl)]
        clean = got[-1] if none else None
    if dirs:
        r = direction_set_scores(lm, prompts, refusal_ids, [iv for iv in ivs if isinstance(iv, (ProjectOut, AddVector))],
                                 max_rows=max_rows, progress=progress, work=work)
        out[dirs] = r.scores
        clean = r.clean
    if none:
        if clean is None:  # only None: the clean run alone (an empty set runs no intervention)
            clean = ablation_set_scores(lm, prompts, refusal_ids, [[]], "zero", max_rows=max_rows, work=work)[0]
        out[none] = clean
    return out


def refusal_scores(
    lm: LoadedModel,
    prompts: Sequence[str],
    refusal_ids: Sequence[int],
    interventions: Sequence[Intervention | None],
    backend: Backend = "hooks",
    batch_size: int = 64,
    max_rows: int = 128,
    progress: bool = False,
    work: Work | None = None,
) -> Tensor:
    """The logit refusal score of each prompt under each intervention: ``[n_interventions, n_prompts]`` float32 CPU.

    ``interventions``: :mod:`mech.interventions` values (``None``: no intervention, the clean scores).
    ``backend``: ``"hooks"`` (``batch_size`` prompts per forward) or ``"batched"`` (``max_rows`` rows per partial
    forward; ``work`` receives what it computed); see the module doc. Bad input raises a one-line ValueError
    before any forward."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("refusal_scores needs a non-empty list of prompt texts")
    if isinstance(interventions, (Ablate, ProjectOut, AddVector)):
        raise ValueError("refusal_scores got a single intervention; pass a list of them")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use hooks or batched (or mech.distributed.refusal_scores)")
    ids = list(check_refusal_ids(refusal_ids, vocab_size(lm)))
    ivs = list(interventions)
    if not ivs:
        return torch.empty(0, len(prompts))
    if backend == "batched":
        return _batched(lm, prompts, ids, ivs, max_rows, progress, work)
    return torch.stack([refusal_log_odds(last_logits_under(lm, prompts, iv, batch_size), ids) for iv in ivs])
