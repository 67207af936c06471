"""Memory estimates (mech.memory) against what loaded models really store, in float32, 8-bit and 4-bit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fixtures.tiny_models import build_tiny_model
from mech.memory import PRESETS, estimate_memory, parameter_counts, stored_bytes
from mech.models import load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    # dims that are multiples of bitsandbytes' 64-weight blocks, untied embeddings like Llama-3
    tiny = build_tiny_model("llama", n_layers=2, d_model=256, n_heads=4, n_kv_heads=2, d_mlp=512)
    d = tmp_path_factory.mktemp("tiny-llama-mem")
    tiny.model.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("quantize", ["none", "8bit", "4bit"])
def test_estimate_equals_stored_bytes(saved, quantize):
    lm = load_model(str(saved), device="cpu", dtype="float32", quantize=quantize)
    est = estimate_memory(lm.model.config, "float32", quantize)
    assert est.n_params == sum(p.numel() for p in build_tiny_model("llama", n_layers=2, d_model=256, n_heads=4,
                                                                    n_kv_heads=2, d_mlp=512).model.parameters())
    assert est.weights == stored_bytes(lm.model)


def test_quantization_shrinks_the_decoder_weights(saved):
    f32, b8, b4 = (estimate_memory(PRESETS["llama-3-8b-instruct"], "bfloat16", q) for q in ("none", "8bit", "4bit"))
    assert f32.n_params == pytest.approx(8.03e9, rel=0.01)  # Llama-3-8B
    assert b4.weights < b8.weights < f32.weights
    # the documented budget: bf16 Llama-3-8B does not fit 16 GB, 4-bit does with room to spare
    assert not f32.fits(16e9) and b4.fits(16e9) and b4.total < 7e9


def test_bad_arguments_are_one_line_errors():
    for kw, msg in ((dict(config="gpt-5"), "unknown preset"), (dict(config="llama-3-8b-instruct", dtype="int3"),
                    "unknown dtype"), (dict(config="llama-3-8b-instruct", quantize="2bit"), "unknown quantize")):
        with pytest.raises(ValueError, match=msg):
            estimate_memory(**kw)


def test_cli_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "mech", "memory", "--budget-gb", "16"], capture_output=True,
                         text=True, check=True).stdout
    assert "llama-3-8b-instruct" in out and "4bit" in out and "fits 16 GB" in out


@pytest.mark.realmodel
def test_default_model_parameter_count(lm):
    """The estimate counts the default model's parameters exactly (embeddings and the untied lm_head too)."""
    unique = {id(p): p for p in lm.model.parameters()}
    assert parameter_counts(lm.model.config)["linear"] + parameter_counts(lm.model.config)["other"] == sum(
        p.numel() for p in unique.values())
    if lm.quantize == "none":
        assert estimate_memory(lm.model.config, str(lm.dtype).removeprefix("torch.")).weights == stored_bytes(lm.model)
