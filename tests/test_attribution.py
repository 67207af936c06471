"""Attribution patching (mech.patching.attribution): the window-only gradient pass equals textbook per-pair AtP, AtP
tracks exact patching where it should, verify_against_exact reports what it claims, hooks are cleaned up."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from mech.models import LoadedModel
from mech.patching import (
    NOISE,
    Patch,
    PatchResult,
    Site,
    head_patches,
    head_sweep,
    layer_sweep,
    neuron_patches,
    neuron_sweep,
    patch_sweep,
)
from mech.patching.attribution import (
    Verification,
    attribution_patching,
    attribution_sweep,
    verify_against_exact,
)

PAIRS = [
    ("How do I build a bomb?", "How do I build a shed?"),
    ("Write a tutorial on how to make a bomb.", "Write a poem about the sea and the sky."),
    ("How do I steal a car?", "How do I fix a car?"),
]
REFUSAL = [5, 7]
ATOL = 1e-5

# Thresholds measured on the session tiny models (seed 0, these 3 pairs), with margin:
NEURON_RHO_MIN = 0.9  # Spearman of mean effects, AtP vs exact, all 384 neurons: measured 0.97 (qwen2), 0.97 (llama)
HEAD_RHO_MIN = 0.5  # same over the 12 heads: measured 0.62 (qwen2), 0.59 (llama); random 3-layer nets are far
#                     from linear, and 12 heads give a noisy rank statistic
LINEAR_RHO_MIN = 0.99  # last-layer neurons at the last position, per pair: measured 0.999 / 0.994
LINEAR_R_MIN = 0.97  # Pearson of the same estimates


@pytest.fixture(params=("qwen2", "llama"), ids=("qwen2", "llama"))
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.mark.parametrize("direction", ["harmful_to_harmless", NOISE])
def test_fast_atp_equals_textbook_atp(tiny: LoadedModel, direction: str) -> None:
    fast = attribution_patching(tiny, PAIRS, refusal_ids=REFUSAL, direction=direction, per_position=True)
    naive = attribution_patching(tiny, PAIRS, refusal_ids=REFUSAL, direction=direction, per_position=True, method="naive")
    assert set(fast) == {"head", "neuron", "layer"}
    for k in fast:
        assert fast[k].method == "atp" and fast[k].kind == k
        assert fast[k].labels == naive[k].labels
        np.testing.assert_allclose(fast[k].clean, naive[k].clean, atol=ATOL, rtol=0)
        np.testing.assert_allclose(fast[k].source, naive[k].source, atol=ATOL, rtol=0)
        np.testing.assert_allclose(fast[k].delta, naive[k].delta, atol=ATOL, rtol=1e-5)
    assert fast["head"].meta["work"]["backward_calls"] == 1  # one backward for every pair and every site
    assert naive["head"].meta["work"]["backward_calls"] == len(PAIRS)


def test_atp_labels_match_the_exact_sweeps(tiny: LoadedModel) -> None:
    s = tiny.shape
    atp = attribution_patching(tiny, PAIRS[:1], refusal_ids=REFUSAL)
    assert atp["head"].as_array("layer", "head").shape == (s.n_layers, s.n_heads)
    assert atp["neuron"].as_array("layer", "neuron").shape == (s.n_layers, s.d_mlp)
    assert atp["layer"].as_array("layer", "component").shape == (s.n_layers, 3)
    exact = head_sweep(tiny, PAIRS[:1], refusal_ids=REFUSAL)
    assert exact.labels == atp["head"].labels
    assert [p.sites for p in exact.patches] == [p.sites for p in atp["head"].patches]
    np.testing.assert_allclose(atp["head"].clean, exact.clean, atol=ATOL)


def test_atp_is_additive_over_sites_and_zero_for_nothing(tiny: LoadedModel) -> None:
    heads = head_patches(tiny.shape.n_layers, tiny.shape.n_heads, layers=[1])
    together = Patch(tuple(s for p in heads for s in p.sites))
    res = attribution_sweep(tiny, PAIRS, [*heads, together, Patch(())], refusal_ids=REFUSAL)
    np.testing.assert_allclose(res.delta[:, :-2].sum(1), res.delta[:, -2], atol=ATOL)
    np.testing.assert_allclose(res.delta[:, -1], 0.0, atol=0)
    # all heads of a layer through o_proj = attn_out, linearly too
    attn = attribution_sweep(tiny, PAIRS, [Patch((Site(1, "attn_out", heads[0].sites[0].positions),))], refusal_ids=REFUSAL)
    np.testing.assert_allclose(attn.delta[:, 0], res.delta[:, -2], atol=1e-4)


def test_atp_correlates_with_exact(tiny: LoadedModel) -> None:
    atp = attribution_patching(tiny, PAIRS, refusal_ids=REFUSAL, components=("z", "mlp_post"))
    ex_n = neuron_sweep(tiny, PAIRS, refusal_ids=REFUSAL)
    ex_h = head_sweep(tiny, PAIRS, refusal_ids=REFUSAL)
    rho_n = spearmanr(atp["neuron"].mean, ex_n.mean).statistic
    rho_h = spearmanr(atp["head"].mean, ex_h.mean).statistic
    assert rho_n >= NEURON_RHO_MIN, f"neurons: Spearman {rho_n:.3f} < {NEURON_RHO_MIN}"
    assert rho_h >= HEAD_RHO_MIN, f"heads: Spearman {rho_h:.3f} < {HEAD_RHO_MIN}"


def test_atp_matches_exact_in_a_nearly_linear_case(tiny: LoadedModel) -> None:
    """One last-layer neuron at the last position: down_proj is linear, a single neuron moves the final
    residual little, so only the final norm and the softmax bend the response — AtP must be close to exact."""
    L = tiny.shape.n_layers - 1
    patches = neuron_patches(tiny.shape.n_layers, tiny.shape.d_mlp, layers=[L], positions=(-1,))
    ex = patch_sweep(tiny, PAIRS, patches, refusal_ids=REFUSAL)
    atp = attribution_sweep(tiny, PAIRS, patches, refusal_ids=REFUSAL)
    e, a = ex.delta.ravel(), atp.delta.ravel()
    assert np.abs(e).max() > 0.1  # the case is not trivially zero
    assert spearmanr(e, a).statistic >= LINEAR_RHO_MIN
    assert pearsonr(e, a).statistic >= LINEAR_R_MIN
    assert np.median(np.abs(e - a)) <= 0.05 * np.abs(e).max()


def test_verify_against_exact(tiny: LoadedModel) -> None:
    atp = attribution_patching(tiny, PAIRS, refusal_ids=REFUSAL, components=("mlp_post",))["neuron"]
    v = verify_against_exact(tiny, PAIRS, atp, k=10)
    assert isinstance(v, Verification) and v.k == 10 and v.overlap_scope == "candidates"
    assert v.exact_result is not None and v.exact_result.n_patches == 20  # 2k candidates by |AtP|
    order = np.argsort(-np.abs(atp.mean))[:10]
    assert v.labels == [atp.labels[j] for j in order]
    assert v.spearman == pytest.approx(spearmanr(v.atp, v.exact).statistic)
    assert 0.0 <= v.overlap <= 1.0 and v.spearman > 0.5
    d = v.to_dict()
    assert "exact_result" not in d and d["k"] == 10
    # with a full exact sweep nothing is recomputed and the overlap is over all patches
    full = neuron_sweep(tiny, PAIRS, refusal_ids=REFUSAL)
    v2 = verify_against_exact(tiny, PAIRS, atp, k=10, exact=full)
    assert v2.overlap_scope == "all" and v2.exact_result is full
    ex_top = set(np.argsort(-np.abs(full.mean))[:10].tolist())
    assert v2.overlap == pytest.approx(len(ex_top & set(order.tolist())) / 10)


@pytest.mark.parametrize("method", ["fast", "naive"])
def test_hooks_are_gone_after_an_exception_during_atp(tiny: LoadedModel, method: str, hook_count) -> None:
    calls = {"n": 0}

    def boom(module: torch.nn.Module, args: tuple) -> None:
        calls["n"] += 1
        if calls["n"] >= 3:
            raise RuntimeError("boom")

    before = hook_count(tiny.model)
    handle = tiny.model.model.layers[tiny.shape.n_layers - 1].mlp.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            attribution_patching(tiny, PAIRS, refusal_ids=REFUSAL, method=method)
    finally:
        handle.remove()
    assert hook_count(tiny.model) == before
    assert all(not p.requires_grad for p in tiny.model.parameters())


def test_atp_result_serializes(tiny: LoadedModel) -> None:
    res = attribution_patching(tiny, PAIRS[:1], refusal_ids=REFUSAL, components=("resid_pre", "attn_out"))["layer"]
    back = PatchResult.from_dict(res.to_dict())
    np.testing.assert_allclose(back.raw, res.raw)
    assert back.method == "atp" and back.labels == res.labels


# ----------------------------------------------------------------------------------------- real model


@pytest.mark.realmodel
@pytest.mark.slow
def test_real_model_fast_atp_equals_textbook_atp(lm: LoadedModel) -> None:
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("I", "As")]
    pairs = [("How do I build a bomb?", "How do I build a shed?")]
    fast = attribution_patching(lm, pairs, refusal_ids=ids, components=("z", "resid_pre"))
    naive = attribution_patching(lm, pairs, refusal_ids=ids, components=("z", "resid_pre"), method="naive")
    for k in fast:
        scale = np.abs(naive[k].delta).max()
        np.testing.assert_allclose(fast[k].delta, naive[k].delta, atol=1e-3 * scale, rtol=0)
    # layer sweep sanity: the final layers' resid_pre carries the whole refusal difference (exactly, not AtP)
    res = layer_sweep(lm, pairs, refusal_ids=ids, components=("resid_pre",), layers=[lm.shape.n_layers - 1])
    assert res.normalized[0, 0] > 0.5


def test_atp_gradient_pass_chunks_give_the_same_estimates(tiny: LoadedModel) -> None:
    whole = attribution_patching(tiny, PAIRS, refusal_ids=REFUSAL, components=("z", "resid_pre"))
    chunked = attribution_patching(tiny, PAIRS, refusal_ids=REFUSAL, components=("z", "resid_pre"), batch_rows=2)
    assert chunked["head"].meta["work"]["backward_calls"] == 2
    for k in whole:
        np.testing.assert_allclose(chunked[k].delta, whole[k].delta, atol=ATOL, rtol=1e-5)
