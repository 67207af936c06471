"""Exact activation patching between harmful and harmless runs: batched, end-aligned, fast by construction.

A *patch* copies activations of a **source** run into a **receiver** run and reads the refusal metric at the
receiver's last position. Two directions:

* ``harmful_to_harmless`` (alias ``denoise``): source = harmful prompt, receiver = its harmless twin. Does the
  patched component *induce* refusal?
* ``harmless_to_harmful`` (alias ``noise``): source = harmless, receiver = harmful. Does it *remove* refusal?

Effects are reported raw (the metric of the patched run) and **normalized** per pair,
``(patched - clean) / (source - clean)``: 0 = the receiver's own (clean) baseline, 1 = the source run's baseline.

Positions are **end-aligned** by default: negative indices from the end. The chat template's post-instruction
tokens (``<|im_end|>\\n<|im_start|>assistant\\n`` for Qwen: 5 tokens) are identical in every prompt, so position
``-i`` of the source is patched into position ``-i`` of the receiver although the prompts differ in length.
Non-negative (absolute) positions are allowed for pairs whose prompts have the same token length.

Granularity (see :func:`layer_patches`, :func:`head_patches`, :func:`neuron_patches`): layer x {resid_pre,
attn_out, mlp_out} x position (each position, or all together); every attention head (``attn.hook_z``); MLP
neurons (``mlp.hook_post``). A :class:`Patch` is a set of :class:`Site` s, so circuits (several heads in several
layers patched together) are patches too.

Speed (``method="fast"``, the default). TransformerLens-style patching runs one full forward per patch. Here:

1. **Reference runs** share work: the token prefix common to every prompt (the system prompt) runs once; each
   prompt's remainder runs once, batched, on top of that prefix's key/value cache.
2. **Patched runs start at the patched layer** from the receiver's cached residual stream, and run only the
   last ``W`` positions (the patched window) on top of the receiver's cached prefix keys/values: a patch at the
   last ``W`` positions leaves every earlier position unchanged at every layer (causal attention), so their K/V
   equal the clean run's.
3. **Many patches per forward**: patches are rows of one batch; rows join the batch at their first patched layer
   (a staircase), so one pass over the layers serves every patch of a chunk.
4. The unembedding (final norm + lm_head) runs at the last position only; ``torch.inference_mode``; one host
   sync per sweep (all metrics are gathered on the device and copied back once); tqdm on long sweeps.

The partial forward calls the HF decoder layer modules themselves (with ``position_embeddings`` from
``model.model.rotary_emb``, an explicit additive causal mask and a small cache object that prepends the prefix
K/V), so architecture details (Qwen2's q/k/v biases, Gemma's scaled embeddings and (1+w) RMSNorm, Llama) come
from HF. ``method="naive"`` is the simple reference: one full HF forward per patch and pair, with hooks; tests
check the two agree, and benchmarks use it as the baseline.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mech.hooks import HookFn, HookPoint, decoder_layers, hook_name, hooks, run_with_cache
from mech.refusal import RefusalIdsError, check_refusal_ids, refusal_log_odds, vocab_size

log = logging.getLogger(__name__)

DENOISE = "harmful_to_harmless"
NOISE = "harmless_to_harmful"
DIRECTIONS = (DENOISE, NOISE)
_DIRECTION_ALIASES = {
    DENOISE: DENOISE,
    "denoise": DENOISE,
    "harmful->harmless": DENOISE,
    NOISE: NOISE,
    "noise": NOISE,
    "harmless->harmful": NOISE,
}

# component -> hook kind (mech.hooks). resid_post[L] is resid_pre[L+1] (for the last layer: the final residual).
COMPONENTS: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "z": "attn.hook_z",
    "mlp_post": "mlp.hook_post",
    "resid_post": "hook_resid_post",
}
LAYER_COMPONENTS = ("resid_pre", "attn_out", "mlp_out")
_INNER = ("z", "attn_out", "mlp_post", "mlp_out")  # components inside a layer, patched by hooks
_ALL = "all"  # label value of "position" when all positions are patched together
_NAN_EPS = 1e-6  # |source - clean| below this: the normalized effect is undefined (NaN)


class PatchingError(ValueError):
    """Bad patching input (layer, position, pair alignment, model); the message is one line saying the fix."""


# ----------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Site:
    """One place to patch: ``component`` of ``layer`` at ``positions``, optionally only some heads/neurons.

    ``positions``: negative = end-aligned (``-1`` is the last token); non-negative = absolute (only for pairs
    whose prompts have the same token length). ``index``: heads for ``z``, neurons for ``mlp_post``; ``None`` =
    the whole activation.
    """

    layer: int
    component: str
    positions: tuple[int, ...]
    index: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise PatchingError(f"unknown component {self.component!r}; use one of {', '.join(COMPONENTS)}")
        object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        if not self.positions:
            raise PatchingError(f"site {self.component} of layer {self.layer} has no positions; give at least one")
        if len({p < 0 for p in self.positions}) > 1:
            raise PatchingError(
                f"positions {self.positions} mix end-aligned (negative) and absolute indices; use one kind per site"
            )
        if self.index is not None:
            if self.component not in ("z", "mlp_post"):
                raise PatchingError(f"index is only for z (heads) and mlp_post (neurons), not {self.component!r}")
            object.__setattr__(self, "index", tuple(int(i) for i in self.index))

    @property
    def kind(self) -> str:
        """Internal kind: ``resid`` (a residual-stream slot) or one of ``z attn_out mlp_post mlp_out``."""
        return "resid" if self.component in ("resid_pre", "resid_post") else self.component

    @property
    def slot(self) -> int:
        """Layer for inner components; residual slot for resid (resid_pre[L] = slot L, resid_post[L] = L + 1)."""
        return self.layer + 1 if self.component == "resid_post" else self.layer

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "component": self.component,
            "positions": list(self.positions),
            "index": None if self.index is None else list(self.index),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Site:
        idx = d.get("index")
        return cls(int(d["layer"]), str(d["component"]), tuple(d["positions"]), None if idx is None else tuple(idx))


@dataclass(frozen=True, eq=False)
class Patch:
    """A set of sites patched together in one run, with a label (``layer``, ``component``, ``head``, ...)."""

    sites: tuple[Site, ...]
    label: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"sites": [s.to_dict() for s in self.sites], "label": dict(self.label)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Patch:
        return cls(tuple(Site.from_dict(s) for s in d["sites"]), dict(d.get("label", {})))


def end_positions(k: int) -> tuple[int, ...]:
    """The last ``k`` positions as end-aligned indices: ``(-k, ..., -1)``."""
    if k < 1:
        raise PatchingError(f"need at least one end position, got k={k}")
    return tuple(range(-k, 0))


def template_suffix_len(lm: Any, system: str | None = None) -> int:
    """How many tokens the chat template puts after every user message (5 for Qwen's
    ``<|im_end|>\\n<|im_start|>assistant\\n``): the common suffix of two probe prompts with different endings."""
    a, b = lm.encode_chat(["Hello there", "What is 2 + 2?"], system=system)
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    if n == 0:
        raise PatchingError(f"{getattr(lm, 'name', 'model')}: prompts share no template suffix; pass positions=")
    return n


def _label(layer: int, component: str, position: int | str, **extra: Any) -> dict[str, Any]:
    return {"layer": layer, "component": component, **extra, "position": position}


def _position_groups(
    positions: Sequence[int], per_position: bool, together: bool
) -> list[tuple[int | str, tuple[int, ...]]]:
    groups: list[tuple[int | str, tuple[int, ...]]] = []
    if per_position:
        groups += [(p, (p,)) for p in positions]
    if together or not per_position:
        groups.append((_ALL, tuple(positions)))
    return groups


def layer_patches(
    n_layers: int,
    components: Sequence[str] = ("resid_pre",),
    layers: Sequence[int] | None = None,
    positions: Sequence[int] = end_positions(5),
    per_position: bool = False,
    together: bool = True,
) -> list[Patch]:
    """One patch per layer x component x position group (``per_position``: each position alone; ``together``:
    all ``positions`` in one patch; label ``position`` is the index or ``"all"``)."""
    for c in components:
        if c not in ("resid_pre", "attn_out", "mlp_out", "resid_post"):
            raise PatchingError(f"layer sweeps patch resid_pre, attn_out, mlp_out or resid_post, not {c!r}")
    out = []
    for L in range(n_layers) if layers is None else layers:
        for c in components:
            for plabel, pos in _position_groups(positions, per_position, together):
                out.append(Patch((Site(L, c, pos),), _label(L, c, plabel)))
    return out


def head_patches(
    n_layers: int,
    n_heads: int,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] = end_positions(5),
    per_position: bool = False,
    together: bool = True,
) -> list[Patch]:
    """One patch per attention head (its slice of ``attn.hook_z``) x position group."""
    out = []
    for L in range(n_layers) if layers is None else layers:
        for h in range(n_heads) if heads is None else heads:
            for plabel, pos in _position_groups(positions, per_position, together):
                out.append(Patch((Site(L, "z", pos, (h,)),), _label(L, "z", plabel, head=h)))
    return out


def neuron_patches(
    n_layers: int,
    d_mlp: int,
    neurons: Sequence[tuple[int, int]] | Mapping[int, Sequence[int]] | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] = end_positions(5),
    per_position: bool = False,
    together: bool = True,
) -> list[Patch]:
    """One patch per MLP neuron (a column of ``mlp.hook_post``) x position group.

    ``neurons``: ``None`` = every neuron of ``layers`` (``n_layers x d_mlp`` patches: large); a list of
    ``(layer, neuron)`` candidates; or ``{layer: [neuron, ...]}``.
    """
    if neurons is None:
        cand = [(L, n) for L in (range(n_layers) if layers is None else layers) for n in range(d_mlp)]
    elif isinstance(neurons, Mapping):
        cand = [(int(L), int(n)) for L, ns in neurons.items() for n in ns]
    else:
        cand = [(int(L), int(n)) for L, n in neurons]
    out = []
    for L, n in cand:
        for plabel, pos in _position_groups(positions, per_position, together):
            out.append(Patch((Site(L, "mlp_post", pos, (n,)),), _label(L, "mlp_post", plabel, neuron=n)))
    return out


# ---------------------------------------------------------------------------------------------- result


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


def _array(x: Any) -> np.ndarray:
    return np.array(x, dtype=np.float64)  # JSON null -> NaN


@dataclass
class PatchResult:
    """A labelled sweep: one column per patch, one row per pair.

    ``raw[i, j]``: the metric of pair ``i``'s receiver with patch ``j`` (for AtP: clean + the linear estimate).
    ``clean[i]`` / ``source[i]``: the unpatched receiver / source metric. ``normalized[i, j]`` =
    ``(raw - clean) / (source - clean)`` (NaN where ``|source - clean| < 1e-6``). ``mean``: normalized effect
    averaged over pairs. ``labels[j]``: ``layer``, ``component``, ``head``/``neuron``, ``position``.
    ``meta``: model, pairs, positions, refusal ids, metric, direction, timings, work counters.
    """

    kind: str  # "layer" | "head" | "neuron" | "custom"
    method: str  # "fast" | "naive" (exact) | "atp"
    direction: str
    patches: list[Patch]
    raw: np.ndarray  # [n_pairs, n_patches]
    clean: np.ndarray  # [n_pairs]
    source: np.ndarray  # [n_pairs]
    meta: dict[str, Any] = field(default_factory=dict)
    normalized: np.ndarray = field(default=None)  # type: ignore[assignment]  # [n_pairs, n_patches]
    logits: Tensor | None = field(default=None, repr=False)  # [n_pairs, n_patches, d_vocab] if asked for

    def __post_init__(self) -> None:
        self.raw = np.asarray(self.raw, dtype=np.float64).reshape(len(self.clean), len(self.patches))
        self.clean = np.asarray(self.clean, dtype=np.float64)
        self.source = np.asarray(self.source, dtype=np.float64)
        if self.normalized is None:
            den = (self.source - self.clean)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                self.normalized = np.where(np.abs(den) < _NAN_EPS, np.nan, (self.raw - self.clean[:, None]) / den)
        self.normalized = np.asarray(self.normalized, dtype=np.float64)

    # -- views
    @property
    def n_pairs(self) -> int:
        return self.raw.shape[0]

    @property
    def n_patches(self) -> int:
        return self.raw.shape[1]

    @property
    def labels(self) -> list[dict[str, Any]]:
        return [dict(p.label) for p in self.patches]

    @property
    def delta(self) -> np.ndarray:
        """``raw - clean``: the metric change of each patch, ``[n_pairs, n_patches]``."""
        return self.raw - self.clean[:, None]

    @property
    def mean(self) -> np.ndarray:
        """Normalized effect averaged over pairs (NaN pairs skipped), ``[n_patches]``."""
        with np.errstate(invalid="ignore"):
            return _nanmean(self.normalized)

    @property
    def raw_mean(self) -> np.ndarray:
        return self.raw.mean(0)

    def values(self, which: str = "normalized") -> np.ndarray:
        """``normalized``, ``raw`` or ``delta`` per pair: ``[n_pairs, n_patches]``."""
        if which not in ("normalized", "raw", "delta"):
            raise ValueError(f"which must be normalized, raw or delta, not {which!r}")
        return getattr(self, which)

    def axis(self, key: str) -> list[Any]:
        """The distinct values of label ``key`` in order of first appearance (the axis of :meth:`as_array`)."""
        seen: dict[Any, None] = {}
        for lab in self.patches:
            if key not in lab.label:
                raise KeyError(f"label key {key!r} not in this result; keys: {', '.join(lab.label)}")
            seen.setdefault(lab.label[key], None)
        return list(seen)

    def as_array(
        self, *keys: str, which: str = "normalized", per_pair: bool = False, where: Mapping[str, Any] | None = None
    ) -> np.ndarray:
        """Effects arranged on label axes, e.g. ``as_array("layer", "head")`` -> ``[n_layers, n_heads]`` of the
        mean normalized effect. ``per_pair=True`` adds a leading pair axis. ``where`` keeps matching labels only
        (e.g. ``{"position": "all"}``). Missing cells are NaN; two patches on one cell is an error."""
        sel = [j for j, p in enumerate(self.patches) if not where or all(p.label.get(k) == v for k, v in where.items())]
        sub = self.subset(sel)
        axes = [sub.axis(k) for k in keys]
        index = [{v: i for i, v in enumerate(ax)} for ax in axes]
        vals = sub.values(which) if per_pair else (sub.mean if which == "normalized" else _nanmean(sub.values(which)))
        shape = tuple(len(ax) for ax in axes)
        out = np.full(((sub.n_pairs,) if per_pair else ()) + shape, np.nan)
        filled = np.zeros(shape, dtype=bool)
        for j, p in enumerate(sub.patches):
            cell = tuple(index[a][p.label[k]] for a, k in enumerate(keys))
            if filled[cell]:
                raise ValueError(f"several patches fall on cell {dict(zip(keys, cell, strict=True))}; add keys or where=")
            filled[cell] = True
            if per_pair:
                out[(slice(None), *cell)] = vals[:, j]
            else:
                out[cell] = vals[j]
        return out

    def subset(self, idx: Sequence[int]) -> PatchResult:
        """The result restricted to patches ``idx`` (in that order)."""
        idx = list(idx)
        return replace(
            self,
            patches=[self.patches[j] for j in idx],
            raw=self.raw[:, idx],
            normalized=self.normalized[:, idx],
            logits=None if self.logits is None else self.logits[:, idx],
        )

    def top(self, k: int = 10, by: str = "abs") -> list[tuple[dict[str, Any], float]]:
        """The ``k`` patches with the largest mean normalized effect (``by``: ``abs`` or ``value``)."""
        m = self.mean
        key = np.abs(m) if by == "abs" else m
        order = np.argsort(-np.nan_to_num(key, nan=-np.inf), kind="stable")[:k]
        return [(self.labels[j], float(m[j])) for j in order]

    def ids(self) -> list[str]:
        """A short id per patch for pytest parametrization: ``layer12-resid_pre-all``, ``head12.3-all``."""
        out = []
        for p in self.patches:
            lab = p.label
            pos = lab.get("position", "all")
            pos = f"pos{pos}" if isinstance(pos, int) else str(pos)
            if "head" in lab:
                out.append(f"head{lab['layer']}.{lab['head']}-{pos}")
            elif "neuron" in lab:
                out.append(f"neuron{lab['layer']}.{lab['neuron']}-{pos}")
            elif "layer" in lab and "component" in lab:
                out.append(f"layer{lab['layer']}-{lab['component']}-{pos}")
            else:
                out.append("-".join(f"{k}{v}" for k, v in lab.items()) or "patch")
        return out

    def table(self) -> list[dict[str, Any]]:
        """A tidy table: one row per patch with its label, mean normalized effect, mean raw and mean delta."""
        mean, raw, delta = self.mean, self.raw.mean(0), self.delta.mean(0)
        return [
            {**p.label, "effect": float(mean[j]), "raw": float(raw[j]), "delta": float(delta[j])}
            for j, p in enumerate(self.patches)
        ]

    # -- serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable (NaN -> null); :meth:`from_dict` inverts it (without ``logits``)."""
        return _jsonable(
            {
                "kind": self.kind,
                "method": self.method,
                "direction": self.direction,
                "patches": [p.to_dict() for p in self.patches],
                "raw": self.raw,
                "normalized": self.normalized,
                "clean": self.clean,
                "source": self.source,
                "mean": self.mean,
                "meta": self.meta,
            }
        )

    def to_json(self, path: str | Path | None = None, **kw: Any) -> str:
        text = json.dumps(self.to_dict(), **kw)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PatchResult:
        return cls(
            kind=d["kind"],
            method=d["method"],
            direction=d["direction"],
            patches=[Patch.from_dict(p) for p in d["patches"]],
            raw=_array(d["raw"]),
            clean=_array(d["clean"]),
            source=_array(d["source"]),
            meta=dict(d.get("meta", {})),
            normalized=_array(d["normalized"]),
        )


def _nanmean(x: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(x)
    n = ok.sum(0)
    s = np.where(ok, x, 0.0).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan)


# ------------------------------------------------------------------------------------------ work counter


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
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def useful_flops(self, lm: Any) -> float:
        """Matmul FLOPs of the work: 2 x decoder-layer params per token-layer, 2 x lm_head params per unembedded
        row; a backward pass (gradients w.r.t. activations only, parameters are frozen) counts as much again."""
        per_layer = sum(p.numel() for p in decoder_layers(lm.model)[0].parameters())
        head = lm.model.get_output_embeddings().weight.numel()
        backward = 2.0 * per_layer * self.backward_layer_tokens + 2.0 * head * self.unembed_rows * bool(
            self.backward_calls
        )
        return 2.0 * per_layer * self.layer_tokens + 2.0 * head * self.unembed_rows + backward


# --------------------------------------------------------------------------------------------- inputs


_PAIRS_FIX = "pass a list of (harmful, harmless) tuples, e.g. [(harmful_text, harmless_text)] or prompt_set.pairs()"


def _pair_text(x: Any, where: str) -> str:
    text = x if isinstance(x, str) else getattr(x, "prompt", None)
    if not isinstance(text, str):
        raise PatchingError(f"{where} is a {type(x).__name__}, not a prompt text or Prompt; {_PAIRS_FIX}")
    if not text.strip():
        raise PatchingError(f"{where} is an empty prompt; {_PAIRS_FIX}")
    return text


def as_pairs(pairs: Any) -> list[tuple[str, str]]:
    """``(harmful, harmless)`` text pairs from tuples of strings or of :class:`~mech.prompts.Prompt`, or dicts with
    ``harmful``/``harmless`` keys (the workload file's format).

    Raises :class:`PatchingError` (one line) for anything else, e.g. one pair passed as two bare strings
    (``("harmful", "harmless")`` instead of ``[("harmful", "harmless")]``), a PromptSet instead of its
    ``.pairs()``, a tuple of other than two items, or Prompts whose labels are the wrong way round."""
    if pairs is None or isinstance(pairs, (str, bytes, Mapping)):
        what = "one string" if isinstance(pairs, (str, bytes)) else (
            "one dict (a single pair?)" if isinstance(pairs, Mapping) else "None")
        raise PatchingError(f"pairs is {what}, not a list of pairs; {_PAIRS_FIX}")
    try:
        items = list(pairs)
    except TypeError:
        raise PatchingError(f"pairs is a {type(pairs).__name__}, not a list of pairs; {_PAIRS_FIX}") from None
    out = []
    for i, p in enumerate(items):
        if isinstance(p, Mapping):
            missing = [k for k in ("harmful", "harmless") if k not in p]
            if missing:
                raise PatchingError(f"pairs[{i}] has no {' or '.join(repr(k) for k in missing)} key; {_PAIRS_FIX}")
            a, b = p["harmful"], p["harmless"]
        elif isinstance(p, (str, bytes)):
            hint = (" (one pair of two strings? wrap it in a list: [(harmful, harmless)])"
                    if len(items) == 2 and all(isinstance(x, str) for x in items) else "")
            raise PatchingError(f"pairs[{i}] is a string, not a (harmful, harmless) pair{hint}; {_PAIRS_FIX}")
        elif isinstance(p, (tuple, list)):
            if len(p) != 2:
                raise PatchingError(f"pairs[{i}] has {len(p)} items, not 2 (harmful, harmless); {_PAIRS_FIX}")
            a, b = p
        else:
            raise PatchingError(f"pairs[{i}] is a {type(p).__name__}, not a (harmful, harmless) pair; {_PAIRS_FIX}")
        la, lb = getattr(a, "label", None), getattr(b, "label", None)
        if (la, lb) == ("harmless", "harmful"):
            raise PatchingError(
                f"pairs[{i}] is ({la}, {lb}); the order is (harmful, harmless): swap the two (prompt_set.pairs() "
                "returns them in that order)"
            )
        out.append((_pair_text(a, f"pairs[{i}][0]"), _pair_text(b, f"pairs[{i}][1]")))
    if not out:
        raise PatchingError("no pairs given; pass at least one (harmful, harmless) pair")
    return out


def normalize_direction(direction: str) -> str:
    if direction not in _DIRECTION_ALIASES:
        raise PatchingError(f"unknown direction {direction!r}; use {DENOISE} (denoise) or {NOISE} (noise)")
    return _DIRECTION_ALIASES[direction]


@dataclass(frozen=True)
class RefusalMetric:
    """The logit refusal score (:func:`mech.refusal.refusal_log_odds`) on last-position logits ``[B, d_vocab]``."""

    ids: tuple[int, ...]
    name: str = "refusal_log_odds"

    def __call__(self, logits: Tensor) -> Tensor:
        return refusal_log_odds(logits, self.ids)


Metric = Callable[[Tensor], Tensor]  # logits [B, d_vocab] -> [B]


def make_metric(refusal_ids: Sequence[int] | None, metric: Metric | None, d_vocab: int | None = None) -> Metric:
    """``metric`` if given, else the refusal log-odds of ``refusal_ids`` (checked: non-empty, integers, each
    below ``d_vocab`` when given; :class:`PatchingError` otherwise)."""
    if metric is not None:
        if not callable(metric):
            raise PatchingError(f"metric must be a callable logits [B, d_vocab] -> [B], got a {type(metric).__name__}")
        return metric
    if refusal_ids is None:
        raise PatchingError("pass refusal_ids= (e.g. the refusal_tokens fixture's ids) or a metric= callable")
    try:
        return RefusalMetric(check_refusal_ids(refusal_ids, d_vocab))
    except RefusalIdsError as e:
        raise PatchingError(str(e)) from None


def _logits_device(lm: Any) -> torch.device:
    head = lm.model.get_output_embeddings()
    dev = head.weight.device if head is not None else torch.device("cpu")
    return torch.device("cpu") if dev.type == "meta" else dev


def check_metric(lm: Any, metric: Metric, d_vocab: int | None = None) -> None:
    """Call ``metric`` once on zero logits ``[2, d_vocab]`` (no forward) and check it returns one value per
    row, ``[2]``: a metric of the wrong shape is a one-line :class:`PatchingError` before the sweep starts."""
    if isinstance(metric, RefusalMetric):
        return
    d_vocab = d_vocab or vocab_size(lm)
    if not d_vocab:
        return
    name = _metric_name(metric)
    try:
        with torch.no_grad():
            out = metric(torch.zeros(2, d_vocab, device=_logits_device(lm)))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise PatchingError(
            f"metric {name!r} failed on logits of shape [2, {d_vocab}] ({type(e).__name__}: {first}); a metric "
            "maps last-position logits [B, d_vocab] to one value per row, shape [B]"
        ) from e
    if not isinstance(out, Tensor):
        raise PatchingError(f"metric {name!r} returned a {type(out).__name__}, expected a tensor of shape [B] "
                            "(one value per row of logits [B, d_vocab])")
    if tuple(out.shape) != (2,):
        raise PatchingError(
            f"metric {name!r} returned shape {list(out.shape)} for logits [2, {d_vocab}]; expected [2]: one value "
            "per row (reduce over the vocabulary, not over the batch)"
        )


def _metric_name(metric: Metric) -> str:
    return str(getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__)


@dataclass
class _Plan:
    """A sweep's tokenized inputs: receivers/sources per pair and each patch's sites resolved per pair."""

    recv: list[list[int]]  # unique receiver token lists
    src: list[list[int]]  # unique source token lists
    pair_recv: list[int]  # pair -> index into recv
    pair_src: list[int]
    neg: list[list[list[tuple[Site, tuple[int, ...]]]]]  # [pair][patch] -> [(site, end-aligned positions)]
    window: int  # W_max: the largest window any (pair, patch) needs


def _unique(seqs: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    seen: dict[tuple[int, ...], int] = {}
    for s in seqs:
        seen.setdefault(tuple(s), len(seen))
    return [list(k) for k in seen], [seen[tuple(s)] for s in seqs]


def _plan(
    lm: Any, pairs: list[tuple[str, str]], patches: Sequence[Patch], direction: str, system: str | None, check_aligned: bool
) -> _Plan:
    shape = lm.shape
    harmful = lm.encode_chat([a for a, _ in pairs], system=system)
    harmless = lm.encode_chat([b for _, b in pairs], system=system)
    src_tok, rcv_tok = (harmful, harmless) if direction == DENOISE else (harmless, harmful)
    for patch in patches:
        for s in patch.sites:
            top = shape.n_layers - 1
            if not 0 <= s.layer <= top:
                raise PatchingError(f"layer {s.layer} out of range: the model has {shape.n_layers} layers (0..{top})")
            if s.index is not None:
                limit = shape.n_heads if s.component == "z" else shape.d_mlp
                bad = [i for i in s.index if not 0 <= i < limit]
                if bad:
                    what = "head" if s.component == "z" else "neuron"
                    raise PatchingError(f"{what} {bad[0]} out of range at layer {s.layer}: 0..{limit - 1}")
    neg: list[list[list[tuple[Site, tuple[int, ...]]]]] = []
    window = 1
    for i, (r, s) in enumerate(zip(rcv_tok, src_tok, strict=True)):
        row = []
        need = 1
        for patch in patches:
            sites = []
            for site in patch.sites:
                if site.positions[0] >= 0:
                    if len(r) != len(s):
                        raise PatchingError(
                            f"pair {i}: absolute positions need prompts of equal token length ({len(r)} vs {len(s)}); "
                            "use end-aligned (negative) positions"
                        )
                    pos = tuple(p - len(r) for p in site.positions)
                else:
                    pos = site.positions
                if min(pos) < -min(len(r), len(s)) or max(pos) >= 0:
                    raise PatchingError(
                        f"pair {i}: position {site.positions} outside the prompts ({len(r)} and {len(s)} tokens)"
                    )
                need = max(need, -min(pos))
                sites.append((site, pos))
            row.append(sites)
        if check_aligned:
            end_aligned = any(st.positions[0] < 0 for p in patches for st in p.sites)
            k = max((-min(pos) for sites in row for st, pos in sites if st.positions[0] < 0), default=0)
            if end_aligned and r[len(r) - k :] != s[len(s) - k :]:
                raise PatchingError(
                    f"pair {i}: the last {k} tokens differ between source and receiver; patch only the template's "
                    f"{template_suffix_len(lm, system)} post-instruction positions, or pass check_aligned=False"
                )
        window = max(window, need)
        neg.append(row)
    recv, pair_recv = _unique(rcv_tok)
    src, pair_src = _unique(src_tok)
    return _Plan(recv, src, pair_recv, pair_src, neg, window)


# ----------------------------------------------------------------------------------------------- engine


@dataclass
class _KV:
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

    def __init__(self, shared: _KV | None, rem: _KV | None, rowmap: Tensor | None, record: dict | None) -> None:
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

    Works on any HF decoder-only model whose base model has ``layers``, ``rotary_emb`` and ``norm`` and whose
    attention runs ``eager`` or ``sdpa`` (a 4-D additive mask is passed to the layers).
    """

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self.model = lm.model
        self.base = self.model.model
        self.layers = decoder_layers(self.model)
        self.n_layers = len(self.layers)
        for attr in ("rotary_emb", "norm"):
            if not hasattr(self.base, attr):
                raise PatchingError(
                    f"{type(self.base).__name__} has no .{attr}; the fast path needs a rotary decoder; use method='naive'"
                )
        impl = getattr(self.model.config, "_attn_implementation", "eager")
        if impl not in ("eager", "sdpa"):
            raise PatchingError(
                f"the fast path needs attn_implementation eager or sdpa, not {impl!r}; reload the model with "
                "attn_implementation='sdpa' or use method='naive'"
            )
        devices = {p.device for p in self.model.parameters()}
        if len(devices) > 1:
            raise PatchingError("the fast path needs the model on one device (not sharded); use method='naive'")
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
        shared: _KV | None = None,
        rem: _KV | None = None,
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
        cos, sin = self.base.rotary_emb(joins[0][1], pos)  # [B, W, d_head] each
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
        return self.base.norm(last)

    def logits_metric(
        self, final: Tensor, metric: Metric, keep_logits: bool, rows_per_unembed: int = 128
    ) -> tuple[Tensor, Tensor | None]:
        """Unembed final-normed rows in sub-batches and apply ``metric``: ``([B], [B, d_vocab] | None)``."""
        vals, keep = [], []
        for i in range(0, final.shape[0], rows_per_unembed):
            logits = self.unembed(final[i : i + rows_per_unembed])
            vals.append(metric(logits).float())
            if keep_logits:
                keep.append(logits.float())
        return torch.cat(vals), (torch.cat(keep) if keep_logits else None)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """Per-row positions: ``x [B, T, ...]``, ``idx [B, W]`` -> ``[B, W, ...]``."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


@dataclass
class _Refs:
    """Reference (unpatched) runs of every receiver and source, as the patched runs need them."""

    n_shared: int  # P0: tokens shared by every prompt, run once
    shared: _KV | None
    rem: _KV | None  # receivers: K/V of their tokens after P0, [n_recv, kv, R, d_head] (right-padded)
    rem_len: list[int]  # receivers: tokens after P0
    recv_metric: Tensor  # [n_recv]
    src_metric: Tensor  # [n_src]
    resid: dict[int, Tensor]  # slot -> receivers' residual at their last W positions [n_recv, W, d_model]
    acts: dict[tuple[str, int], Tensor]  # (kind, layer/slot) -> sources' activation at last W positions
    recv_logits: Tensor | None = None
    src_logits: Tensor | None = None


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def _hook_for(kind: str, layer: int) -> str:
    return hook_name(layer, COMPONENTS[kind])


def reference_runs(
    eng: Engine,
    recv: list[list[int]],
    src: list[list[int]],
    window: int,
    resid_slots: set[int],
    src_needs: set[tuple[str, int]],
    metric: Metric,
    chunk_rows: int = 32,
    keep_logits: bool = False,
    recv_needs: set[tuple[str, int]] = frozenset(),  # type: ignore[assignment]
) -> tuple[_Refs, dict[tuple[str, int], Tensor]]:
    """Run every receiver and source once, sharing the common token prefix (run once).

    Receivers give their prefix K/V, their residual stream at ``resid_slots`` (last ``window`` positions) and
    the clean metric; sources give activations ``src_needs`` at their last ``window`` positions and the source
    metric. Also returns receivers' activations ``recv_needs`` (AtP uses them). Call under no_grad/inference_mode.
    """
    dev = eng.device
    n_shared = min(_common_prefix(recv + src), min(len(s) for s in recv + src) - window)
    shared = None
    if n_shared > 0:
        rec: dict[int, tuple[Tensor, Tensor]] = {}
        ids = torch.tensor([recv[0][:n_shared]], device=dev)
        eng.run([(0, eng.embed(ids))], torch.arange(n_shared, device=dev)[None], kv_record=rec)
        shared = _KV([rec[L][0] for L in range(eng.n_layers)], [rec[L][1] for L in range(eng.n_layers)])

    def role(
        seqs: list[list[int]], slots: set[int], needs: set[tuple[str, int]], want_kv: bool
    ) -> tuple[Tensor, Tensor | None, dict[tuple[str, int], Tensor], _KV | None]:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        r_max = max(len(s) - n_shared for s in seqs)
        metrics: list[Tensor] = []
        logits_out: list[Tensor] = []
        caps: dict[tuple[str, int], list[Tensor]] = {}
        kv_k: list[list[Tensor]] = [[] for _ in range(eng.n_layers)]
        kv_v: list[list[Tensor]] = [[] for _ in range(eng.n_layers)]
        for c in range(0, len(order), chunk_rows):
            rows = order[c : c + chunk_rows]
            lens = [len(seqs[i]) - n_shared for i in rows]
            r = max(lens)
            ids = torch.tensor([seqs[i][n_shared:] + [seqs[i][-1]] * (r - n) for i, n in zip(rows, lens, strict=True)])
            ids = ids.to(dev)
            lens_t = torch.tensor(lens, device=dev)
            win = (lens_t[:, None] - window + torch.arange(window, device=dev)[None])  # [b, W] last W real slots
            pos = n_shared + torch.arange(r, device=dev)[None].expand(len(rows), r)

            def resid_fn(slot: int, h: Tensor, win: Tensor = win) -> Tensor:
                if slot in slots or ("resid", slot) in needs:
                    caps.setdefault(("resid", slot), []).append(_gather(h, win))
                return h

            def make(key: tuple[str, int], win: Tensor = win) -> HookFn:
                def cap(x: Tensor, hook: HookPoint) -> None:
                    caps.setdefault(key, []).append(_gather(x, win))

                return cap

            fh = [(_hook_for(k, L), make((k, L))) for k, L in sorted(needs) if k != "resid"]
            rec = {} if want_kv else None
            final = eng.run(
                [(0, eng.embed(ids))], pos, shared=shared, fwd_hooks=fh, resid_fn=resid_fn, kv_record=rec,
                out_slot=lens_t - 1,
            )
            assert final is not None
            m, lg = eng.logits_metric(final, metric, keep_logits)
            metrics.append(m)
            if lg is not None:
                logits_out.append(lg)
            if rec is not None:
                for L in range(eng.n_layers):
                    k, v = rec[L]
                    kv_k[L].append(F.pad(k, (0, 0, 0, r_max - r)))
                    kv_v[L].append(F.pad(v, (0, 0, 0, r_max - r)))
        inv = torch.empty(len(order), dtype=torch.long)
        inv[torch.tensor(order)] = torch.arange(len(order))
        inv = inv.to(dev)
        metric_t = torch.cat(metrics)[inv]
        logits_t = torch.cat(logits_out)[inv] if logits_out else None
        acts = {key: torch.cat(v)[inv] for key, v in caps.items()}
        kv = None
        if want_kv:
            kv = _KV([torch.cat(x)[inv] for x in kv_k], [torch.cat(x)[inv] for x in kv_v])
        return metric_t, logits_t, acts, kv

    r_metric, r_logits, r_acts, rem = role(recv, set(resid_slots), set(recv_needs), True)
    s_metric, s_logits, s_acts, _ = role(src, set(), set(src_needs), False)
    refs = _Refs(
        n_shared=n_shared,
        shared=shared,
        rem=rem,
        rem_len=[len(s) - n_shared for s in recv],
        recv_metric=r_metric,
        src_metric=s_metric,
        resid={slot: r_acts[("resid", slot)] for slot in resid_slots},
        acts=s_acts,
        recv_logits=r_logits,
        src_logits=s_logits,
    )
    return refs, r_acts


@dataclass
class _Row:
    pair: int
    patch: int
    window: int
    start: int
    sites: list[tuple[Site, tuple[int, ...]]]


def _rows(plan: _Plan, n_layers: int) -> list[_Row]:
    rows = []
    for i, per_patch in enumerate(plan.neg):
        for j, sites in enumerate(per_patch):
            w = max((-min(pos) for _, pos in sites), default=1)
            start = min((s.slot for s, _ in sites), default=n_layers)
            rows.append(_Row(i, j, w, start, sites))
    rows.sort(key=lambda r: (r.window, r.start, r.pair, r.patch))
    return rows


def _default_chunk_rows(eng: Engine, window: int) -> int:
    """Rows per patched forward: about 2048 window tokens (bounded MLP activations), at least 8 rows."""
    return max(8, 2048 // max(window, 1))


def _fast_sweep(
    lm: Any,
    plan: _Plan,
    metric: Metric,
    batch_rows: int | None,
    progress: bool | None,
    keep_logits: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Work]:
    """The batched exact sweep; returns device tensors raw [n_pairs, n_patches], clean, source, logits, work."""
    eng = Engine(lm)
    dev, n_layers = eng.device, eng.n_layers
    n_pairs, n_patches = len(plan.neg), len(plan.neg[0]) if plan.neg else 0
    rows = _rows(plan, n_layers)
    resid_slots = {r.start for r in rows}
    src_needs = {(s.kind, s.slot) for r in rows for s, _ in r.sites}
    refs, _ = reference_runs(eng, plan.recv, plan.src, plan.window, resid_slots, src_needs, metric)
    W_max = plan.window
    size = batch_rows or _default_chunk_rows(eng, W_max)
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    out_vals: list[Tensor] = []
    out_idx: list[int] = []
    out_logits: list[Tensor] = []
    show = progress if progress is not None else len(chunks) >= 8
    for chunk in tqdm(chunks, desc="patching", disable=not show, leave=False):
        chunk = sorted(chunk, key=lambda r: r.start)  # staircase: rows join in start order
        w = max(r.window for r in chunk)
        B = len(chunk)
        r_idx = torch.tensor([plan.pair_recv[r.pair] for r in chunk], device=dev)
        s_idx = torch.tensor([plan.pair_src[r.pair] for r in chunk], device=dev)
        rem_len = torch.tensor([refs.rem_len[plan.pair_recv[r.pair]] for r in chunk], device=dev)
        pos = refs.n_shared + rem_len[:, None] - w + torch.arange(w, device=dev)[None]  # [B, w]
        rem_valid = None
        if refs.rem is not None:
            R = refs.rem.slots
            rem_valid = torch.arange(R, device=dev)[None] < (rem_len - w)[:, None]  # [B, R]
        joins = []
        for start in sorted({r.start for r in chunk}):
            sel = [b for b, r in enumerate(chunk) if r.start == start]
            sel_t = torch.tensor(sel, device=dev)
            joins.append((start, refs.resid[start].index_select(0, r_idx[sel_t])[:, W_max - w :]))
        # interventions grouped by (kind, slot): rows, mask and source values
        groups: dict[tuple[str, int], list[tuple[int, Site, tuple[int, ...]]]] = {}
        for b, r in enumerate(chunk):
            for site, p in r.sites:
                groups.setdefault((site.kind, site.slot), []).append((b, site, p))
        interventions: dict[tuple[str, int], tuple[Tensor, Tensor, Tensor]] = {}
        for key, items in groups.items():
            kind, slot = key
            brows = sorted({b for b, _, _ in items})
            local = {b: i for i, b in enumerate(brows)}
            nf = {"z": lm.shape.n_heads, "mlp_post": lm.shape.d_mlp}.get(kind, 1)
            m = torch.zeros(len(brows), w, nf, dtype=torch.bool)  # per row: OR over its sites of pos x features
            for b, site, p in items:
                row_pm = torch.zeros(w, dtype=torch.bool)
                row_pm[[w + q for q in p]] = True
                row_f = torch.ones(nf, dtype=torch.bool)
                if site.index is not None:
                    row_f = torch.zeros(nf, dtype=torch.bool)
                    row_f[list(site.index)] = True
                m[local[b]] |= row_pm[:, None] & row_f[None, :]
            mask = m[..., None] if kind == "z" else m  # z: [n, w, H, 1]; mlp_post: [n, w, d_mlp]; else [n, w, 1]
            rows_t = torch.tensor(brows, device=dev)
            src_vals = refs.acts[key].index_select(0, s_idx[rows_t])[:, W_max - w :]
            interventions[key] = (rows_t, mask.to(dev), src_vals)

        def apply(x: Tensor, iv: tuple[Tensor, Tensor, Tensor]) -> Tensor:
            rows_t, mask, vals = iv
            return x.index_put((rows_t,), torch.where(mask, vals, x.index_select(0, rows_t)))

        def make(iv: tuple[Tensor, Tensor, Tensor]) -> HookFn:
            return lambda x, hook: apply(x, iv)

        fh = [(_hook_for(k, s), make(iv)) for (k, s), iv in interventions.items() if k != "resid"]
        resid_iv = {s: iv for (k, s), iv in interventions.items() if k == "resid"}

        def resid_fn(slot: int, h: Tensor, resid_iv: dict = resid_iv) -> Tensor:
            return apply(h, resid_iv[slot]) if slot in resid_iv else h

        final = eng.run(
            joins, pos, shared=refs.shared, rem=refs.rem, rowmap=r_idx, rem_valid=rem_valid, fwd_hooks=fh,
            resid_fn=resid_fn, out_slot=torch.full((B,), w - 1, device=dev),
        )
        assert final is not None
        vals, lg = eng.logits_metric(final, metric, keep_logits)
        out_vals.append(vals)
        out_idx += [r.pair * n_patches + r.patch for r in chunk]
        if lg is not None:
            out_logits.append(lg)
    flat = torch.empty(n_pairs * n_patches, device=dev)
    if out_vals:
        flat[torch.tensor(out_idx, device=dev)] = torch.cat(out_vals)
    raw = flat.view(n_pairs, n_patches)
    clean = refs.recv_metric[torch.tensor(plan.pair_recv, device=dev)]
    source = refs.src_metric[torch.tensor(plan.pair_src, device=dev)]
    logits = None
    if keep_logits:
        logits = torch.empty(n_pairs * n_patches, lm.shape.d_vocab if not out_logits else out_logits[0].shape[-1])
        if out_logits:
            logits[torch.tensor(out_idx)] = torch.cat(out_logits).cpu()
        logits = logits.view(n_pairs, n_patches, -1)
    return raw, clean, source, logits, eng.work


# ------------------------------------------------------------------------------------------- naive path


def _site_hook(site: Site, rcv_pos: list[int], src_act: Tensor, src_pos: list[int]) -> HookFn:
    """Replace ``site``'s activation at receiver positions by the source run's (full-sequence cache)."""
    rp = torch.tensor(rcv_pos, device=src_act.device)
    sp = torch.tensor(src_pos, device=src_act.device)

    def fn(x: Tensor, hook: HookPoint) -> Tensor:
        y = x.clone()
        if site.index is None:
            y[:, rp.to(y.device)] = src_act[:, sp].to(y.device, y.dtype)
        else:
            ix = torch.tensor(site.index, device=src_act.device)
            y[:, rp.to(y.device)[:, None], ix.to(y.device)[None, :]] = src_act[:, sp[:, None], ix[None, :]].to(y.device, y.dtype)
        return y

    return fn


def _hf_name(site: Site) -> str:
    return hook_name(site.layer, COMPONENTS[site.component])


def _naive_sweep(
    lm: Any, plan: _Plan, metric: Metric, progress: bool | None, keep_logits: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Work]:
    """One full HF forward per (pair, patch), hooks doing the replacement: the reference implementation."""
    model, dev = lm.model, lm.input_device
    work = Work()
    n_pairs, n_patches = len(plan.neg), len(plan.neg[0]) if plan.neg else 0
    n_layers = lm.shape.n_layers
    raw = torch.empty(n_pairs, n_patches, device=dev)
    clean = torch.empty(n_pairs, device=dev)
    source = torch.empty(n_pairs, device=dev)
    logits_all = torch.empty(n_pairs, n_patches, lm.shape.d_vocab) if keep_logits else None

    def forward(ids: Tensor, fwd: list[tuple[str, HookFn]]) -> Tensor:
        with hooks(model, fwd):
            out = model(input_ids=ids, logits_to_keep=1, use_cache=False)
        work.full_forwards += 1
        work.full_rows += 1
        work.full_tokens += ids.shape[1]
        work.layer_tokens += ids.shape[1] * n_layers
        work.unembed_rows += 1
        return out.logits[:, -1]

    total = n_pairs * n_patches
    bar = tqdm(total=total, desc="patching (naive)", disable=not (progress if progress is not None else total >= 64),
               leave=False)
    for i in range(n_pairs):
        rcv = torch.tensor([plan.recv[plan.pair_recv[i]]], device=dev)
        src = torch.tensor([plan.src[plan.pair_src[i]]], device=dev)
        names = sorted({_hf_name(s) for sites in plan.neg[i] for s, _ in sites})
        out, cache = run_with_cache(model, src, names_filter=names, logits_to_keep=1, use_cache=False)
        work.full_forwards += 1
        work.full_rows += 1
        work.full_tokens += src.shape[1]
        work.layer_tokens += src.shape[1] * n_layers
        work.unembed_rows += 1
        source[i] = metric(out.logits[:, -1])[0]
        clean[i] = metric(forward(rcv, []))[0]
        n_r, n_s = rcv.shape[1], src.shape[1]
        for j, sites in enumerate(plan.neg[i]):
            fwd = [
                (_hf_name(s), _site_hook(s, [n_r + q for q in p], cache[_hf_name(s)], [n_s + q for q in p]))
                for s, p in sites
            ]
            logits = forward(rcv, fwd)
            raw[i, j] = metric(logits)[0]
            if logits_all is not None:
                logits_all[i, j] = logits[0].float().cpu()
            bar.update(1)
    bar.close()
    return raw, clean, source, logits_all, work


# ------------------------------------------------------------------------------------------------- API


def _meta(
    lm: Any, pairs: list[tuple[str, str]], plan: _Plan, metric: Metric, direction: str, method: str
) -> dict[str, Any]:
    ids = getattr(metric, "ids", None)
    return {
        "model": getattr(lm, "name", "model"),
        "fingerprint": getattr(lm, "fingerprint", None),
        "n_layers": lm.shape.n_layers,
        "n_heads": lm.shape.n_heads,
        "d_mlp": lm.shape.d_mlp,
        "pairs": [{"harmful": a, "harmless": b} for a, b in pairs],
        "direction": direction,
        "method": method,
        "metric": _metric_name(metric),
        "refusal_ids": None if ids is None else list(ids),
        "window": plan.window,
    }


def _prepare(
    lm: Any, pairs: Any, patches: Sequence[Patch], direction: str, refusal_ids: Sequence[int] | None,
    metric: Metric | None, method: str, system: str | None, check_aligned: bool,
) -> tuple[str, list[tuple[str, str]], list[Patch], Metric, str, _Plan]:
    """Checks and normalizes a sweep's arguments (exact or AtP); ``method="auto"`` becomes ``fast``, or
    ``naive`` on a model sharded or offloaded by accelerate."""
    direction = normalize_direction(direction)
    pairs_t = as_pairs(pairs)
    patches = list(patches)
    if not patches:
        raise PatchingError("no patches given")
    d_vocab = vocab_size(lm)
    met = make_metric(refusal_ids, metric, d_vocab)
    check_metric(lm, met, d_vocab)
    if method not in ("fast", "naive", "auto"):
        raise PatchingError(f"unknown method {method!r}; use auto, fast or naive")
    if method == "auto":
        method = "naive" if getattr(lm, "sharded", False) else "fast"
    return direction, pairs_t, patches, met, method, _plan(lm, pairs_t, patches, direction, system, check_aligned)


def patch_sweep(
    lm: Any,
    pairs: Any,
    patches: Sequence[Patch],
    *,
    direction: str = DENOISE,
    refusal_ids: Sequence[int] | None = None,
    metric: Metric | None = None,
    method: str = "auto",
    batch_rows: int | None = None,
    progress: bool | None = None,
    system: str | None = None,
    check_aligned: bool = True,
    return_logits: bool = False,
    kind: str = "custom",
) -> PatchResult:
    """Exact activation patching of every patch in every pair: a :class:`PatchResult`.

    ``pairs``: ``(harmful, harmless)`` texts (or Prompts, or dicts). ``direction``: ``harmful_to_harmless``
    (source harmful, receiver harmless; alias ``denoise``) or ``harmless_to_harmful`` (``noise``). The metric is
    ``metric(logits[B, d_vocab]) -> [B]`` on the receiver's last-position logits, by default the refusal
    log-odds of ``refusal_ids``. ``method``: ``fast`` (batched partial forwards; see the module docstring),
    ``naive`` (one full HF forward per patch with hooks) or ``auto`` (fast, or naive on a model sharded over
    devices or offloaded by accelerate, where hooks move activations to each layer's device). ``batch_rows``: rows per patched forward (fast).
    ``return_logits`` keeps the patched logits ``[n_pairs, n_patches, d_vocab]`` in ``result.logits``.
    """
    direction, pairs_t, patches, met, method, plan = _prepare(
        lm, pairs, patches, direction, refusal_ids, metric, method, system, check_aligned)
    t0 = time.perf_counter()
    with torch.inference_mode():
        if method == "fast":
            raw, clean, source, logits, work = _fast_sweep(lm, plan, met, batch_rows, progress, return_logits)
        else:
            raw, clean, source, logits, work = _naive_sweep(lm, plan, met, progress, return_logits)
        # the one host sync of the sweep
        packed = torch.cat([raw.flatten(), clean, source]).float().cpu().numpy()
    work.seconds = time.perf_counter() - t0
    n_pairs, n_patches = raw.shape
    raw_np = packed[: n_pairs * n_patches].reshape(n_pairs, n_patches)
    meta = _meta(lm, pairs_t, plan, met, direction, method)
    meta["work"] = work.to_dict()
    meta["seconds"] = work.seconds
    return PatchResult(
        kind=kind,
        method=method,
        direction=direction,
        patches=patches,
        raw=raw_np,
        clean=packed[n_pairs * n_patches : n_pairs * n_patches + n_pairs],
        source=packed[n_pairs * n_patches + n_pairs :],
        meta=meta,
        logits=logits,
    )


def _positions(lm: Any, positions: Sequence[int] | None, system: str | None) -> tuple[int, ...]:
    return tuple(positions) if positions is not None else end_positions(template_suffix_len(lm, system))


def layer_sweep(
    lm: Any,
    pairs: Any,
    *,
    components: Sequence[str] = LAYER_COMPONENTS,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    per_position: bool = False,
    together: bool = True,
    **kw: Any,
) -> PatchResult:
    """Layer x component (resid_pre, attn_out, mlp_out) x position: ``as_array("layer", "component")``.

    ``positions`` default: the template's post-instruction positions (end-aligned). ``per_position`` adds one
    patch per position (label ``position=-k..-1``); ``together`` keeps the all-positions patch (``"all"``).
    Other keywords go to :func:`patch_sweep`.
    """
    pos = _positions(lm, positions, kw.get("system"))
    patches = layer_patches(lm.shape.n_layers, components, layers, pos, per_position, together)
    return patch_sweep(lm, pairs, patches, kind="layer", **kw)


def head_sweep(
    lm: Any,
    pairs: Any,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    per_position: bool = False,
    together: bool = True,
    **kw: Any,
) -> PatchResult:
    """Every attention head (``attn.hook_z``) at the end positions together (optionally per position):
    ``as_array("layer", "head")`` -> ``[n_layers, n_heads]``."""
    pos = _positions(lm, positions, kw.get("system"))
    patches = head_patches(lm.shape.n_layers, lm.shape.n_heads, layers, heads, pos, per_position, together)
    return patch_sweep(lm, pairs, patches, kind="head", **kw)


def neuron_sweep(
    lm: Any,
    pairs: Any,
    *,
    neurons: Sequence[tuple[int, int]] | Mapping[int, Sequence[int]] | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    per_position: bool = False,
    together: bool = True,
    **kw: Any,
) -> PatchResult:
    """MLP neurons (columns of ``mlp.hook_post``): all of ``layers`` or a candidate set (e.g. the top AtP
    neurons). Every neuron of a 24-layer model is ~10^5 patches per pair: prefer candidates."""
    pos = _positions(lm, positions, kw.get("system"))
    patches = neuron_patches(lm.shape.n_layers, lm.shape.d_mlp, neurons, layers, pos, per_position, together)
    return patch_sweep(lm, pairs, patches, kind="neuron", **kw)
