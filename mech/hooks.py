"""Named hook points on the HF modules themselves (no weight conversion).

Names follow TransformerLens so results compare directly::

    blocks.{L}.hook_resid_pre     [batch, pos, d_model]         input of decoder layer L (L=0: embeddings)
    blocks.{L}.attn.hook_z        [batch, pos, head, d_head]    o_proj input split per query head
    blocks.{L}.hook_attn_out      [batch, pos, d_model]         self-attention output (o_proj output)
    blocks.{L}.mlp.hook_post      [batch, pos, d_mlp]           down_proj input: the MLP neurons
    blocks.{L}.hook_mlp_out       [batch, pos, d_model]         MLP output
    blocks.{L}.hook_resid_post    [batch, pos, d_model]         output of decoder layer L

A hook function is ``fn(activation, hook) -> Tensor | None``; returning a tensor replaces the activation.
Temporary hooks exist only inside :func:`hooks` (a context manager), which removes every handle in a
``finally`` even when the forward raises.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mech.architectures import ArchitectureError, architecture_of, supported_model_types

HOOK_KINDS = ("hook_resid_pre", "attn.hook_z", "hook_attn_out", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")
_NAME_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in HOOK_KINDS) + r")$")

HookFn = Callable[[Tensor, "HookPoint"], Tensor | None]


class HookError(ValueError):
    """A bad hook name or layer index; the message is one line that says how to fix it."""


@dataclass(frozen=True)
class HookPoint:
    """Where a named activation lives: the module, whether it is the module's input or output."""

    name: str
    layer: int
    kind: str
    module: nn.Module
    is_input: bool  # True: the activation is the module's first input (forward pre-hook)
    n_heads: int = 0  # for hook_z: split the last dim into [n_heads, d_head]


def decoder_layers(model: Any) -> nn.ModuleList:
    """The list of decoder layers of a HF causal LM or its base model (where its
    :class:`~mech.architectures.Architecture` says: ``model.model.layers`` for every family supported today)."""
    try:
        return architecture_of(model).decoder_layers(model)
    except ArchitectureError as e:
        raise HookError(str(e)) from None


def hook_name(layer: int, kind: str) -> str:
    """``hook_name(12, "attn.hook_z") == "blocks.12.attn.hook_z"``."""
    if kind not in HOOK_KINDS:
        raise HookError(f"unknown hook kind {kind!r}; use one of {', '.join(HOOK_KINDS)}")
    return f"blocks.{layer}.{kind}"


def all_hook_names(model: Any, kinds: Iterable[str] = HOOK_KINDS) -> list[str]:
    kinds = list(kinds)
    return [hook_name(L, k) for L in range(len(decoder_layers(model))) for k in kinds]


def _model_of(lm_or_model: Any) -> Any:
    return getattr(lm_or_model, "model", lm_or_model) if hasattr(lm_or_model, "tokenizer") else lm_or_model


def resolve(lm_or_model: Any, name: str) -> HookPoint:
    """Map a hook name onto the HF module that carries it. Raises :class:`HookError` on a bad name or layer."""
    model = _model_of(lm_or_model)
    m = _NAME_RE.match(name)
    if not m:
        raise HookError(
            f"unknown hook name {name!r}; names look like blocks.<layer>.<kind> with kind in {', '.join(HOOK_KINDS)}"
        )
    layer, kind = int(m.group(1)), m.group(2)
    layers = decoder_layers(model)
    if layer >= len(layers):
        raise HookError(f"layer {layer} out of range in {name!r}: the model has {len(layers)} layers (0..{len(layers) - 1})")
    block = layers[layer]
    if kind == "hook_resid_pre":
        return HookPoint(name, layer, kind, block, True)
    if kind == "hook_resid_post":
        return HookPoint(name, layer, kind, block, False)
    arch = architecture_of(model)
    attn, mlp = arch.attention(block), arch.mlp_module(block)
    o_proj, down_proj = arch.attn_out_proj(block), arch.mlp_out_proj(block)
    if attn is None or mlp is None or o_proj is None or down_proj is None:
        raise HookError(
            f"layer {layer} of {type(model).__name__} lacks {arch.attn}.{arch.attn_out} / {arch.mlp}.{arch.mlp_out}; "
            f"supported archs: {', '.join(supported_model_types())}"
        )
    if kind == "attn.hook_z":
        return HookPoint(name, layer, kind, o_proj, True, n_heads=getattr(model.config, arch.n_heads_key))
    if kind == "hook_attn_out":
        return HookPoint(name, layer, kind, attn, False)
    if kind == "mlp.hook_post":
        return HookPoint(name, layer, kind, down_proj, True)
    return HookPoint(name, layer, kind, mlp, False)  # hook_mlp_out


def _split(point: HookPoint, x: Tensor) -> Tensor:
    return x.view(*x.shape[:-1], point.n_heads, -1) if point.n_heads else x


def _merge(point: HookPoint, x: Tensor) -> Tensor:
    return x.reshape(*x.shape[:-2], -1) if point.n_heads else x


def _wrap(point: HookPoint, fn: HookFn) -> Callable[..., Any]:
    """Turn ``fn(act, hook)`` into a torch pre-hook or forward hook on ``point.module``."""
    if point.is_input:

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                x, rest, key = args[0], args[1:], None
            else:
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                x, rest = kwargs[key], ()
            out = fn(_split(point, x), point)
            if out is None:
                return None
            out = _merge(point, out)
            if key is None:
                return (out, *rest), kwargs
            return args, {**kwargs, key: out}

        return pre_hook

    def fwd_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        x = output[0] if isinstance(output, tuple) else output
        out = fn(x, point)
        if out is None:
            return None
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return fwd_hook


@contextmanager
def hooks(lm_or_model: Any, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
    """Attach ``[(name, fn), ...]`` for the duration of the block; every handle is removed on exit or error."""
    model = _model_of(lm_or_model)
    points = [(resolve(model, name), fn) for name, fn in fwd_hooks]  # validate all before attaching any
    handles = []
    try:
        for point, fn in points:
            if point.is_input:
                handles.append(point.module.register_forward_pre_hook(_wrap(point, fn), with_kwargs=True))
            else:
                handles.append(point.module.register_forward_hook(_wrap(point, fn)))
        yield
    finally:
        for h in handles:
            h.remove()


class ActivationCache(dict):
    """``{hook name: activation}`` from :func:`run_with_cache`; tensors are detached."""

    def stack(self, kind: str) -> Tensor:
        """Stack one kind over layers: ``[layer, batch, pos, ...]``."""
        names = sorted((n for n in self if n.endswith("." + kind)), key=lambda n: int(n.split(".")[1]))
        if not names:
            raise KeyError(f"no cached activations of kind {kind!r}; cached: {', '.join(self) or 'none'}")
        return torch.stack([self[n] for n in names])


def _names(model: Any, names_filter: str | Sequence[str] | Callable[[str], bool] | None) -> list[str]:
    every = all_hook_names(model)
    if names_filter is None:
        return every
    if isinstance(names_filter, str):
        return [names_filter]
    if callable(names_filter):
        return [n for n in every if names_filter(n)]
    return list(names_filter)


def _forward(model: Any, inputs: dict[str, Tensor] | Tensor, **kwargs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return model(input_ids=inputs, **kwargs)
    return model(**inputs, **kwargs)


def run_with_hooks(lm_or_model: Any, inputs: dict[str, Tensor] | Tensor, fwd_hooks: Sequence[tuple[str, HookFn]], **kwargs: Any) -> Any:
    """One forward with temporary hooks; returns the HF output."""
    model = _model_of(lm_or_model)
    with hooks(model, fwd_hooks):
        return _forward(model, inputs, **kwargs)


def run_with_cache(
    lm_or_model: Any,
    inputs: dict[str, Tensor] | Tensor,
    names_filter: str | Sequence[str] | Callable[[str], bool] | None = None,
    positions: Sequence[int] | slice | None = None,
    to_cpu: bool = False,
    stop_after_last: bool = False,
    **kwargs: Any,
) -> tuple[Any, ActivationCache]:
    """Forward once and cache the named activations (optionally only ``positions``; optionally moved to CPU).

    ``stop_after_last=True`` skips the layers above the last cached one (returns ``None`` as output).
    """
    model = _model_of(lm_or_model)
    names = _names(model, names_filter)
    cache = ActivationCache()
    last = max((resolve(model, n).layer for n in names), default=-1)

    class _Stop(Exception):
        pass

    def make(name: str) -> HookFn:
        def save(x: Tensor, hook: HookPoint) -> None:
            t = x.detach()
            if positions is not None:
                t = t[:, positions]
            cache[name] = t.to("cpu") if to_cpu else t.clone() if positions is None else t
            return None

        return save

    fwd = [(n, make(n)) for n in names]
    if stop_after_last and last >= 0:

        def stop(x: Tensor, hook: HookPoint) -> None:
            if len(cache) == len(names):
                raise _Stop

        fwd.append((hook_name(last, "hook_resid_post"), stop))
    try:
        out = run_with_hooks(model, inputs, fwd, **kwargs)
    except _Stop:
        out = None
    return out, cache
