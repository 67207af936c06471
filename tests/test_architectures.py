"""The architecture registry: every registered family's tiny model resolves every hook point through its entry;
unknown model types fail in one line; registration is checked."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from fixtures.tiny_models import TINY_ARCHS, build_tiny_model, build_tokenizer
from mech.architectures import (
    ARCHITECTURES,
    Architecture,
    ArchitectureError,
    architecture,
    architecture_of,
    register_architecture,
    supported_model_types,
    unregister_architecture,
)
from mech.hooks import HookError, all_hook_names, decoder_layers, resolve
from mech.models import ModelError, ModelShape, load_model


def test_every_tiny_model_is_named_by_its_entry():
    named = {a.tiny_model for a in ARCHITECTURES.values() if a.tiny_model}
    assert named == set(TINY_ARCHS), "each tiny model belongs to one registered family and back"
    assert {"qwen2", "llama"} <= set(supported_model_types())  # the registry's models (qwen2.5-coder, smollm2)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_the_entry_resolves_every_hook_point(arch):
    lm = build_tiny_model(arch, n_layers=2)
    a = architecture_of(lm)
    assert a is architecture(arch) is architecture_of(lm.model) is architecture_of(lm.model.model)  # LM or base
    layers = decoder_layers(lm.model)
    assert len(layers) == 2 and layers is a.decoder_layers(lm.model.model)
    for name in all_hook_names(lm.model):
        p = resolve(lm, name)
        block = layers[p.layer]
        expected = {"hook_resid_pre": block, "hook_resid_post": block, "attn.hook_z": a.attn_out_proj(block),
                    "hook_attn_out": a.attention(block), "mlp.hook_post": a.mlp_out_proj(block),
                    "hook_mlp_out": a.mlp_module(block)}[p.kind]
        assert p.module is expected, name
    assert a.final_norm_of(lm.model) is lm.model.model.norm and a.rotary_of(lm.model) is lm.model.model.rotary_emb
    assert ModelShape.from_config(lm.model.config).n_heads == lm.model.config.num_attention_heads


def test_unknown_model_type_is_one_line(tiny_qwen2):
    with pytest.raises(ArchitectureError, match=r"^unsupported model_type 'phi9'; supported: gemma, llama, mistral, "
                                                r"qwen2, qwen3 \(register"):
        architecture("phi9")
    fake = type("M", (), {"config": type("C", (), {"model_type": "phi9"})()})()
    with pytest.raises(HookError, match="unsupported model_type 'phi9'"):  # the hooks' own error type
        decoder_layers(fake)
    with pytest.raises(ArchitectureError, match="has no config.model_type"):
        architecture_of(object())


def test_registration_is_checked_and_undone():
    with pytest.raises(ArchitectureError, match="already registered"):
        register_architecture(Architecture("qwen2", tiny_model="qwen2"))
    with pytest.raises(TypeError):
        register_architecture("qwen2")  # type: ignore[arg-type]
    with pytest.raises(ArchitectureError, match="needs a model_type"):
        Architecture("", tiny_model=None)
    alias = dataclasses.replace(architecture("llama"), model_type="my_llama", tiny_model=None)
    register_architecture(alias)
    try:
        assert architecture("my_llama").attn_out == "o_proj" and "my_llama" in supported_model_types()
    finally:
        unregister_architecture("my_llama")
    assert "my_llama" not in ARCHITECTURES
    with pytest.raises(ArchitectureError, match="not registered"):
        unregister_architecture("my_llama")


def test_loading_an_unregistered_model_type_is_one_line(tmp_path):
    """A real HF family without an entry (Phi-3, saved locally) stops at load with a ModelError naming the
    supported types, not at the first hook."""
    tok = build_tokenizer("chatml")
    cfg = transformers.Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"unsupported model_type 'phi3'; supported: gemma, llama, mistral, qwen2"):
        load_model(str(tmp_path), device="cpu", dtype="float32", cache_dir=tmp_path / "cache")
