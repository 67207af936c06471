"""mech.scoring: refusal scores under an intervention with the shared prompt prefix run once must equal a plain
left-padded batched forward (float32 round-off), for every kind of intervention the suite's nulls use."""

from __future__ import annotations

import pytest
import torch

from mech.ablation import ablate, mean_activations
from mech.directions import activation_addition, directional_ablation
from mech.prompts import default_pairs
from mech.refusal import last_logits
from mech.scoring import (
    ablation_intervention,
    last_logits_under,
    same_everywhere,
    scores_under,
    shared_prefix_len,
)

PROMPTS = default_pairs().harmful().texts()[:7] + default_pairs().harmless().texts()[:5]
ATOL = 2e-4  # float32 round-off of a different (but equivalent) order of operations


def test_shared_prefix_len_leaves_the_rest():
    assert shared_prefix_len([[1, 2, 3, 4, 5], [1, 2, 3, 9, 9, 9]], min_rest=1) == 3
    assert shared_prefix_len([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]], min_rest=3) == 2
    assert shared_prefix_len([[1, 2], [3, 4]], min_rest=1) == 0


def _cases(lm):
    g = torch.Generator().manual_seed(0)
    d = torch.randn(lm.shape.d_model, generator=g, dtype=torch.float64)
    means = mean_activations(lm, PROMPTS[7:], kinds=("head", "mlp"))
    heads = ["L0.H1", "L1.H0", "L1.H3"] if lm.shape.n_heads > 3 else ["L0.H0", "L1.H1"]
    return {
        "none": (None, None),
        "mean heads end-aligned": (lambda: ablate(lm, heads, "mean", means), ablation_intervention(lm, heads, "mean", means)),
        "zero mlp": (lambda: ablate(lm, ["L1.mlp"], "zero"), ablation_intervention(lm, ["L1.mlp"], "zero")),
        "directional ablation": (lambda: directional_ablation(lm, d),
                                 same_everywhere(lambda: directional_ablation(lm, d))),
        "activation addition": (lambda: activation_addition(lm, d * 3, 1),
                                same_everywhere(lambda: activation_addition(lm, d * 3, 1))),
    }


@pytest.mark.parametrize("case", ["none", "mean heads end-aligned", "zero mlp", "directional ablation",
                                  "activation addition"])
def test_equals_a_plain_forward(tiny_model, case):
    plain_ctx, iv = _cases(tiny_model)[case]
    if plain_ctx is None:
        want = last_logits(tiny_model, PROMPTS, batch_size=5)
    else:
        with plain_ctx():
            want = last_logits(tiny_model, PROMPTS, batch_size=5)
    got = last_logits_under(tiny_model, PROMPTS, iv, batch_size=4)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_hooks_removed_and_scores_shape(tiny_qwen2, hook_count):
    before = hook_count(tiny_qwen2.model)
    s = scores_under(tiny_qwen2, PROMPTS, [5, 6], ablation_intervention(tiny_qwen2, ["L0.H0"], "zero"))
    after = hook_count(tiny_qwen2.model)
    assert s.shape == (len(PROMPTS),) and torch.isfinite(s).all() and before == after
    with pytest.raises(ValueError, match="at least one prompt"):
        last_logits_under(tiny_qwen2, [])


@pytest.mark.realmodel
@pytest.mark.slow
def test_equals_a_plain_forward_on_the_default_model(lm):
    """Shared-prefix scores equal the plain forward on the real model under mean-ablation of heads (the H1/H3
    null) and directional ablation (the H4 control)."""
    prompts = default_pairs().harmful().texts()[:12]
    means = mean_activations(lm, default_pairs().harmless().texts()[:8], kinds=("head",))
    heads = ["L14.H13", "L12.H2", "L3.H1", "L20.H2"]
    d = torch.randn(lm.shape.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert shared_prefix_len(lm.encode_chat(prompts), 8) >= 20  # the system prompt is shared
    with ablate(lm, heads, "mean", means):
        want = last_logits(lm, prompts)
    got = last_logits_under(lm, prompts, ablation_intervention(lm, heads, "mean", means))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    with directional_ablation(lm, d):
        want = last_logits(lm, prompts)
    got = last_logits_under(lm, prompts, same_everywhere(lambda: directional_ablation(lm, d)))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
