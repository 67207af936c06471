"""Context and memory guard: before any forward, every prompt fits the model's context with the tokens it will
generate, and the longest batch fits in memory.

1. Chat-format and tokenize every prompt with the model's own tokenizer and template (:func:`prompt_lengths`;
   tokenizer only, no weights).
2. :func:`check_context`: prompt tokens + the most tokens any stage generates must not exceed the model's
   context (``max_position_embeddings``); the first row that does not fit is named. A prompt past the context
   runs with positions the model never saw (silently wrong), or, on a long-context model, grows memory until
   the kernel kills the run.
3. :func:`check_batch_memory`: :func:`mech.memory.estimate_memory` for ``batch`` rows of the longest prompt plus
   the generated tokens (weights, KV cache, one layer's activations and attention scores) against the memory this
   machine can give; more than 90% of it is refused in one line, before the model loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mech.chat import format_chat
from mech.memory import estimate_memory


class ContextError(ValueError):
    """A prompt or a batch that does not fit: one line naming the row or the sizes, and the fix."""


@dataclass(frozen=True)
class PromptLength:
    """One prompt's chat-formatted token count and where it came from (``source`` ``row`` ``id``)."""

    source: str
    row: int
    id: str
    tokens: int


def context_length(config: Any) -> int | None:
    """The model's context in tokens (``max_position_embeddings``, else ``n_positions`` / ``seq_length``)."""
    cfg = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def prompt_lengths(tokenizer: Any, rows: Sequence[tuple[str, int, str, str]], model_name: str = "model"
                   ) -> list[PromptLength]:
    """Token counts of ``rows`` (source, 1-based row, id, prompt text) in the model's chat template."""
    out = []
    for source, row, pid, text in rows:
        ids = tokenizer(format_chat(tokenizer, text, model_name=model_name), add_special_tokens=False)["input_ids"]
        out.append(PromptLength(source, row, pid, len(ids)))
    return out


def check_context(lengths: Sequence[PromptLength], new_tokens: int, context: int | None, model_name: str,
                  what_new: str = "--max-new-tokens") -> None:
    """Raise :class:`ContextError` for the longest prompt whose tokens plus ``new_tokens`` exceed ``context``."""
    if context is None or not lengths:
        return
    if new_tokens >= context:
        raise ContextError(f"{what_new} {new_tokens} is not below the context of {model_name} ({context} tokens): "
                           f"no prompt would fit; use a value well below {context}, e.g. 64")
    worst = max(lengths, key=lambda p: p.tokens)
    if worst.tokens + new_tokens > context:
        n_over = sum(p.tokens + new_tokens > context for p in lengths)
        raise ContextError(
            f"{worst.source}: row {worst.row} (id {worst.id!r}) is {worst.tokens} tokens in the chat template; with "
            f"{new_tokens} generated ({what_new}) it exceeds the context of {model_name} ({context} tokens)"
            + (f", and {n_over - 1} more row(s) do too" if n_over > 1 else "")
            + f"; shorten it to under {max(context - new_tokens, 0)} tokens or remove it")


def check_batch_memory(config: Any, lengths: Sequence[PromptLength], new_tokens: int, batch: int, dtype: str,
                       quantize: str, budget_bytes: float, budget_what: str, model_name: str) -> Any:
    """The :class:`mech.memory.MemoryEstimate` of the longest batch (``batch`` rows padded to the longest prompt
    plus ``new_tokens``), or :class:`ContextError` when it exceeds 90% of ``budget_bytes``."""
    if not lengths:
        return None
    cfg = getattr(config, "text_config", None) or config
    worst = max(lengths, key=lambda p: p.tokens)
    rows = min(batch, len(lengths))
    seq = worst.tokens + new_tokens
    est = estimate_memory(cfg, dtype, quantize, batch=rows, seq_len=seq)
    if not est.fits(budget_bytes):
        raise ContextError(
            f"{model_name}: the longest batch ({rows} prompts x {seq} tokens, padded to {worst.source} row "
            f"{worst.row}, id {worst.id!r}) needs about {est.total / 1e9:.1f} GB but there are "
            f"{budget_bytes / 1e9:.1f} GB ({budget_what}; 90% usable); shorten that prompt, lower "
            "--max-new-tokens, or use --quantize 4bit / a machine with more memory")
    return est
