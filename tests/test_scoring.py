"""mech.scoring: refusal scores under an intervention with the shared prompt prefix run once must equal a plain
left-padded batched forward (float32 round-off), for every kind of intervention the suite's nulls use."""

from __future__ import annotations

import pytest
import torch

from mech.ablation import ablate, mean_activations
from mech.chat import shared_prefix_len
from mech.directions import activation_addition, directional_ablation
from mech.interventions import Ablate, AddVector, ProjectOut
from mech.prompts import default_pairs
from mech.refusal import last_logits, refusal_log_odds
from mech.scoring import last_logits_under, refusal_scores

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
        "mean heads end-aligned": (lambda: ablate(lm, heads, "mean", means), Ablate(tuple(heads), "mean", means)),
        "zero mlp": (lambda: ablate(lm, ["L1.mlp"], "zero"), Ablate(("L1.mlp",), "zero")),
        "mean heads at positions": (lambda: ablate(lm, heads, "mean", means, positions=[-1, -4]),
                                    Ablate(tuple(heads), "mean", means, positions=(-1, -4))),
        "directional ablation": (lambda: directional_ablation(lm, d), ProjectOut.of(lm, d)),
        "activation addition": (lambda: activation_addition(lm, d * 3, 1), AddVector.of(lm, d * 3, 1)),
    }


@pytest.mark.parametrize("case", ["none", "mean heads end-aligned", "zero mlp", "mean heads at positions",
                                  "directional ablation", "activation addition"])
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
    s = refusal_scores(tiny_qwen2, PROMPTS, [5, 6], [Ablate(("L0.H0",)), None])
    after = hook_count(tiny_qwen2.model)
    assert s.shape == (2, len(PROMPTS)) and torch.isfinite(s).all() and before == after
    assert torch.equal(s[1], refusal_log_odds(last_logits_under(tiny_qwen2, PROMPTS), [5, 6]))
    with pytest.raises(ValueError, match="at least one prompt"):
        last_logits_under(tiny_qwen2, [])


@pytest.mark.parametrize("backend", ["hooks", "batched"])
def test_refusal_scores_backends_agree_on_a_mixed_list(tiny_model, backend):
    """One list of every kind (and None): each row equals that intervention scored alone by the hooks backend."""
    lm = tiny_model
    means = mean_activations(lm, PROMPTS[7:], kinds=("head",))
    d = torch.randn(lm.shape.d_model, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ivs = [Ablate(("L0.H1", "L1.H0"), "mean", means), None, ProjectOut.of(lm, d), AddVector.of(lm, d, 2, 0.5),
           Ablate(("L2.H3",), "mean", means)]
    got = refusal_scores(lm, PROMPTS, [5, 6], ivs, backend=backend)
    assert got.shape == (len(ivs), len(PROMPTS))
    for i, iv in enumerate(ivs):
        want = refusal_log_odds(last_logits_under(lm, PROMPTS, iv), [5, 6])
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("args", "match"), [
    ({"prompts": []}, "non-empty list of prompt texts"),
    ({"backend": "gpu"}, "unknown backend"),
    ({"refusal_ids": []}, "refusal_ids"),
    ({"interventions": Ablate(("L0.H0",))}, "single intervention"),
])
def test_refusal_scores_refuses_bad_input_before_any_forward(tiny_qwen2, args, match):
    calls = []
    h = tiny_qwen2.model.model.embed_tokens.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        kw = {"prompts": PROMPTS, "refusal_ids": [5], "interventions": [None]} | args
        with pytest.raises(ValueError, match=match):
            refusal_scores(tiny_qwen2, **kw)
    finally:
        h.remove()
    assert not calls


def test_batched_backend_refuses_mixed_ablations(tiny_qwen2):
    means = mean_activations(tiny_qwen2, PROMPTS[7:], kinds=("head",))
    with pytest.raises(ValueError, match="one method, means and mode"):
        refusal_scores(tiny_qwen2, PROMPTS, [5], [Ablate(("L0.H0",)), Ablate(("L0.H0",), "mean", means)],
                       backend="batched")


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
    got = last_logits_under(lm, prompts, Ablate(tuple(heads), "mean", means))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    with directional_ablation(lm, d):
        want = last_logits(lm, prompts)
    got = last_logits_under(lm, prompts, ProjectOut.of(lm, d))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
