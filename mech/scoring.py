"""Refusal scores of many prompts under an intervention, with the prompts' shared token prefix run once.

Chat-formatted prompts start with the same tokens (the system prompt and the user turn's header: about half
of each prompt for Qwen). An intervention that treats every position alike (directional ablation,
activation addition, mean-ablation with the position-independent mean) changes that prefix the same way
in every prompt, so its K/V is computed once (one row) and shared by the batch; only the rest of each
prompt runs per row. The random-control nulls run hundreds of such interventions on the same prompts, so
this halves their cost. :func:`scores_under` gives the same numbers as a plain batched forward (tested to
float32 round-off on tiny models and the default model).

An intervention is a callable ``phase -> context manager`` with ``phase`` ``"prefix"`` (the shared one-row
forward) or ``"rest"`` (the per-prompt forward). Mean-ablation whose last positions use end-aligned means
must use the position-independent mean on the prefix (``mode="averaged"``) and its usual mode on the rest;
see :func:`ablation_intervention`. Written here rather than taken from a library because neither
transformers nor TransformerLens shares a prefix K/V *under hooks* across a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from mech.ablation import ablate
from mech.refusal import refusal_log_odds

if TYPE_CHECKING:
    from mech.ablation import MeanActivations
    from mech.components import Component
    from mech.interventions import AblationMethod, MeanMode
    from mech.models import LoadedModel

Phase = Literal["prefix", "rest"]
Intervention = Callable[[Phase], AbstractContextManager[Any]]


def shared_prefix_len(seqs: Sequence[Sequence[int]], min_rest: int) -> int:
    """Length of the token prefix every sequence shares, leaving at least ``min_rest`` tokens in each."""
    n = min(len(s) for s in seqs) - min_rest
    first = seqs[0]
    for i in range(max(n, 0)):
        if any(s[i] != first[i] for s in seqs):
            return i
    return max(n, 0)


def ablation_intervention(lm: LoadedModel, components: Sequence[Component | str], method: AblationMethod,
                          means: MeanActivations | None = None, mode: MeanMode = "end_aligned") -> Intervention:
    """:func:`mech.ablation.ablate` as an intervention: on the shared prefix the position-independent mean."""
    def make(phase: Phase) -> AbstractContextManager[Any]:
        return ablate(lm, components, method, means, "averaged" if phase == "prefix" else mode)

    return make


def same_everywhere(make: Callable[[], AbstractContextManager[Any]]) -> Intervention:
    """An intervention that treats every position alike (directional ablation, activation addition)."""
    return lambda phase: make()


@torch.inference_mode()
def last_logits_under(
    lm: LoadedModel, prompts: Sequence[str], intervention: Intervention | None = None, batch_size: int = 64, min_rest: int = 8
) -> Tensor:
    """Next-token logits at each prompt's last position under ``intervention``: ``[n, d_vocab]`` float32 CPU.

    ``min_rest``: tokens each prompt keeps outside the shared prefix (≥ the end-aligned window of a mean)."""
    if not prompts:
        raise ValueError("last_logits_under needs at least one prompt")
    iv = intervention or (lambda phase: nullcontext())
    seqs = lm.encode_chat(list(prompts))
    P = shared_prefix_len(seqs, min_rest)
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
            with iv("prefix"):
                cache = lm.model(input_ids=prefix, position_ids=torch.arange(P, device=dev)[None], use_cache=True,
                                 logits_to_keep=1).cache
            cache.batch_repeat_interleave(B)
        full_mask = torch.cat([torch.ones(B, P, dtype=torch.long), mask], 1)
        with iv("rest"):
            logits = lm.model(input_ids=ids.to(dev), attention_mask=full_mask.to(dev), position_ids=pos.to(dev),
                              cache=cache, use_cache=cache is not None, logits_to_keep=1).logits[:, -1]
        out[idx] = logits.float().cpu()
    return out


def scores_under(
    lm: LoadedModel, prompts: Sequence[str], refusal_ids: Sequence[int], intervention: Intervention | None = None,
    batch_size: int = 64,
) -> Tensor:
    """The logit refusal score of each prompt under ``intervention``, ``[n]`` float32 (CPU)."""
    return refusal_log_odds(last_logits_under(lm, prompts, intervention, batch_size), refusal_ids)
