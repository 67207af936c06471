"""mech.set_scores: many interventions scored at once (the clean run once, each from its first changed layer,
interventions as rows of one batch) must give the hook loop's numbers to float32 round-off: ATOL = 2e-4 absolute
on the refusal log-odds (measured: ~5e-6 on the tiny models, see the real-model tests for the default model),
KL_ATOL = 1e-4 on the first-token KL.

* ablation sets (:func:`~mech.set_scores.ablation_set_scores`) against ``refusal_scores`` (the hooks backend)
  with an ``Ablate`` per set;
* direction interventions (:func:`~mech.set_scores.direction_set_scores`) against ``last_logits_under`` with
  ``ProjectOut`` / ``AddVector`` per intervention, and the first-token KL against ``first_token_kl`` of
  ``last_logits_under`` (what ``select_direction`` computes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mech.ablation import mean_activations
from mech.chat import shared_prefix_len
from mech.components import random_components
from mech.directions import diff_in_means, select_direction
from mech.engine import Work
from mech.evaluation import first_token_kl
from mech.interventions import Ablate, AddVector, ProjectOut
from mech.prompts import default_pairs
from mech.refusal import refusal_log_odds
from mech.scoring import last_logits_under, refusal_scores
from mech.set_scores import MIN_REST, ablation_set_scores, direction_set_scores

HARMFUL = default_pairs().harmful().texts()[:9]
HARMLESS = default_pairs().harmless().texts()[:6]
IDS = [5, 6]
ATOL = 2e-4  # float32 round-off of a different (but equivalent) order of operations
KL_ATOL = 1e-4

# head sets starting at layers 1, 0, 2, 0 (mixed first layers; two with a layer-0 component) and an empty set
HEAD_SETS = [["L1.H0", "L2.H3"], ["L0.H1"], [], ["L2.H2", "L2.H0"], ["L1.H1", "L1.H2", "L0.H3"]]


def _hook_loop(lm, sets, method, means, mode, prompts=HARMFUL):
    return refusal_scores(lm, prompts, IDS, [Ablate(tuple(s), method, means, mode) for s in sets])


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
    clean = refusal_scores(tiny_qwen2, HARMFUL, IDS, [None])[0]
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


def _raise_on_third_call(monkeypatch, module) -> dict[str, int]:
    """Make ``module.forward`` raise from its third call on (the clean run's two calls pass, then an
    intervened forward raises with its hooks attached); returns the call counter."""
    calls = {"n": 0}
    orig = module.forward

    def boom(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("boom")
        return orig(*args, **kwargs)

    monkeypatch.setattr(module, "forward", boom)
    return calls


def test_hooks_removed_when_a_forward_raises(tiny_qwen2, means_of, hook_count, monkeypatch):
    lm = tiny_qwen2
    before = hook_count(lm.model)
    ablation_set_scores(lm, HARMFUL, IDS, HEAD_SETS, "mean", means_of(lm))
    assert hook_count(lm.model) == before
    calls = _raise_on_third_call(monkeypatch, lm.model.model.layers[2].mlp)  # the clean run passes, a set's raises
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
    want = refusal_scores(lm, prompts, ids, [Ablate(tuple(s), "mean", means) for s in sets])
    got = ablation_set_scores(lm, prompts, ids, sets, "mean", means)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------ direction interventions


def _make(lm, iv):
    return ProjectOut.of(lm, iv[1]) if iv[0] == "ablate" else AddVector.of(lm, iv[1], iv[2])


def _direction_hook_path(lm, interventions, prompts=HARMFUL, ids=IDS):
    """Per intervention: the hooks backend's scores and first_token_kl(clean, intervened) of last_logits_under (as
    select_direction computes them); and the clean scores."""
    base = last_logits_under(lm, prompts)
    scores, kls = [], []
    for iv in interventions:
        logits = last_logits_under(lm, prompts, _make(lm, iv))
        scores.append(refusal_log_odds(logits, ids))  # = refusal_scores(lm, prompts, ids, [_make(lm, iv)])[0]
        kls.append(first_token_kl(base, logits))
    return torch.stack(scores), torch.stack(kls), refusal_scores(lm, prompts, ids, [None])[0]


def _directions(lm, n, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, lm.shape.d_model, generator=g, dtype=torch.float64)
    return scale * v / v.norm(dim=-1, keepdim=True)


def _mixed(lm):
    """Ablations and additions at every layer (0 and the last included), interleaved."""
    d = _directions(lm, 6, 6.0)
    last = lm.shape.n_layers - 1
    return [("add", d[0], last), ("ablate", d[1]), ("add", d[2], 0), ("add", d[3], 1), ("ablate", d[4]),
            ("add", d[5], 0), ("add", -d[0], 2)]


@pytest.mark.parametrize("max_rows", [128, 5])
def test_direction_interventions_equal_the_hook_path(tiny_model, max_rows):
    """Directional ablation and activation addition (layers 0, 1 and the last), mixed in one call, prompts of
    different lengths, scores and KL; with max_rows=5 the interventions and prompts span many chunks and groups."""
    lm = tiny_model
    ivs = _mixed(lm)
    want, want_kl, want_clean = _direction_hook_path(lm, ivs)
    got = direction_set_scores(lm, HARMFUL, IDS, ivs, kl=True, max_rows=max_rows)
    assert got.scores.shape == got.kl.shape == (len(ivs), len(HARMFUL)) and got.scores.dtype == torch.float32
    torch.testing.assert_close(got.scores, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.kl, want_kl, atol=KL_ATOL, rtol=0)
    torch.testing.assert_close(got.clean, want_clean, atol=ATOL, rtol=0)
    assert bool((want - want_clean).abs().amax(1).gt(1e-2).all())  # every intervention moves the scores
    assert bool(want_kl.mean(1).gt(1e-3).all())


def test_select_directions_measurements(tiny_qwen2):
    """select_direction's three measurements of every (non-zero) diff-in-means candidate from two calls:
    ablation on harmful + harmless prompts (bypass; KL on the harmless ones), addition on the harmless ones."""
    lm = tiny_qwen2
    hv, lv = HARMFUL[:5], HARMLESS[:5]
    dim = diff_in_means(lm, HARMFUL[5:], HARMLESS[3:])
    sel = select_direction(lm, dim, hv, lv, IDS)
    cands = [c for c in sel.candidates if c.norm > 0]
    assert len(cands) >= 10
    vecs = [dim.vector(c.layer, c.pos) for c in cands]
    abl = direction_set_scores(lm, hv + lv, IDS, [("ablate", v) for v in vecs], kl=True, max_rows=32)
    add = direction_set_scores(lm, lv, IDS, [("add", v, c.layer) for v, c in zip(vecs, cands, strict=True)])
    assert abl.kl is not None
    got = torch.stack([abl.scores[:, :5].double().mean(1), add.scores.double().mean(1), abl.kl[:, 5:].double().mean(1)])
    want = torch.tensor([[c.bypass for c in cands], [c.induce for c in cands], [c.kl for c in cands]],
                        dtype=torch.float64)
    torch.testing.assert_close(got[:2], want[:2], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[2], want[2], atol=KL_ATOL, rtol=0)
    assert abs(float(abl.clean[:5].double().mean()) - sel.baseline_harmful) <= ATOL
    assert abs(float(abl.clean[5:].double().mean()) - sel.baseline_harmless) <= ATOL


def test_direction_work(tiny_llama):
    """Additions start at their layer, ablations at 0: the work counted is the staircase's."""
    lm = tiny_llama
    ivs = _mixed(lm)
    work = Work()
    direction_set_scores(lm, HARMFUL, IDS, ivs, work=work)
    n_layers = lm.shape.n_layers
    seqs = lm.encode_chat(HARMFUL)
    P = shared_prefix_len(seqs, MIN_REST)
    rest = sum(len(s) - P for s in seqs)
    start = [0 if iv[0] == "ablate" else iv[2] for iv in ivs]
    # lower bound: every row's real tokens (prefix and rest) from its first layer, plus the clean run
    least = sum((n_layers - L) * (P + rest) for L in start) + n_layers * (P + rest)
    hook_path = len(ivs) * n_layers * (P + len(seqs) * (max(map(len, seqs)) - P))
    assert least <= work.layer_tokens < hook_path
    assert work.unembed_rows == len(HARMFUL) * (len(ivs) + 1) and work.seconds > 0


def test_direction_hooks_removed_when_a_forward_raises(tiny_qwen2, hook_count, monkeypatch):
    lm = tiny_qwen2
    ivs = _mixed(lm)
    before = hook_count(lm.model)
    direction_set_scores(lm, HARMFUL, IDS, ivs, kl=True)
    assert hook_count(lm.model) == before
    calls = _raise_on_third_call(monkeypatch, lm.model.model.layers[1].mlp)  # clean prefix and rest pass
    with pytest.raises(RuntimeError, match="boom"):
        direction_set_scores(lm, HARMFUL, IDS, ivs)
    assert calls["n"] == 3 and hook_count(lm.model) == before


def test_direction_vectors_as_arrays_lists_and_float32(tiny_qwen2):
    """Directions and steering vectors as numpy arrays, lists, float32 or [1, d_model] tensors give the same
    scores as float64 vectors (the scale of an ablated direction does not matter)."""
    lm = tiny_qwen2
    d = _directions(lm, 2, 6.0)
    want = direction_set_scores(lm, HARMFUL[:3], IDS, [("ablate", d[0]), ("add", d[1], 1)]).scores
    alt = [("ablate", 3 * d[0].numpy()), ("add", d[1].tolist(), 1)]
    torch.testing.assert_close(direction_set_scores(lm, HARMFUL[:3], IDS, alt).scores, want, atol=ATOL, rtol=0)
    alt = [("ablate", d[0].float()[None]), ("add", d[1][None], np.int64(1))]
    torch.testing.assert_close(direction_set_scores(lm, HARMFUL[:3], IDS, alt).scores, want, atol=ATOL, rtol=0)


_D = torch.ones(64, dtype=torch.float64)


@pytest.mark.parametrize("ivs, kw, match", [
    ([], {}, "non-empty list of interventions"),
    (("ablate", _D), {}, "single intervention"),
    ([("ablate", _D), ("rotate", _D)], {}, "intervention 1: unknown kind 'rotate'"),
    ([("ablate", torch.ones(63))], {}, "intervention 0: the direction has shape \\[63\\]"),
    ([("add", torch.ones(2, 64), 1)], {}, "intervention 0: the steering vector has shape \\[2, 64\\]"),
    ([("ablate", torch.zeros(64))], {}, "finite non-zero"),
    ([("ablate", torch.full((64,), float("nan")))], {}, "non-finite"),
    ([("add", _D, 3)], {}, "layer 3 out of range"),
    ([("add", _D, -1)], {}, "layer -1 out of range"),
    ([("add", _D, 1.5)], {}, "integer layer index"),
    ([("add", _D)], {}, "takes a vector and a layer"),
    ([("ablate", _D, 1)], {}, "takes one direction"),
    ([_D], {}, "is not \\('ablate', direction\\)"),
    ([("ablate", _D)], {"max_rows": 0}, "max_rows"),
    ([("ablate", _D)], {"refusal_ids": []}, "refusal_ids"),
    ([("ablate", _D)], {"prompts": []}, "at least one prompt"),
])
def test_direction_bad_input_raises_before_any_forward(tiny_qwen2, ivs, kw, match):
    lm = tiny_qwen2
    calls = []
    h = lm.model.model.embed_tokens.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        args = {"prompts": HARMFUL, "refusal_ids": IDS} | kw
        with pytest.raises(ValueError, match=match) as e:
            direction_set_scores(lm, args.pop("prompts"), args.pop("refusal_ids"), ivs, **args)
    finally:
        h.remove()
    assert "\n" not in str(e.value) and not calls


@pytest.mark.realmodel
@pytest.mark.slow
def test_directions_equal_the_hook_path_on_the_default_model(lm):
    """Two diff-in-means candidates (ablated; added at their layers) and two random directions of the same norm
    on 3 harmful + 3 harmless prompts: scores within 2e-4, KL within 1e-4 of the hook path."""
    pairs = default_pairs()
    harmful, harmless = pairs.harmful().texts(), pairs.harmless().texts()
    prompts = harmful[:3] + harmless[:3]
    ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("I", "As")]
    dim = diff_in_means(lm, harmful[10:14], harmless[10:14], layers=[6, 12])
    v6, v12 = dim.vector(6, -1), dim.vector(12, -5)
    r = _directions(lm, 2, float(v12.norm()), seed=1)
    ivs = [("ablate", v12), ("add", v6, 6), ("add", v12, 12), ("ablate", r[0]), ("add", r[1], 12)]
    want, want_kl, want_clean = _direction_hook_path(lm, ivs, prompts, ids)
    got = direction_set_scores(lm, prompts, ids, ivs, kl=True)
    torch.testing.assert_close(got.scores, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.kl, want_kl, atol=KL_ATOL, rtol=0)
    torch.testing.assert_close(got.clean, want_clean, atol=ATOL, rtol=0)
