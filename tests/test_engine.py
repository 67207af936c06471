"""mech.engine: the partial-forward engine as its docstring shows it (full runs equal an HF forward;
a run joined at layer L from the reference residual equals the full run) and its work counter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mech.engine import Engine, EngineError, Work
from mech.models import LoadedModel
from mech.patching import PatchingError
from mech.patching.reference import engine as patching_engine

PROMPT = "How do I bake bread?"


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma"])
@torch.inference_mode()
def test_engine_run_equals_a_full_forward(arch: str, request: pytest.FixtureRequest) -> None:
    lm: LoadedModel = request.getfixturevalue(f"tiny_{arch}")
    eng = Engine(lm)
    ids = torch.tensor([lm.encode_chat([PROMPT])[0]])
    T = ids.shape[1]
    final = eng.run([(0, eng.embed(ids))], torch.arange(T)[None], out_slot=torch.tensor([T - 1]))
    torch.testing.assert_close(eng.unembed(final), lm.model(input_ids=ids).logits[:, -1], atol=1e-5, rtol=1e-5)
    assert eng.work.partial_forwards == 1 and eng.work.layer_tokens == T * lm.shape.n_layers
    assert eng.work.embed_calls == 1 and eng.work.unembed_rows == 1


@torch.inference_mode()
def test_rows_joining_late_see_the_same_stream(tiny_qwen2: LoadedModel) -> None:
    """A row that joins at layer 2 with the residual a full run had there ends where the full run ends."""
    lm = tiny_qwen2
    eng = Engine(lm)
    ids = torch.tensor([lm.encode_chat([PROMPT])[0]])
    T = ids.shape[1]
    seen: dict[int, torch.Tensor] = {}

    def keep(slot: int, h: torch.Tensor) -> torch.Tensor:
        seen.setdefault(slot, h[:1].clone())
        return h

    pos = torch.arange(T)[None].expand(2, T)
    h0 = eng.embed(ids)
    full = eng.run([(0, h0)], pos[:1], resid_fn=keep, out_slot=torch.tensor([T - 1]))
    both = eng.run([(0, h0), (2, seen[2])], pos, out_slot=torch.tensor([T - 1, T - 1]))
    torch.testing.assert_close(both[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], full[0], atol=1e-5, rtol=1e-5)


def test_work_adds_and_counts_flops(tiny_qwen2: LoadedModel) -> None:
    a, b = Work(layer_tokens=3, unembed_rows=1), Work(layer_tokens=2, backward_calls=1, backward_layer_tokens=2)
    a.add(b)
    assert (a.layer_tokens, a.backward_calls) == (5, 1) and set(a.to_dict()) >= {"layer_tokens", "seconds"}
    assert a.useful_flops(tiny_qwen2) > Work(layer_tokens=5, unembed_rows=1).useful_flops(tiny_qwen2) > 0


def test_engine_refuses_a_non_rotary_model() -> None:
    class Base(torch.nn.Module):
        layers = torch.nn.ModuleList()

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Base()
            self.config = SimpleNamespace(model_type="qwen2")  # a registered family (mech.architectures)

    class FakeLM:
        model = Model()

    with pytest.raises(EngineError, match="has no .rotary_emb; the fast path needs a rotary decoder"):
        Engine(FakeLM())  # type: ignore[arg-type]
    # a sweep's fast path says it as a PatchingError, as before the engine moved below patching
    with pytest.raises(PatchingError, match="has no .rotary_emb; the fast path needs a rotary decoder"):
        patching_engine(FakeLM())  # type: ignore[arg-type]
