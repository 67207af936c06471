"""Attention patterns of chosen heads, for figures of what the top components attend to.

HF models under ``sdpa`` attention do not return attention weights; :func:`attention_patterns` switches the
model to ``eager`` attention for one forward and restores the original implementation afterwards, also on
error (no weight is touched).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mech.models import LoadedModel

_HEAD = re.compile(r"^L(\d+)\.H(\d+)$")


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Run ``model`` with eager attention inside the block (so ``output_attentions=True`` works)."""
    before = getattr(model.config, "_attn_implementation", None)
    if before == "eager" or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@torch.inference_mode()
def attention_patterns(lm: LoadedModel, prompts: Sequence[str], heads: Sequence[str], last: int | None = None) -> dict[str, Any]:
    """Attention weights of ``heads`` (ids ``"L12.H3"``) on each prompt, alone (no padding).

    Returns ``{"heads": [...], "prompts": [...], "tokens": [[str]], "patterns": {head: [[q][k] per prompt]}}``;
    with ``last``, only the last ``last`` query and key positions are kept (the template's end, where the
    refusal decision is read).
    """
    parsed = []
    for h in heads:
        m = _HEAD.match(h)
        if not m:
            raise ValueError(f"head id {h!r} is not of the form L<layer>.H<head> (e.g. L12.H3)")
        layer, head = int(m.group(1)), int(m.group(2))
        if not (0 <= layer < lm.shape.n_layers and 0 <= head < lm.shape.n_heads):
            raise ValueError(f"head {h} out of range: the model has {lm.shape.n_layers} layers x {lm.shape.n_heads} heads")
        parsed.append((layer, head))
    out: dict[str, Any] = {"heads": list(heads), "prompts": list(prompts), "tokens": [], "patterns": {h: [] for h in heads}}
    with eager_attention(lm.model):
        for p in prompts:
            enc = lm.batch([p])
            res = lm.model(**enc, output_attentions=True, use_cache=False, logits_to_keep=1)
            ids = enc["input_ids"][0].tolist()
            sl = slice(-last, None) if last else slice(None)
            out["tokens"].append([lm.tokenizer.decode([t]) for t in ids][sl])
            for h, (layer, head) in zip(heads, parsed, strict=True):
                a = res.attentions[layer][0, head].float()
                out["patterns"][h].append(a[sl, sl].cpu().tolist())
    return out
