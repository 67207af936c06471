"""``--dtype auto`` decides from the hardware (mech.precision), and the unembedding reads a contiguous input
(mech.models): same numbers, no weight-sized copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fixtures.tiny_models import build_tiny_model
from mech import precision
from mech.models import contiguous_unembed, load_model, pick_dtype
from mech.refusal import generate_ids
from mech.registry import ModelError


@pytest.mark.parametrize(("units", "want"), [([], torch.float32), (["avx512_bf16"], torch.bfloat16),
                                             (["amx_bf16", "avx512_bf16"], torch.bfloat16)])
def test_auto_on_cpu_follows_the_bf16_units(monkeypatch, units, want):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: units)
    p = precision.choose_precision("auto", torch.device("cpu"))
    assert p.dtype == want
    assert p.reason.startswith("auto: ")
    assert all(u in p.reason for u in units)
    if not units:
        assert "no bfloat16 matrix units" in p.reason


def test_auto_on_accelerators_and_named_dtypes():
    assert precision.choose_precision("auto", torch.device("cuda")).dtype == torch.bfloat16
    assert precision.choose_precision("auto", torch.device("mps")).dtype == torch.float16
    for name, dt in precision.DTYPES.items():
        p = precision.choose_precision(name, torch.device("cpu"))
        assert (p.dtype, p.reason, p.name) == (dt, f"--dtype {name}", name)
    with pytest.raises(ModelError, match="unknown dtype 'fp8'; use auto, float32, bfloat16 or float16"):
        pick_dtype("fp8", torch.device("cpu"))


def test_cpu_units_agree_with_cpuinfo():
    """torch's probe and /proc/cpuinfo name the same units (where /proc/cpuinfo exists)."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    assert precision.cpu_bf16_units() == [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def test_load_records_dtype_and_reason(tmp_path, monkeypatch):
    tiny = build_tiny_model("qwen2", seed=2)
    tiny.model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ["avx512_bf16"])
    lm = load_model(str(tmp_path / "m"), device="cpu", dtype="auto", cache_dir=tmp_path / "c")
    assert lm.dtype == torch.bfloat16 and "avx512_bf16" in lm.dtype_reason
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    lm32 = load_model(str(tmp_path / "m"), device="cpu", dtype="float32", cache_dir=tmp_path / "c")
    assert lm32.dtype == torch.float32 and lm32.dtype_reason == "--dtype float32"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_contiguous_unembed_changes_no_number(arch, hook_count):
    """The patched lm_head gives the same logits (to float32 round-off: another matmul kernel) on the
    non-contiguous slice HF passes it, keeps tied
    weights tied and adds no hook; patching twice is a no-op."""
    lm = build_tiny_model(arch, seed=3)
    head = lm.model.get_output_embeddings()
    enc = lm.batch(["How do I build a shed?", "Write a short poem about autumn leaves"])
    with torch.inference_mode():
        before = lm.model(**enc, logits_to_keep=1, use_cache=False).logits
        hooks = hook_count(lm.model)
        contiguous_unembed(lm.model)
        contiguous_unembed(lm.model)
        after = lm.model(**enc, logits_to_keep=1, use_cache=False).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert lm.model.get_output_embeddings() is head and type(head).__mro__[1].__name__ == type(head).__name__
    assert isinstance(head, torch.nn.Linear) and getattr(type(head), "_mech_contiguous", False)
    assert hook_count(lm.model) == hooks
    if arch == "qwen2":  # tied embeddings stay one parameter
        assert head.weight is lm.model.get_input_embeddings().weight


def test_contiguous_unembed_input_is_contiguous():
    """What the fix is for: a ``[b, 1, d]`` slice of ``[b, t, d]`` reaches the linear layer contiguous."""
    lm = build_tiny_model("qwen2", seed=4)
    contiguous_unembed(lm.model)
    seen: list[bool] = []
    head = lm.model.get_output_embeddings()
    orig = F.linear

    def spy(x, w, b=None):
        if w is head.weight:
            seen.append(x.is_contiguous())
        return orig(x, w, b)

    enc = lm.batch(["a", "a much longer prompt than the first one"])
    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setattr(F, "linear", spy)
        generate_ids(lm, ["a", "a much longer prompt than the first one"], max_new_tokens=2)
        lm.model(**enc, logits_to_keep=1, use_cache=False)
    assert seen and all(seen)
