"""Chat formatting: one user turn in the model's chat template, left padding, and the post-instruction positions.

The chat template ends every user turn with the same tokens (for Qwen, ``<|im_end|>\\n<|im_start|>assistant\\n``:
5 tokens). Those **post-instruction** tokens are identical in every prompt, so activations there are compared
end-aligned (negative indices from the end) although prompts differ in length:

1. :func:`template_suffix_len` finds their count once per model as the common token suffix of two probe
   prompts whose contents end differently;
2. :func:`post_instruction_positions` turns it into end-aligned indices ``(-n, ..., -1)``, the default positions
   of patching, mean-ablation and the refusal direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mech.registry import ModelError

if TYPE_CHECKING:
    from mech.models import LoadedModel

__all__ = ["format_chat", "pad_left", "post_instruction_positions", "shared_prefix_len", "template_suffix_len"]

# Two prompts whose last content tokens differ: whatever they share at the end is the template's.
_PROBES = ("Hello there", "What is 2 + 2?")


def format_chat(tokenizer: Any, prompt: str, system: str | None = None, model_name: str = "model") -> str:
    """One user turn (optionally after a system turn) in ``tokenizer``'s chat template, generation prompt added."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{model_name}: the tokenizer has no chat template; load an instruct/chat model or set "
            "tokenizer.chat_template before formatting prompts"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def pad_left(seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-pad token id lists into ``input_ids``, ``attention_mask`` and ``position_ids`` tensors."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("pad_left needs at least one non-empty sequence")
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, n - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}


class TemplateError(ValueError):
    """The chat template puts no common tokens after the user message: pass positions explicitly."""


def template_suffix_len(lm: LoadedModel, system: str | None = None) -> int:
    """How many tokens the chat template puts after every user message (5 for Qwen's
    ``<|im_end|>\\n<|im_start|>assistant\\n``): the common suffix of two probe prompts with different endings."""
    a, b = lm.encode_chat(list(_PROBES), system=system)
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    if n == 0:
        raise TemplateError(f"{getattr(lm, 'name', 'model')}: prompts share no template suffix; pass positions=")
    return n


def post_instruction_positions(lm: LoadedModel, system: str | None = None) -> tuple[int, ...]:
    """End-aligned indices of the chat template's post-instruction tokens, e.g. ``(-5, -4, -3, -2, -1)``."""
    return tuple(range(-template_suffix_len(lm, system), 0))


def shared_prefix_len(seqs: Sequence[Sequence[int]], min_rest: int) -> int:
    """Length of the token prefix every sequence shares (chat-formatted prompts share the system prompt and the
    user turn's header), leaving at least ``min_rest`` tokens in each."""
    n = min(len(s) for s in seqs) - min_rest
    first = seqs[0]
    for i in range(max(n, 0)):
        if any(s[i] != first[i] for s in seqs):
            return i
    return max(n, 0)
