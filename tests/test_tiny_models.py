"""The tiny locally built chat models used by the machinery tests: tokenizers, templates, forward passes."""

from __future__ import annotations

import pytest
import torch

from fixtures.tiny_models import TINY_ARCHS, TOKENIZER_STYLES, build_tiny_model, build_tokenizer
from mech.models import LoadedModel, ModelShape

PROMPTS = ("How do I build a bomb?", "Write a poem about the sea, in French, with rhymes.")

# The post-instruction tokens each template puts after the user's message (identical across prompts).
SUFFIX = {
    "qwen2": ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"],
    "llama": ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"],
    "gemma": ["<end_of_turn>", "Ċ", "<start_of_turn>", "model", "Ċ"],
}
GENERATION_PROMPT = {
    "qwen2": "<|im_start|>assistant\n",
    "llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<start_of_turn>model\n",
}
SPECIALS = {
    "chatml": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "llama3": (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ),
    "gemma": ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"),
}


@pytest.fixture(scope="module")
def tiny_by_arch() -> dict[str, LoadedModel]:
    return {arch: build_tiny_model(arch) for arch in TINY_ARCHS}


@pytest.fixture(params=TINY_ARCHS, ids=TINY_ARCHS)
def lm(request: pytest.FixtureRequest, tiny_by_arch: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_by_arch[request.param]


# ------------------------------------------------------------------------------------------ tokenizers


@pytest.mark.parametrize("style", TOKENIZER_STYLES)
def test_tokenizer_covers_any_text_with_single_token_specials(style: str) -> None:
    tok = build_tokenizer(style)
    assert 300 <= len(tok) <= 600
    assert tok.padding_side == "left"
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert tok.eos_token_id is not None
    for s in SPECIALS[style]:
        assert tok(s, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(s)]
        assert tok.convert_tokens_to_ids(s) in tok.all_special_ids
    assert len(tok("\n", add_special_tokens=False)["input_ids"]) == 1
    for word in ("I", "As", " sorry", " can't", " help", " bomb", " shed"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) <= 2, word
    text = 'Zebras quietly judge 12345 héllo 日本語 🙂\ttabs\r\n and "quotes" — done.\n\n'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("style", TOKENIZER_STYLES)
def test_tokenizer_is_deterministic(style: str) -> None:
    a, b = build_tokenizer(style), build_tokenizer(style)
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_unknown_style_and_arch_are_errors() -> None:
    with pytest.raises(ValueError, match="style"):
        build_tokenizer("t5")
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model("gpt2")


# ------------------------------------------------------------------------------------------- templates


def test_chat_template_formats_a_user_turn(lm: LoadedModel) -> None:
    arch = lm.shape.arch
    text = lm.format_chat(PROMPTS[0])
    assert PROMPTS[0] in text
    assert text.endswith(GENERATION_PROMPT[arch])
    with_system = lm.format_chat(PROMPTS[0], system="Be brief.")
    assert "Be brief." in with_system and with_system.endswith(GENERATION_PROMPT[arch])


def test_chatml_default_system_prompt(tiny_by_arch: dict[str, LoadedModel]) -> None:
    lm = tiny_by_arch["qwen2"]
    assert lm.format_chat("hi") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert lm.format_chat("hi", system="S").startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n")


def test_encode_chat_shares_the_post_instruction_suffix(lm: LoadedModel) -> None:
    a, b = lm.encode_chat(list(PROMPTS))
    unk = lm.tokenizer.unk_token_id
    for ids in (a, b):
        assert unk is None or unk not in ids
        assert all(0 <= i < lm.shape.d_vocab for i in ids)
    assert a[-5:] == b[-5:]
    assert a[-6] != b[-6]
    assert lm.tokenizer.convert_ids_to_tokens(a[-5:]) == SUFFIX[lm.shape.arch]
    assert lm.tokenizer.decode(a) == lm.format_chat(PROMPTS[0])


# ---------------------------------------------------------------------------------------------- models


def test_shape_and_flags_match_the_config(lm: LoadedModel) -> None:
    cfg = lm.model.config
    assert lm.shape == ModelShape.from_config(cfg)
    assert (lm.shape.n_layers, lm.shape.d_model, lm.shape.n_heads, lm.shape.n_kv_heads) == (3, 64, 4, 2)
    assert (lm.shape.d_head, lm.shape.d_mlp, lm.shape.d_vocab) == (16, 128, len(lm.tokenizer))
    assert lm.name == f"tiny-{lm.shape.arch}"
    assert lm.fingerprint == f"tiny-{lm.shape.arch}-0-3x64"
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert cfg._attn_implementation == "eager"
    assert cfg.tie_word_embeddings == (lm.shape.arch != "llama")


def test_left_padded_batch_matches_single_prompts(lm: LoadedModel) -> None:
    texts = [lm.format_chat(p) for p in PROMPTS]
    enc = lm.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = lm.model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos).logits[:, -1]
        for i, ids in enumerate(lm.encode_chat(list(PROMPTS))):
            single = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(batch[i], single, atol=1e-5, rtol=0)


def test_logits_are_not_degenerate(lm: LoadedModel) -> None:
    with torch.no_grad():
        last = [
            lm.model(input_ids=torch.tensor([ids])).logits[0, -1] for ids in lm.encode_chat(list(PROMPTS))
        ]
    for logits in last:
        assert torch.isfinite(logits).all()
        assert logits.std() > 0.5
    lp = [x.log_softmax(-1) for x in last]
    assert (lp[0] - lp[1]).abs().max() > 0.5


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_build_is_deterministic_under_seed(arch: str, tiny_by_arch: dict[str, LoadedModel]) -> None:
    a = tiny_by_arch[arch].model.state_dict()
    b = build_tiny_model(arch, seed=0).model.state_dict()
    c = build_tiny_model(arch, seed=1).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_custom_sizes() -> None:
    lm = build_tiny_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_mlp=48)
    assert (lm.shape.n_layers, lm.shape.d_model, lm.shape.n_kv_heads, lm.shape.d_head, lm.shape.d_mlp) == (
        2,
        32,
        4,
        8,
        48,
    )
    assert lm.fingerprint == "tiny-llama-0-2x32"
    assert len(lm.model.model.layers) == 2


def test_greedy_generation_runs(lm: LoadedModel) -> None:
    ids = torch.tensor([lm.encode_chat([PROMPTS[0]])[0]])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and ids.shape[1] < out.shape[1] <= ids.shape[1] + 4
    assert torch.equal(out[0, : ids.shape[1]], ids[0])


def test_build_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("qwen2", seed=7)
    assert torch.equal(torch.rand(3), expected)
