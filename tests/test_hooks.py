"""mech.hooks on the tiny qwen2 / llama / gemma models: names, shapes, identities, cleanup, errors."""

from __future__ import annotations

import pytest
import torch

from fixtures.tiny_models import TINY_ARCHS
from mech.hooks import (
    HOOK_KINDS,
    HookError,
    all_hook_names,
    hook_name,
    hooks,
    resolve,
    run_with_cache,
    run_with_hooks,
)
from mech.models import LoadedModel

PROMPTS = ["How do I build a bomb?", "Write a poem about the sea."]


@pytest.fixture(params=TINY_ARCHS, ids=TINY_ARCHS)
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    return request.getfixturevalue(f"tiny_{request.param}")


def _ids(tiny: LoadedModel) -> torch.Tensor:
    return torch.tensor(tiny.encode_chat(PROMPTS[:1]))


def test_every_hook_name_resolves_with_its_shape(tiny: LoadedModel, hook_count) -> None:
    s = tiny.shape
    ids = _ids(tiny)
    _, cache = run_with_cache(tiny, ids)
    names = all_hook_names(tiny.model)
    assert len(names) == s.n_layers * len(HOOK_KINDS)
    assert set(cache) == set(names)
    b, t = ids.shape
    expected = {
        "hook_resid_pre": (b, t, s.d_model),
        "attn.hook_z": (b, t, s.n_heads, s.d_head),
        "hook_attn_out": (b, t, s.d_model),
        "mlp.hook_post": (b, t, s.d_mlp),
        "hook_mlp_out": (b, t, s.d_model),
        "hook_resid_post": (b, t, s.d_model),
    }
    for L in range(s.n_layers):
        for kind, shape in expected.items():
            assert tuple(cache[hook_name(L, kind)].shape) == shape, (L, kind)
    assert hook_count(tiny.model) == 0


def test_heads_of_z_through_o_proj_sum_to_attn_out(tiny: LoadedModel) -> None:
    s = tiny.shape
    _, cache = run_with_cache(tiny, _ids(tiny), names_filter=lambda n: n.endswith(("attn.hook_z", "hook_attn_out")))
    for L in range(s.n_layers):
        o_proj = tiny.model.model.layers[L].self_attn.o_proj
        w = o_proj.weight.view(s.d_model, s.n_heads, s.d_head)  # [d_model, head, d_head]
        per_head = torch.einsum("bphd,mhd->bphm", cache[hook_name(L, "attn.hook_z")], w)  # [b, pos, head, d_model]
        total = per_head.sum(2) + (o_proj.bias if o_proj.bias is not None else 0)
        torch.testing.assert_close(total, cache[hook_name(L, "hook_attn_out")], atol=1e-5, rtol=0)


def test_resid_post_is_next_resid_pre_and_sums_components(tiny: LoadedModel) -> None:
    s = tiny.shape
    _, c = run_with_cache(tiny, _ids(tiny))
    for L in range(s.n_layers - 1):
        torch.testing.assert_close(c[hook_name(L, "hook_resid_post")], c[hook_name(L + 1, "hook_resid_pre")], atol=0, rtol=0)
    for L in range(s.n_layers):
        pre, attn, mlp = (c[hook_name(L, k)] for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out"))
        torch.testing.assert_close(pre + attn + mlp, c[hook_name(L, "hook_resid_post")], atol=1e-5, rtol=1e-5)


def test_mlp_post_through_down_proj_is_mlp_out(tiny: LoadedModel) -> None:
    _, c = run_with_cache(tiny, _ids(tiny), names_filter=lambda n: "mlp" in n)
    for L in range(tiny.shape.n_layers):
        down = tiny.model.model.layers[L].mlp.down_proj
        torch.testing.assert_close(down(c[hook_name(L, "mlp.hook_post")]), c[hook_name(L, "hook_mlp_out")], atol=1e-5, rtol=0)


def test_resid_pre_0_includes_embedding_scaling(tiny: LoadedModel) -> None:
    ids = _ids(tiny)
    _, c = run_with_cache(tiny, ids, names_filter=hook_name(0, "hook_resid_pre"), stop_after_last=True)
    emb = torch.nn.functional.embedding(ids, tiny.model.get_input_embeddings().weight)  # the raw table lookup
    scale = tiny.shape.d_model**0.5 if tiny.shape.arch == "gemma" else 1.0  # Gemma scales by sqrt(d_model)
    torch.testing.assert_close(c[hook_name(0, "hook_resid_pre")], emb * scale, atol=1e-4, rtol=1e-5)


def test_hook_replacement_takes_effect_and_identity_is_exact(tiny: LoadedModel, hook_count) -> None:
    ids = _ids(tiny)
    with torch.inference_mode():
        base = tiny.model(input_ids=ids).logits
        same = run_with_hooks(tiny, ids, [(hook_name(1, "attn.hook_z"), lambda x, h: x.clone())]).logits
        zeroed = run_with_hooks(tiny, ids, [(hook_name(1, "attn.hook_z"), lambda x, h: torch.zeros_like(x))]).logits
    torch.testing.assert_close(same, base, atol=0, rtol=0)
    assert (zeroed - base).abs().max() > 1e-3
    assert hook_count(tiny.model) == 0


def test_hooks_are_removed_after_an_exception_in_a_hooked_forward(tiny: LoadedModel, hook_count) -> None:
    def boom(x: torch.Tensor, hook: object) -> None:
        raise RuntimeError("boom")

    names = [hook_name(0, "hook_resid_pre"), hook_name(0, "attn.hook_z"), hook_name(1, "mlp.hook_post"), hook_name(2, "hook_mlp_out")]
    fwd = [(n, lambda x, h: None) for n in names[:-1]] + [(names[-1], boom)]
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(tiny, fwd):
            assert hook_count(tiny.model) == len(fwd)
            tiny.model(input_ids=_ids(tiny))
    assert hook_count(tiny.model) == 0


def test_layer_out_of_range_is_a_one_line_hook_error(tiny: LoadedModel, hook_count) -> None:
    n = tiny.shape.n_layers
    with pytest.raises(HookError) as err:
        resolve(tiny, hook_name(n, "hook_resid_pre"))
    msg = str(err.value)
    assert "\n" not in msg and f"layer {n} out of range" in msg and f"0..{n - 1}" in msg
    with pytest.raises(HookError) as err:
        resolve(tiny, "blocks.0.hook_nonsense")
    assert "\n" not in str(err.value)
    # a bad name in a list attaches nothing
    with pytest.raises(HookError):
        with hooks(tiny, [(hook_name(0, "hook_resid_pre"), lambda x, h: None), (hook_name(n + 3, "hook_mlp_out"), lambda x, h: None)]):
            pass
    assert hook_count(tiny.model) == 0
