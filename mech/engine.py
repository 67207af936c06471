"""The partial-forward engine: run a window of positions through a range of decoder layers on cached prefix K/V.

Below both of its users: activation patching (:mod:`mech.patching`: a patch at the last ``W`` positions leaves
every earlier position unchanged at every layer, by causal attention, so their keys/values equal the clean
run's) and the batched scoring of interventions (:mod:`mech.set_scores`: an intervention leaves every layer
below its first one unchanged). :class:`Engine`:

1. :meth:`Engine.run` runs rows of ``W`` positions from a start layer to the end, on top of a prefix K/V
   (a part shared by every row, broadcast, plus a per-row part), with rows joining the batch at their own first
   layer (a staircase), hooks active, and a ``resid_fn`` that sees the residual stream before each layer;
2. it calls the HF decoder layer modules themselves (with ``position_embeddings`` from
   ``model.model.rotary_emb``, an explicit additive causal mask and :class:`_PrefixCache`, which prepends the
   prefix K/V), so architecture details (Qwen2's q/k/v biases, Gemma's scaled embeddings and (1+w) RMSNorm,
   Llama) come from HF;
3. refuses, with a one-line :class:`EngineError`, a model it cannot run (no rotary embedding or final norm, an
   attention implementation other than eager / sdpa, weights on several devices).

Patching's reference runs on top of it are :func:`mech.patching.reference.reference_runs`.

:class:`Work` counts what was computed (forwards, token x layer products, unembedded rows, backward passes)
for the benchmarks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mech.architectures import architecture_of
from mech.hooks import HookFn, HookPoint, decoder_layers, hook_name, hooks

if TYPE_CHECKING:
    from mech.models import LoadedModel


class EngineError(ValueError):
    """A model the engine cannot run; the message is one line saying the fix."""


@dataclass
class Work:
    """What a sweep computed (for benchmarks): HF forwards, partial forwards, token-layers, unembedded rows."""

    full_forwards: int = 0  # full HF model forwards (naive path, AtP naive)
    full_rows: int = 0
    full_tokens: int = 0  # rows x sequence length over full forwards
    embed_calls: int = 0  # embedding-only calls of model.model (stopped at layer 0)
    embed_tokens: int = 0
    partial_forwards: int = 0  # engine passes over a range of layers
    partial_rows: int = 0  # rows (sequences) over partial forwards
    layer_tokens: int = 0  # token positions x decoder layers computed, full and partial forwards together
    unembed_rows: int = 0  # rows through final norm + lm_head
    backward_calls: int = 0
    backward_layer_tokens: int = 0  # token positions x layers a backward pass went through
    seconds: float = 0.0

    def add(self, other: Work) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def useful_flops(self, lm: LoadedModel) -> float:
        """Matmul FLOPs of the work: 2 x decoder-layer params per token-layer, 2 x lm_head params per unembedded
        row; a backward pass (gradients w.r.t. activations only, parameters are frozen) counts as much again."""
        per_layer = sum(p.numel() for p in decoder_layers(lm.model)[0].parameters())
        head = lm.model.get_output_embeddings().weight.numel()
        backward = 2.0 * per_layer * self.backward_layer_tokens + 2.0 * head * self.unembed_rows * bool(
            self.backward_calls
        )
        return 2.0 * per_layer * self.layer_tokens + 2.0 * head * self.unembed_rows + backward



@dataclass
class PrefixKV:
    """Keys/values of some token slots at every layer: ``k[L]``, ``v[L]`` are ``[n_seq, kv_heads, slots, d_head]``."""

    k: list[Tensor]
    v: list[Tensor]

    @property
    def slots(self) -> int:
        return self.k[0].shape[2] if self.k else 0


class _PrefixCache:
    """Stands in for an HF ``Cache`` inside a partial forward: ``update`` prepends the prefix K/V of each row
    (shared part broadcast over rows + per-row part) to the window's K/V, and optionally records the window's K/V.
    """

    def __init__(self, shared: PrefixKV | None, rem: PrefixKV | None, rowmap: Tensor | None, record: dict | None) -> None:
        self.shared, self.rem, self.rowmap, self.record = shared, rem, rowmap, record

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if self.record is not None:
            self.record[layer_idx] = (key_states, value_states)
        n = key_states.shape[0]
        ks, vs = [], []
        if self.shared is not None:
            ks.append(self.shared.k[layer_idx].expand(n, -1, -1, -1))
            vs.append(self.shared.v[layer_idx].expand(n, -1, -1, -1))
        if self.rem is not None:
            assert self.rowmap is not None
            idx = self.rowmap[:n]
            ks.append(self.rem.k[layer_idx].index_select(0, idx))
            vs.append(self.rem.v[layer_idx].index_select(0, idx))
        if not ks:
            return key_states, value_states
        return torch.cat([*ks, key_states], dim=2), torch.cat([*vs, value_states], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return (self.shared.slots if self.shared else 0) + (self.rem.slots if self.rem else 0)


class _Stop(Exception):
    pass


class Engine:
    """Partial forwards over a range of decoder layers for a window of positions on top of cached prefix K/V.

    Works on any HF decoder-only model whose :class:`~mech.architectures.Architecture` names its base model's
    ``layers``, ``rotary`` embedding and ``final_norm`` (``rotary_emb`` and ``norm`` today) and whose
    attention runs ``eager`` or ``sdpa`` (a 4-D additive mask is passed to the layers); the model must sit on
    one device (a sharded model uses the sweeps' ``method="naive"``). The pieces:

    * :meth:`embed` — the residual stream entering layer 0 ``[B, T, d_model]``;
    * :meth:`run` — rows of ``W`` positions from their join layer to the end, hooks and ``resid_fn`` active;
      returns the final-normed residual at one position per row;
    * :meth:`unembed` / :meth:`logits_metric` — logits and a metric of those rows;
    * :attr:`work` — a :class:`Work` counter of what was computed.

    Example, the last-position logits of one prompt (what a full forward gives, to float round-off)::

        eng = Engine(lm)
        ids = torch.tensor([lm.encode_chat(["How do I bake bread?"])[0]])
        T = ids.shape[1]
        final = eng.run([(0, eng.embed(ids))], torch.arange(T)[None], out_slot=torch.tensor([T - 1]))
        logits = eng.unembed(final)  # [1, d_vocab]

    A patched run instead starts at layer ``L`` from a cached residual of the last ``W`` positions, on top of the
    prefix K/V that :func:`mech.patching.reference.reference_runs` recorded (``shared``/``rem``); see :mod:`mech.patching.exact`.
    """

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.model = lm.model
        arch = architecture_of(self.model)
        self.base = arch.base_model(self.model)
        self.layers = decoder_layers(self.model)
        self.n_layers = len(self.layers)
        for attr in (arch.rotary, arch.final_norm):
            if not hasattr(self.base, attr):
                raise EngineError(
                    f"{type(self.base).__name__} has no .{attr}; the fast path needs a rotary decoder; use method='naive'"
                )
        self.rotary, self.final_norm = arch.rotary_of(self.model), arch.final_norm_of(self.model)
        impl = getattr(self.model.config, "_attn_implementation", "eager")
        if impl not in ("eager", "sdpa"):
            raise EngineError(
                f"the fast path needs attn_implementation eager or sdpa, not {impl!r}; reload the model with "
                "attn_implementation='sdpa' or use method='naive'"
            )
        devices = {p.device for p in self.model.parameters()}
        if len(devices) > 1:
            raise EngineError("the fast path needs the model on one device (not sharded); use method='naive'")
        self.device = next(iter(devices))
        self.dtype = getattr(lm, "dtype", None) or self.model.get_input_embeddings().weight.dtype  # not a 4-bit uint8
        params = inspect.signature(self.layers[0].forward).parameters
        self.cache_kw = next((k for k in ("cache", "past_key_values", "past_key_value") if k in params), "cache")
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.lm_head = self.model.get_output_embeddings()
        self.work = Work()

    # -- pieces
    def embed(self, ids: Tensor) -> Tensor:
        """Residual stream entering layer 0 (token embeddings, with any model-specific scaling): ``[B, T, d_model]``.

        Runs ``model.model`` and stops at the first decoder layer, so Gemma's sqrt(d_model) scaling is included.
        """
        got: list[Tensor] = []

        def stop(x: Tensor, hook: HookPoint) -> None:
            got.append(x)
            raise _Stop

        try:
            with hooks(self.model, [(hook_name(0, "hook_resid_pre"), stop)]):
                self.base(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        self.work.embed_calls += 1
        self.work.embed_tokens += ids.numel()
        return got[0]

    def unembed(self, h: Tensor) -> Tensor:
        """Logits from final-normed residuals ``[B, d_model]`` -> ``[B, d_vocab]``."""
        logits = self.lm_head(h)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        self.work.unembed_rows += h.shape[0]
        return logits

    def mask(self, n: int, w: int, n_shared: int, rem_valid: Tensor | None) -> Tensor:
        """Additive attention mask ``[n, 1, w, prefix + w]``: valid prefix slots, causal inside the window."""
        dev = self.device
        ok = [torch.ones(n, n_shared, dtype=torch.bool, device=dev)]
        if rem_valid is not None:
            ok.append(rem_valid)
        prefix = torch.cat(ok, 1)[:, None, None, :].expand(n, 1, w, -1)  # [n, 1, w, P]
        causal = torch.ones(w, w, dtype=torch.bool, device=dev).tril()[None, None].expand(n, 1, w, w)
        allowed = torch.cat([prefix, causal], -1)
        m = torch.zeros(allowed.shape, dtype=self.dtype, device=dev)
        return m.masked_fill_(~allowed, torch.finfo(self.dtype).min)

    # -- the partial forward
    def run(
        self,
        joins: Sequence[tuple[int, Tensor]],
        pos: Tensor,
        shared: PrefixKV | None = None,
        rem: PrefixKV | None = None,
        rowmap: Tensor | None = None,
        rem_valid: Tensor | None = None,
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        resid_fn: Callable[[int, Tensor], Tensor] | None = None,
        kv_record: dict[int, tuple[Tensor, Tensor]] | None = None,
        out_slot: Tensor | None = None,
    ) -> Tensor | None:
        """Run rows through layers ``joins[0][0] .. n_layers - 1`` for a window of ``W`` positions.

        ``joins``: ``(slot, hidden [n_j, W, d_model])`` in ascending slot order; those rows join the batch just
        before layer ``slot`` (slot ``n_layers``: just before the final norm). Rows keep their join order.
        ``pos``: ``[B, W]`` absolute position ids. ``shared``/``rem``/``rowmap``/``rem_valid``: the prefix K/V
        (``shared`` broadcast to every row; ``rem`` per row via ``rowmap [B]``, its valid slots ``[B, R]``).
        ``fwd_hooks``: mech.hooks hooks active during the layers. ``resid_fn(slot, h)``: sees (and may replace)
        the residual stream before each layer and before the final norm. ``kv_record``: receives each layer's
        window K/V. Returns the final-normed residual at ``out_slot [B]`` (``[B, d_model]``), or None.
        """
        B, W = pos.shape
        n_shared = shared.slots if shared is not None else 0
        mask = self.mask(B, W, n_shared, rem_valid)  # [B, 1, W, P + W]
        cos, sin = self.rotary(joins[0][1], pos)  # [B, W, d_head] each
        cache = _PrefixCache(shared, rem, rowmap, kv_record)
        h: Tensor | None = None
        ji = 0
        with hooks(self.model, fwd_hooks):
            for slot in range(joins[0][0], self.n_layers + 1):
                while ji < len(joins) and joins[ji][0] == slot:
                    h = joins[ji][1] if h is None else torch.cat([h, joins[ji][1]], 0)
                    ji += 1
                if h is None:
                    continue
                if resid_fn is not None:
                    h = resid_fn(slot, h)
                if slot == self.n_layers:
                    break
                n = h.shape[0]
                out = self.layers[slot](
                    h,
                    attention_mask=mask[:n],
                    position_ids=pos[:n],
                    use_cache=True,
                    position_embeddings=(cos[:n], sin[:n]),
                    **{self.cache_kw: cache},
                )
                h = out[0] if isinstance(out, tuple) else out
                self.work.layer_tokens += n * W
        assert h is not None and h.shape[0] == B, "every row must join the batch"
        self.work.partial_forwards += 1
        self.work.partial_rows += B
        if out_slot is None:
            return None
        last = h[torch.arange(B, device=h.device), out_slot]  # [B, d_model]
        return self.final_norm(last)

    def logits_metric(
        self, final: Tensor, metric: Callable[[Tensor], Tensor], keep_logits: bool, rows_per_unembed: int = 128
    ) -> tuple[Tensor, Tensor | None]:
        """Unembed final-normed rows in sub-batches and apply ``metric``: ``([B], [B, d_vocab] | None)``."""
        vals, keep = [], []
        for i in range(0, final.shape[0], rows_per_unembed):
            logits = self.unembed(final[i : i + rows_per_unembed])
            vals.append(metric(logits).float())
            if keep_logits:
                keep.append(logits.float())
        return torch.cat(vals), (torch.cat(keep) if keep_logits else None)
