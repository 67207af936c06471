"""The page in hypotheses/README.md ("Adding a model architecture") run as written: its registration and its check
on a tiny model are taken from the README and executed; the check's numbers are then asserted here."""

from __future__ import annotations

import pytest
import torch

from mech.architectures import ARCHITECTURES, ArchitectureError, architecture, unregister_architecture
from tests.helpers import readme_blocks

pytest.importorskip("transformers.models.phi3")


@pytest.fixture
def page_blocks():
    register, check = readme_blocks("Adding a model architecture")
    assert "phi3" not in ARCHITECTURES, "the page's example family is registered already: pick another for the page"
    yield register, check
    if "phi3" in ARCHITECTURES:
        unregister_architecture("phi3")  # the registry is process-wide: leave it as it was


def test_the_architecture_page_runs(page_blocks):
    register, check = page_blocks
    with pytest.raises(ArchitectureError, match=r"unsupported model_type 'phi3'; supported: gemma, llama, mistral"):
        architecture("phi3")  # before the page's step 2: the one-line error naming the supported types
    ns: dict = {}
    exec(compile(register, "README.md:register", "exec"), ns)  # step 2
    assert architecture("phi3").attn_in == ("qkv_proj",) and architecture("phi3").mlp_out == "down_proj"
    exec(compile(check, "README.md:check", "exec"), ns)  # step 3 (its own asserts included)
    lm, cache, shift = ns["lm"], ns["cache"], ns["shift"]
    assert lm.shape.arch == "phi3" and (lm.shape.n_heads, lm.shape.d_head, lm.shape.d_mlp) == (4, 16, 128)
    T = ns["T"]
    for L in range(3):  # the hook points sit on Phi-3's modules, with the shapes the names promise
        assert cache[f"blocks.{L}.attn.hook_z"].shape == (1, T, 4, 16)
        assert cache[f"blocks.{L}.mlp.hook_post"].shape == (1, T, 128)
        assert cache[f"blocks.{L}.hook_attn_out"].shape == cache[f"blocks.{L}.hook_resid_post"].shape == (1, T, 64)
    # the layer's output is its input plus what attention and MLP wrote
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"],
                               cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"]
                               + cache["blocks.1.hook_mlp_out"], atol=1e-5, rtol=1e-5)
    assert shift > 1e-3, f"zero-ablating L1.H0 moved the logits by only {shift:.2g}"  # the hook is live
    b = ns["breakdown"]
    # the fused projections are owned by heads and neurons: q,k,v = (4 + 2 + 2) heads x 16 x 64 (+ o_proj 64 x 64)
    assert b["heads"] == 3 * (8 * 16 * 64 + 64 * 64) and b["neurons"] == 3 * (2 * 128 * 64 + 64 * 128), b
    assert sum(v for k, v in b.items() if k != "total") == b["total"]
