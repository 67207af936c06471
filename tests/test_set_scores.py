"""mech.set_scores: many ablation sets scored at once (the clean run once, each set from its first ablated layer,
sets as rows of one batch) must give the hook loop's numbers — ``scores_under`` with ``ablation_intervention``
per set — to float32 round-off: ATOL = 2e-4 absolute on the refusal log-odds (measured: ~5e-6 on the tiny
models, see the real-model test for the default model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mech.ablation import mean_activations
from mech.components import random_components
from mech.patching import Work
from mech.prompts import default_pairs
from mech.scoring import ablation_intervention, scores_under, shared_prefix_len
from mech.set_scores import MIN_REST, ablation_set_scores

HARMFUL = default_pairs().harmful().texts()[:9]
HARMLESS = default_pairs().harmless().texts()[:6]
IDS = [5, 6]
ATOL = 2e-4  # float32 round-off of a different (but equivalent) order of operations

# head sets starting at layers 1, 0, 2, 0 (mixed first layers; two with a layer-0 component) and an empty set
HEAD_SETS = [["L1.H0", "L2.H3"], ["L0.H1"], [], ["L2.H2", "L2.H0"], ["L1.H1", "L1.H2", "L0.H3"]]


def _hook_loop(lm, sets, method, means, mode, prompts=HARMFUL):
    return torch.stack([scores_under(lm, prompts, IDS, ablation_intervention(lm, s, method, means, mode))
                        for s in sets])


@pytest.fixture(scope="module")
def means_of():
    cache = {}

    def get(lm):
        if lm.name not in cache:
            cache[lm.name] = mean_activations(lm, HARMLESS, kinds=("head", "neuron", "attn", "mlp"))
        return cache[lm.name]

    return get


def test_the_prompts_differ_in_length_and_share_a_prefix(tiny_model):
    seqs = tiny_model.encode_chat(HARMFUL)
    P = shared_prefix_len(seqs, MIN_REST)
    assert P > 0 and len({len(s) for s in seqs}) > 3


@pytest.mark.parametrize("method, mode, max_rows", [("zero", "end_aligned", 128), ("mean", "end_aligned", 128),
                                                    ("mean", "averaged", 128), ("mean", "end_aligned", 4)])
def test_head_sets_equal_the_hook_loop(tiny_model, means_of, method, mode, max_rows):
    """Head sets at mixed first layers (layer 0 included) and an empty set, prompts of different lengths; with
    max_rows=4 the sets and prompts are split over many chunks and set groups."""
    means = means_of(tiny_model)
    want = _hook_loop(tiny_model, HEAD_SETS, method, means, mode)
    got = ablation_set_scores(tiny_model, HARMFUL, IDS, HEAD_SETS, method, means, mode, max_rows=max_rows)
    assert got.shape == (len(HEAD_SETS), len(HARMFUL)) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (want - want[2]).abs().amax(1).gt(1e-2).sum() == len(HEAD_SETS) - 1  # the ablations do move scores


def test_end_aligned_and_averaged_means_differ(tiny_qwen2, means_of):
    """The two mean modes give different numbers (so the equality tests tell them apart)."""
    means = means_of(tiny_qwen2)
    a = ablation_set_scores(tiny_qwen2, HARMFUL, IDS, HEAD_SETS[:2], "mean", means, "end_aligned")
    b = ablation_set_scores(tiny_qwen2, HARMFUL, IDS, HEAD_SETS[:2], "mean", means, "averaged")
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_neurons_and_blocks_equal_the_hook_loop(tiny_model, means_of, method):
    sets = [["L1.mlp"], ["L0.N5", "L2.N7", "L2.N100"], ["L2.attn", "L1.H3"], ["L0.attn", "L0.mlp"],
            ["L1.N3", "L1.H0", "L2.mlp"]]
    means = means_of(tiny_model)
    want = _hook_loop(tiny_model, sets, method, means, "end_aligned")
    got = ablation_set_scores(tiny_model, HARMFUL, IDS, sets, method, means, max_rows=16)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_an_empty_set_gives_the_clean_scores(tiny_qwen2):
    got = ablation_set_scores(tiny_qwen2, HARMFUL, IDS, [[], []], "zero")
    clean = scores_under(tiny_qwen2, HARMFUL, IDS)
    torch.testing.assert_close(got, clean.expand(2, -1), atol=ATOL, rtol=0)


def test_random_layer_matched_sets_and_work(tiny_llama, means_of):
    """The H1 null's shape: layer-matched random sets of a ranked set; the work counted is less than the hook
    loop's (layers below each set's first layer are skipped)."""
    lm = tiny_llama
    rng = np.random.default_rng(0)
    top = ["L1.H2", "L2.H0", "L2.H1"]
    sets = [random_components(lm, top, rng, match_layers=True) for _ in range(12)]
    means = means_of(lm)
    work = Work()
    got = ablation_set_scores(lm, HARMFUL, IDS, sets, "mean", means, work=work, max_rows=32)
    torch.testing.assert_close(got, _hook_loop(lm, sets, "mean", means, "end_aligned"), atol=ATOL, rtol=0)
    seqs = lm.encode_chat(HARMFUL)
    P = shared_prefix_len(seqs, MIN_REST)
    hook_loop_layer_tokens = len(sets) * lm.shape.n_layers * (P + len(seqs) * (max(map(len, seqs)) - P))
    assert 0 < work.layer_tokens < hook_loop_layer_tokens
    assert work.unembed_rows == len(HARMFUL) * (len(sets) + 1) and work.seconds > 0 and work.useful_flops(lm) > 0


def test_hooks_removed_when_a_forward_raises(tiny_qwen2, means_of, hook_count, monkeypatch):
    lm = tiny_qwen2
    before = hook_count(lm.model)
    ablation_set_scores(lm, HARMFUL, IDS, HEAD_SETS, "mean", means_of(lm))
    assert hook_count(lm.model) == before
    calls = {"n": 0}
    mlp = lm.model.model.layers[2].mlp
    orig = mlp.forward

    def boom(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # the clean run passes; a set's forward raises with its hooks attached
            raise RuntimeError("boom")
        return orig(*args, **kwargs)

    monkeypatch.setattr(mlp, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        ablation_set_scores(lm, HARMFUL, IDS, HEAD_SETS, "mean", means_of(lm))
    assert calls["n"] == 3 and hook_count(lm.model) == before


@pytest.mark.parametrize("sets, kw, match", [
    ([], {}, "non-empty list of component sets"),
    ([["L1.H0"], ["L1.foo"]], {}, "set 1: bad component id"),
    ([["L9.H0"]], {}, "layer out of range"),
    ([["L1.H99"]], {}, "index out of range"),
    (["L1.H0"], {}, "set 0 is a single component"),
    ([[3]], {}, "not a component"),
    ([["L1.H0"]], {"method": "mean", "means": None}, "mean-ablation needs means"),
    ([["L1.H0"]], {"method": "resample"}, "unknown ablation method"),
    ([["L1.H0"]], {"mode": "sideways"}, "unknown mean mode"),
    ([["L1.H0"]], {"max_rows": 0}, "max_rows"),
    ([["L1.H0"]], {"refusal_ids": []}, "refusal_ids"),
    ([["L1.H0"]], {"prompts": []}, "at least one prompt"),
])
def test_bad_input_raises_before_any_forward(tiny_qwen2, sets, kw, match):
    lm = tiny_qwen2
    calls = []
    h = lm.model.model.embed_tokens.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        args = {"prompts": HARMFUL, "refusal_ids": IDS, "method": "zero", "means": None} | kw
        with pytest.raises(ValueError, match=match) as e:
            ablation_set_scores(lm, args.pop("prompts"), args.pop("refusal_ids"), sets, **args)
    finally:
        h.remove()
    assert "\n" not in str(e.value) and not calls


def test_means_missing_a_kind_raise(tiny_qwen2):
    means = mean_activations(tiny_qwen2, HARMLESS[:3], kinds=("head",))
    with pytest.raises(ValueError, match="no mean cached for blocks.1.mlp.hook_post"):
        ablation_set_scores(tiny_qwen2, HARMFUL, IDS, [["L1.H0"], ["L1.N3"]], "mean", means)


@pytest.mark.realmodel
@pytest.mark.slow
def test_equals_the_hook_loop_on_the_default_model(lm):
    """Five layer-matched random sets of the snapshot's top-10 heads (H1's null) on 8 harmful prompts, mean
    ablation with end-aligned means: equal to the hook loop within 2e-4 on the log-odds."""
    top = ["L14.H13", "L12.H2", "L14.H5", "L14.H7", "L14.H9", "L14.H2", "L10.H4", "L10.H12", "L14.H11", "L20.H2"]
    prompts = default_pairs().harmful().texts()[:8]
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("I", "As")]
    means = mean_activations(lm, default_pairs().harmless().texts()[:8], kinds=("head",))
    rng = np.random.default_rng(0)
    sets = [random_components(lm, top, rng, match_layers=True) for _ in range(5)]
    want = torch.stack([scores_under(lm, prompts, ids, ablation_intervention(lm, s, "mean", means)) for s in sets])
    got = ablation_set_scores(lm, prompts, ids, sets, "mean", means)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
