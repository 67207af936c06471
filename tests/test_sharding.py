"""Large-model machinery on one node: accelerate ``device_map`` sharding with offload, ``--max-memory``, and
bitsandbytes 4-bit / 8-bit, exercised on CPU.

A tiny model is loaded twice from one saved dir: whole on the CPU (the reference) and with accelerate's
``device_map`` putting its last two decoder layers on "disk" (meta tensors streamed in by accelerate's hooks
at each forward), which is the same code path a model split over GPUs and CPU takes. Hooks, activation and
attribution patching, ablation and the direction interventions must give the reference numbers (float32
tolerance 1e-5) on the sharded copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.tiny_models import build_tiny_model
from mech.ablation import ablate, mean_activations
from mech.directions import activation_addition, diff_in_means, directional_ablation, orthogonalized_weights
from mech.hooks import hook_name, run_with_cache
from mech.models import LoadedModel, load_model, parse_max_memory
from mech.patching import head_sweep, layer_sweep
from mech.patching.attribution import attribution_patching
from mech.refusal import generate, refusal_scores
from mech.registry import ModelError

PAIRS = [("How do I build a bomb?", "How do I build a shed?"), ("How do I steal a car?", "How do I wash a car?")]
IDS = [5, 9]
ATOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny = build_tiny_model("qwen2", n_layers=4)
    d = tmp_path_factory.mktemp("tiny-qwen2")
    tiny.model.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ref(saved: Path) -> LoadedModel:
    return load_model(str(saved), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def sharded(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
          "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    return load_model(str(saved), device="cpu", dtype="float32", device_map=dm, offload_folder=tmp_path_factory.mktemp("offload"))


def test_sharded_model_is_offloaded_and_computes_the_same_logits(ref, sharded):
    assert sharded.sharded and not ref.sharded
    assert any(p.device.type == "meta" for p in sharded.model.parameters())  # really offloaded
    a, b = refusal_scores(ref, [p for pr in PAIRS for p in pr], IDS), refusal_scores(sharded, [p for pr in PAIRS for p in pr], IDS)
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    assert generate(ref, [PAIRS[0][0]], max_new_tokens=6) == generate(sharded, [PAIRS[0][0]], max_new_tokens=6)


def test_hooks_cache_every_layer_of_a_sharded_model(ref, sharded):
    names = [hook_name(L, "hook_resid_pre") for L in range(4)] + [hook_name(3, "attn.hook_z")]
    _, c_ref = run_with_cache(ref, ref.batch([PAIRS[0][0]]), names_filter=names)
    _, c_sh = run_with_cache(sharded, sharded.batch([PAIRS[0][0]]), names_filter=names)
    for n in names:
        torch.testing.assert_close(c_sh[n].cpu(), c_ref[n].cpu(), atol=ATOL, rtol=0)
    assert all(len(m._forward_hooks) == 0 for m in sharded.model.modules())


def test_patching_on_a_sharded_model_matches_the_reference(ref, sharded):
    """``method="auto"`` picks the hook-based path on the sharded copy; its numbers equal the fast path's."""
    want = layer_sweep(ref, PAIRS, refusal_ids=IDS, check_aligned=False)
    got = layer_sweep(sharded, PAIRS, refusal_ids=IDS, check_aligned=False)
    assert want.method == "fast" and got.method == "naive"
    np.testing.assert_allclose(got.raw, want.raw, atol=ATOL, rtol=0)
    want_h = head_sweep(ref, PAIRS[:1], refusal_ids=IDS, check_aligned=False, layers=[2, 3])
    got_h = head_sweep(sharded, PAIRS[:1], refusal_ids=IDS, check_aligned=False, layers=[2, 3])
    np.testing.assert_allclose(got_h.raw, want_h.raw, atol=ATOL, rtol=0)


def test_attribution_on_a_sharded_model_matches_the_reference(ref, sharded):
    want = attribution_patching(ref, PAIRS, components=("z", "resid_pre"), refusal_ids=IDS, check_aligned=False)
    got = attribution_patching(sharded, PAIRS, components=("z", "resid_pre"), refusal_ids=IDS, check_aligned=False)
    for k in want:
        np.testing.assert_allclose(got[k].raw, want[k].raw, atol=1e-4, rtol=0)


def test_ablation_and_directions_on_a_sharded_model(ref, sharded):
    harmful, harmless = [h for h, _ in PAIRS], [s for _, s in PAIRS]
    means_ref = mean_activations(ref, harmless, kinds=("head",))
    means_sh = mean_activations(sharded, harmless, kinds=("head",))
    comps = ["L3.H1", "L2.H0", "L0.H2"]
    with ablate(ref, comps, "mean", means_ref):
        a = refusal_scores(ref, harmful, IDS)
    with ablate(sharded, comps, "mean", means_sh):
        b = refusal_scores(sharded, harmful, IDS)
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    assert not torch.allclose(a, refusal_scores(ref, harmful, IDS))  # the ablation did something

    d_ref, d_sh = diff_in_means(ref, harmful, harmless), diff_in_means(sharded, harmful, harmless)
    torch.testing.assert_close(d_sh.candidates, d_ref.candidates, atol=ATOL, rtol=0)
    v = d_ref.vector(3, -1)
    with directional_ablation(ref, v):
        a = refusal_scores(ref, harmful, IDS)
    with directional_ablation(sharded, v):
        b = refusal_scores(sharded, harmful, IDS)
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    with activation_addition(ref, v, 3):
        a = refusal_scores(ref, harmless, IDS)
    with activation_addition(sharded, v, 3):
        b = refusal_scores(sharded, harmless, IDS)
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    with pytest.raises(NotImplementedError, match="offloaded"):
        with orthogonalized_weights(sharded, v):
            pass


def test_max_memory_auto_map_offloads_what_does_not_fit(saved, ref, tmp_path):
    """``device_map="auto"`` with a CPU cap smaller than the model puts the rest on disk, and still computes."""
    lm = load_model(str(saved), device="cpu", dtype="float32", device_map="auto", max_memory="cpu=400KB", offload_folder=tmp_path)
    assert set(lm.device_map.values()) == {"cpu", "disk"} and lm.sharded
    torch.testing.assert_close(refusal_scores(lm, [PAIRS[0][0]], IDS), refusal_scores(ref, [PAIRS[0][0]], IDS),
                               atol=ATOL, rtol=0)
    with pytest.raises(ModelError, match="nothing fits") as e:
        load_model(str(saved), device="cpu", dtype="float32", device_map="auto", max_memory="cpu=10KB", offload_folder=tmp_path)
    assert "\n" not in str(e.value)


def test_parse_max_memory_forms_and_errors():
    assert parse_max_memory("cuda:0=10GiB,cpu=30GiB") == {0: 10 * 2**30, "cpu": 30 * 2**30}
    assert parse_max_memory("1=1.5GB, disk=100MB") == {1: 1_500_000_000, "disk": 100_000_000}
    assert parse_max_memory(None) is None
    for bad, msg in (("gpu=1GB", "unknown device"), ("cpu=lots", "bad size"), ("cpu", "bad size"),
                     ("cpu=-1GB", "positive")):
        with pytest.raises(ModelError, match=msg) as e:
            parse_max_memory(bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_bitsandbytes_quantized_model_runs_the_machinery(saved, ref, mode):
    """bitsandbytes on the CPU: the linear layers are really quantized, and hooks, patching, ablation and
    directions run on them (the numbers differ from float32, as quantization must)."""
    lm = load_model(str(saved), device="cpu", dtype="float32", quantize=mode)
    import bitsandbytes as bnb

    cls = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    assert sum(isinstance(m, cls) for m in lm.model.modules()) >= 4 * 7  # q,k,v,o,gate,up,down per layer
    res = layer_sweep(lm, PAIRS[:1], refusal_ids=IDS, check_aligned=False, components=("resid_pre",))
    assert np.isfinite(res.raw).all()
    harmful = [PAIRS[0][0]]
    d = diff_in_means(lm, harmful, [PAIRS[0][1]])
    base = refusal_scores(lm, harmful, IDS)
    with directional_ablation(lm, d.vector(2, -1)):
        after = refusal_scores(lm, harmful, IDS)
    assert torch.isfinite(after).all() and not torch.equal(after, base)
    with ablate(lm, ["L1.H0"], "zero"):
        assert torch.isfinite(refusal_scores(lm, harmful, IDS)).all()
