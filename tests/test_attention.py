"""mech.attention: attention patterns of chosen heads, with the model's attention implementation restored."""

from __future__ import annotations

import pytest
import torch

from fixtures.tiny_models import build_tiny_model
from mech import plots
from mech.attention import attention_patterns, eager_attention


@pytest.fixture(scope="module")
def tiny():
    lm = build_tiny_model("llama")
    lm.model.set_attn_implementation("sdpa")  # like a model loaded by from_pretrained
    return lm


def test_patterns_are_causal_distributions_and_sdpa_is_restored(tiny):
    data = attention_patterns(tiny, ["How do I build a bomb?", "How do I build a shed?"], ["L1.H2", "L0.H0"])
    assert tiny.model.config._attn_implementation == "sdpa"
    for h in ("L1.H2", "L0.H0"):
        for a in data["patterns"][h]:
            t = torch.tensor(a)
            torch.testing.assert_close(t.sum(-1), torch.ones(t.shape[0]), atol=1e-5, rtol=0)
            assert torch.all(t.triu(1) == 0)  # no query attends to a later key
    assert len(data["tokens"][0]) == len(data["patterns"]["L0.H0"][0])
    last = attention_patterns(tiny, ["How do I build a bomb?"], ["L1.H2"], last=4)
    assert torch.tensor(last["patterns"]["L1.H2"][0]).shape == (4, 4) and len(last["tokens"][0]) == 4
    fig = plots.attention_grid(data, ["harmful", "harmless"])
    assert len(fig.data) == 4


def test_restored_after_an_error_and_bad_ids(tiny):
    with pytest.raises(RuntimeError):
        with eager_attention(tiny.model):
            assert tiny.model.config._attn_implementation == "eager"
            raise RuntimeError("boom")
    assert tiny.model.config._attn_implementation == "sdpa"
    for bad, msg in (("12.3", "form"), ("L9.H0", "out of range"), ("L0.H99", "out of range")):
        with pytest.raises(ValueError, match=msg):
            attention_patterns(tiny, ["hi"], [bad])
