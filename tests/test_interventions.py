"""mech.interventions: each intervention value gives the same numbers through a plain forward (its hooks) and through
the batched-rows engine (mech.set_scores), and both equal an independent computation with plain torch hooks on the
HF modules (no mech.hooks, no mech.interventions).

Tolerances: the plain forward and the plain-torch reference run the same products in the same order (1e-6); the
batched engine runs other matrix shapes (rows = intervention x prompt, the shared prefix as one row): float32
round-off, ≤ 2e-4 absolute on the log-odds, as in tests/test_set_scores.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor

from mech.ablation import mean_activations
from mech.interventions import Ablate, AddVector, ProjectOut, ablation_hook, every_row, per_row
from mech.prompts import default_pairs
from mech.refusal import last_logits, refusal_log_odds
from mech.set_scores import ablation_set_scores, direction_set_scores

HARMFUL = default_pairs().harmful().texts()[:5]
HARMLESS = default_pairs().harmless().texts()[:4]
IDS = [5, 17]
EXACT = 1e-6  # same products, same order
ATOL = 2e-4  # the batched engine's other shapes (float32 round-off)


# ---------------------------------------------------------------------------- the plain-torch reference


@contextmanager
def _torch_hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _reference_ablation(lm, heads: list[tuple[int, int]], rep: Callable[[int, Tensor], Tensor]):
    """Heads replaced at the o_proj input (``[batch, pos, n_heads * d_head]``) with ``rep(layer, x)`` (``[pos,
    n_heads, d_head]`` or a scalar) on their slice."""
    d_head = lm.shape.d_head
    hs = []
    for L in sorted({L for L, _ in heads}):
        idx = [h for l2, h in heads if l2 == L]

        def pre(module, args, L=L, idx=idx):
            x = args[0].clone()
            r = rep(L, x)
            for h in idx:
                sl = slice(h * d_head, (h + 1) * d_head)
                x[..., sl] = r if r.dim() == 0 else r[:, h]
            return (x, *args[1:])

        hs.append(lm.model.model.layers[L].self_attn.o_proj.register_forward_pre_hook(pre))
    return _torch_hooks(hs)


def _resid_pre_hook(layer, fn):
    def pre(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return layer.register_forward_pre_hook(pre, with_kwargs=True)


def _out_hook(module, fn):
    def post(m, args, out):
        return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)

    return module.register_forward_hook(post)


def _reference_projection(lm, r: Tensor):
    rr = r.to(torch.float32)

    def proj(x: Tensor) -> Tensor:
        return x - (x @ rr)[..., None] * rr

    hs = []
    for layer in lm.model.model.layers:
        hs += [_resid_pre_hook(layer, proj), _out_hook(layer.self_attn, proj), _out_hook(layer.mlp, proj)]
    return _torch_hooks(hs)


def _reference_addition(lm, v: Tensor, layer: int):
    vv = v.to(torch.float32)
    return _torch_hooks([_resid_pre_hook(lm.model.model.layers[layer], lambda x: x + vv)])


def _scores(lm, prompts, ctx=None) -> Tensor:
    if ctx is None:
        return refusal_log_odds(last_logits(lm, prompts, batch_size=3), IDS)
    with ctx:
        return refusal_log_odds(last_logits(lm, prompts, batch_size=3), IDS)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_ablation_plain_batched_and_reference_agree(tiny_model, method):
    lm = tiny_model
    means = mean_activations(lm, HARMLESS, kinds=("head",))
    heads = [(0, 1), (1, 3), (2, 0)]
    iv = Ablate(tuple(f"L{L}.H{h}" for L, h in heads), method, means if method == "mean" else None, "averaged")

    def rep(L: int, x: Tensor) -> Tensor:
        if method == "zero":
            return x.new_zeros(())
        return means.averaged[f"blocks.{L}.attn.hook_z"].to(x.dtype).expand(x.shape[1], -1, -1)

    with _reference_ablation(lm, heads, rep):
        want = _scores(lm, HARMFUL)
    plain = _scores(lm, HARMFUL, iv.apply(lm))
    torch.testing.assert_close(plain, want, atol=EXACT, rtol=0)
    batched = ablation_set_scores(lm, HARMFUL, IDS, [list(iv.components), []], method, iv.means, "averaged")
    torch.testing.assert_close(batched[0], want, atol=ATOL, rtol=0)
    torch.testing.assert_close(batched[1], _scores(lm, HARMFUL), atol=ATOL, rtol=0)  # the empty set: clean
    assert not torch.allclose(want, batched[1], atol=1e-3)  # the ablation changed something


def test_end_aligned_mean_ablation_plain_equals_the_reference(tiny_model):
    """End-aligned means: the last n_end positions of each (left-padded) forward get the mean at that position."""
    lm = tiny_model
    means = mean_activations(lm, HARMLESS, kinds=("head",), n_end=3)
    heads = [(1, 0), (1, 2)]

    def rep(L: int, x: Tensor) -> Tensor:
        name = f"blocks.{L}.attn.hook_z"
        r = means.averaged[name].expand(x.shape[1], -1, -1).clone()
        r[-3:] = means.end_aligned[name]
        return r.to(x.dtype)

    with _reference_ablation(lm, heads, rep):
        want = _scores(lm, HARMFUL)
    got = _scores(lm, HARMFUL, Ablate(("L1.H0", "L1.H2"), "mean", means).apply(lm))
    torch.testing.assert_close(got, want, atol=EXACT, rtol=0)


def test_projection_plain_batched_and_reference_agree(tiny_model):
    lm = tiny_model
    d = torch.randn(lm.shape.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    iv = ProjectOut.of(lm, d * 7.0)  # normalized
    torch.testing.assert_close(iv.direction.norm(), torch.tensor(1.0, dtype=torch.float64))
    with _reference_projection(lm, d / d.norm()):
        want = _scores(lm, HARMFUL)
    torch.testing.assert_close(_scores(lm, HARMFUL, iv.apply(lm)), want, atol=EXACT, rtol=0)
    got = direction_set_scores(lm, HARMFUL, IDS, [("ablate", d)]).scores[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", [0, 2])
def test_addition_plain_batched_and_reference_agree(tiny_model, layer):
    lm = tiny_model
    v = torch.randn(lm.shape.d_model, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    iv = AddVector.of(lm, v, layer, coeff=2.5)
    with _reference_addition(lm, 2.5 * v, layer):
        want = _scores(lm, HARMFUL)
    torch.testing.assert_close(_scores(lm, HARMFUL, iv.apply(lm)), want, atol=EXACT, rtol=0)
    got = direction_set_scores(lm, HARMFUL, IDS, [("add", 2.5 * v, layer)]).scores[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert not torch.allclose(want, _scores(lm, HARMFUL), atol=1e-3)


def test_mixed_direction_rows_equal_one_at_a_time(tiny_qwen2):
    """Rows of projections and additions at different layers in one batch: each row as if alone."""
    lm = tiny_qwen2
    g = torch.Generator().manual_seed(3)
    vs = [torch.randn(lm.shape.d_model, generator=g, dtype=torch.float64) for _ in range(3)]
    ivs = [("add", vs[0], 2), ("ablate", vs[1]), ("add", vs[2], 0)]
    together = direction_set_scores(lm, HARMFUL, IDS, ivs, max_rows=4).scores
    for i, one in enumerate(ivs):
        torch.testing.assert_close(direction_set_scores(lm, HARMFUL, IDS, [one]).scores[0], together[i], atol=ATOL,
                                   rtol=0)


def test_one_hook_serves_both_variants():
    """The same ablation_hook: a shared mask/replacement, or one per row (rows in join order, cut to the rows
    that have joined)."""
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    shared = ablation_hook(every_row(torch.tensor([True, False, False, True]), cast=False), lambda x: x.new_zeros(()))
    want = x.clone()
    want[..., [0, 3]] = 0
    assert torch.equal(shared(x, None), want)  # type: ignore[arg-type]
    masks = torch.tensor([[True, False, False, False], [False, False, False, False], [True, True, True, True]])
    rows = ablation_hook(per_row(masks), lambda x: x.new_full((), -1.0))
    got = rows(x, None)  # type: ignore[arg-type]  # two of the three rows have joined
    assert torch.equal(got[0, :, 0], torch.full((3,), -1.0)) and torch.equal(got[0, :, 1:], x[0, :, 1:])
    assert torch.equal(got[1], x[1])


def test_values_check_their_input(tiny_qwen2):
    lm = tiny_qwen2
    with pytest.raises(ValueError, match="mean-ablation needs means"):
        Ablate(("L0.H0",), "mean")
    with pytest.raises(ValueError, match="unknown ablation method"):
        Ablate(("L0.H0",), "resample")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite non-zero"):
        ProjectOut.of(lm, torch.zeros(lm.shape.d_model))
    with pytest.raises(ValueError, match="layer 3 out of range"):
        AddVector.of(lm, torch.ones(lm.shape.d_model), 3)
    assert Ablate(()).hooks(lm) == [] and Ablate(("L2.H1", "L0.mlp")).first_layer(3) == 0
