"""mech.patching.spec: the component registry is the one place a granularity is defined. A kind registered here
(d_model dimensions of attn_out, as units) is patched by the fast and naive exact paths and by AtP, labelled
and checked, with no other change."""

from __future__ import annotations

import numpy as np
import pytest

from mech.components import Component, component_at
from mech.models import LoadedModel
from mech.patching import (
    COMPONENT_REGISTRY,
    COMPONENTS,
    Patch,
    PatchingError,
    Site,
    SiteComponent,
    attribution_sweep,
    end_positions,
    head_patches,
    layer_patches,
    neuron_patches,
    patch_sweep,
    register_component,
    unit_patches,
)

PAIRS = [("How do I build a bomb?", "How do I build a shed?"), ("How do I steal a car?", "How do I fix a car?")]
IDS = [5, 7]
ATOL = 1e-5


@pytest.fixture
def attn_dims():
    """``attn_dim``: one unit per residual dimension of a layer's attention output."""
    before = dict(COMPONENT_REGISTRY), dict(COMPONENTS)
    register_component(SiteComponent("attn_dim", "hook_attn_out", unit="dim", n_units=lambda s: s.d_model))
    yield "attn_dim"
    COMPONENT_REGISTRY.clear(), COMPONENT_REGISTRY.update(before[0])
    COMPONENTS.clear(), COMPONENTS.update(before[1])


def test_builtin_registry():
    assert list(COMPONENT_REGISTRY) == ["resid_pre", "attn_out", "mlp_out", "z", "mlp_post", "resid_post"]
    assert COMPONENTS["z"] == "attn.hook_z" and COMPONENT_REGISTRY["z"].unit == "head"
    assert Site(3, "resid_post", (-1,)).slot == 4 and Site(3, "resid_post", (-1,)).kind == "resid"
    assert Site(3, "mlp_post", (-1,), (2,)).kind == "mlp_post"
    with pytest.raises(PatchingError, match=r"index is only for z \(heads\) and mlp_post \(neurons\)"):
        Site(0, "attn_out", (-1,), (1,))
    with pytest.raises(PatchingError, match="unknown component"):
        Site(0, "attn_dim", (-1,))


def test_a_registered_granularity_is_patched_like_the_builtin_ones(tiny_qwen2: LoadedModel, attn_dims: str):
    lm = tiny_qwen2
    pos = end_positions(3)
    d = lm.shape.d_model
    units = [(1, 0), (1, d - 1), (2, 3)]
    patches = unit_patches(attn_dims, units, pos)
    assert [p.label for p in patches][0] == {"layer": 1, "component": "attn_dim", "dim": 0, "position": "all"}
    fast = patch_sweep(lm, PAIRS, patches, refusal_ids=IDS, method="fast")
    naive = patch_sweep(lm, PAIRS, patches, refusal_ids=IDS, method="naive")
    np.testing.assert_allclose(fast.raw, naive.raw, atol=ATOL)
    assert fast.ids() == ["dim1.0-all", f"dim1.{d - 1}-all", "dim2.3-all"]
    # every unit of a layer together is the whole attn_out
    every = Patch((Site(2, attn_dims, pos, tuple(range(d))),))
    whole = Patch((Site(2, "attn_out", pos),))
    both = patch_sweep(lm, PAIRS, [every, whole], refusal_ids=IDS)
    np.testing.assert_allclose(both.raw[:, 0], both.raw[:, 1], atol=ATOL)
    # AtP: the per-unit estimates sum to the whole vector's estimate
    atp = attribution_sweep(lm, PAIRS, unit_patches(attn_dims, [(2, i) for i in range(d)], pos) + [whole],
                            refusal_ids=IDS)
    np.testing.assert_allclose(atp.delta[:, :d].sum(1), atp.delta[:, d], atol=1e-4)
    with pytest.raises(PatchingError, match=f"dim {d} out of range at layer 1"):
        patch_sweep(lm, PAIRS, unit_patches(attn_dims, [(1, d)], pos), refusal_ids=IDS)


def test_a_patch_names_the_component_ablation_knows():
    """Patching and ablation share one vocabulary (the hook a component lives in): a head patch is the head that
    ablation ablates, with no format string in between."""
    heads = head_patches(3, 4, layers=[1], positions=end_positions(2))
    assert [p.component().id for p in heads] == ["L1.H0", "L1.H1", "L1.H2", "L1.H3"]
    assert neuron_patches(3, 32, neurons=[(2, 17)], positions=end_positions(1))[0].component() == Component("neuron", 2, 17)
    blocks = {p.label["component"]: p for p in layer_patches(3, ("attn_out", "mlp_out", "resid_pre"), layers=[0],
                                                             positions=end_positions(1))}
    assert blocks["attn_out"].component().id == "L0.attn" and blocks["mlp_out"].component().id == "L0.mlp"
    with pytest.raises(PatchingError, match="no ablatable component lives in 'hook_resid_pre'"):
        blocks["resid_pre"].component()
    with pytest.raises(ValueError, match="no ablatable component"):
        component_at(0, "hook_resid_post")

