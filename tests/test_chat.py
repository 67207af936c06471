"""mech.chat: chat formatting, left padding, and the post-instruction (template suffix) positions."""

from __future__ import annotations

import pytest
import torch

from mech.chat import TemplateError, format_chat, pad_left, post_instruction_positions, template_suffix_len
from mech.models import LoadedModel
from mech.registry import ModelError


def test_pad_left_aligns_ends_and_counts_real_positions():
    enc = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert enc["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert enc["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match="non-empty"):
        pad_left([[1], []], pad_id=0)


def test_format_chat_uses_the_template_and_needs_one(tiny_qwen2: LoadedModel):
    tok = tiny_qwen2.tokenizer
    text = format_chat(tok, "Hi?", system="Be brief.")
    assert text == tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        tokenize=False, add_generation_prompt=True)
    assert tiny_qwen2.format_chat("Hi?") == format_chat(tok, "Hi?")

    class NoTemplate:
        chat_template = None

    with pytest.raises(ModelError, match="no chat template"):
        format_chat(NoTemplate(), "Hi?", model_name="base-model")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_template_suffix_is_the_common_end_of_every_prompt(arch: str, request: pytest.FixtureRequest):
    lm: LoadedModel = request.getfixturevalue(f"tiny_{arch}")
    n = template_suffix_len(lm)
    assert post_instruction_positions(lm) == tuple(range(-n, 0))
    seqs = lm.encode_chat(["How do I bake bread?", "Tell me a joke about cats", "x"])
    assert len({tuple(s[-n:]) for s in seqs}) == 1  # the same n tokens end every prompt ...
    assert len({s[-n - 1] for s in seqs}) > 1  # ... and the token before them is the user's
    assert template_suffix_len(lm, system="Be brief.") == n


def test_a_template_without_a_common_suffix_is_an_error():
    class Plain:
        name = "plain"

        def encode_chat(self, prompts, system=None):
            return [[ord(c) for c in p] for p in prompts]

    with pytest.raises(TemplateError, match="plain: prompts share no template suffix"):
        template_suffix_len(Plain())  # type: ignore[arg-type]


def test_batch_pads_on_the_left_with_real_positions(tiny_qwen2: LoadedModel):
    enc = tiny_qwen2.batch(["a", "a much longer prompt than the first"])
    short = enc["attention_mask"][0]
    assert short[-1] == 1 and short[0] == 0 and int(enc["position_ids"][0, -1]) == int(short.sum()) - 1
    assert enc["input_ids"].device == tiny_qwen2.input_device and enc["input_ids"].dtype == torch.long
