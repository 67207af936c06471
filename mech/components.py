"""Ablatable components: heads, neurons and blocks, their parameter counts, and random matched sets of them.

:class:`Component` ``(kind, layer, index)`` has a stable id: ``"L12.H3"`` (attention head: its slice of
``blocks.L.attn.hook_z``), ``"L5.N1234"`` (MLP neuron: one unit of ``blocks.L.mlp.hook_post``, the down_proj
input), ``"L7.attn"`` (``blocks.L.hook_attn_out``), ``"L7.mlp"`` (``blocks.L.hook_mlp_out``).

Parameter fractions (:func:`param_fraction`, :func:`param_breakdown`)
    The denominator is **every unique parameter of the model**, embeddings and norms included (a tied
    ``lm_head`` is counted once; an untied one is counted). A **head** owns its ``d_head`` rows of ``q_proj``
    (and biases), its ``d_head`` input columns of ``o_proj``, and a ``1/(n_heads/n_kv_heads)`` share of the
    rows (and biases) of the key/value head it reads, since a KV head is shared by that many query heads. So
    every head of a layer owns the same count: ``(|q_proj| + |k_proj| + |v_proj| + |o_proj.weight|) / n_heads``.
    A **neuron** owns its ``gate_proj`` and ``up_proj`` rows (and biases) and its ``down_proj`` column:
    ``(|gate_proj| + |up_proj| + |down_proj.weight|) / d_mlp``. A **block** (``attn`` / ``mlp``) owns every
    parameter of its module. All heads + all neurons + attention/MLP leftovers (an o_proj / down_proj bias,
    q/k norms) + norms + embeddings (+ an untied lm_head) = 1.

Random sets (:func:`random_components`): as many components of each kind as a given set, drawn uniformly
without replacement (seeded), optionally with the same count per layer (the matched null of a ranked set).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from mech.architectures import architecture_of
from mech.hooks import decoder_layers, hook_name

if TYPE_CHECKING:
    from mech.models import LoadedModel

__all__ = [
    "COMPONENT_KINDS",
    "HOOK_OF_KIND",
    "Component",
    "ComponentKind",
    "KIND_OF_HOOK",
    "all_components",
    "as_component",
    "component_at",
    "check_component",
    "component_param_count",
    "param_breakdown",
    "param_fraction",
    "random_components",
]

ComponentKind = Literal["head", "neuron", "attn", "mlp"]
COMPONENT_KINDS: tuple[str, ...] = ("head", "neuron", "attn", "mlp")
HOOK_OF_KIND = {"head": "attn.hook_z", "neuron": "mlp.hook_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}
KIND_OF_HOOK = {hook: kind for kind, hook in HOOK_OF_KIND.items()}  # the shared vocabulary: the hook a kind lives in
_ID_RE = re.compile(r"^L(\d+)\.(?:H(\d+)|N(\d+)|(attn)|(mlp))$")


@dataclass(frozen=True, order=True)
class Component:
    """One ablatable unit: ``kind`` in head | neuron | attn | mlp, its layer, and the head/neuron index."""

    kind: ComponentKind
    layer: int
    index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in COMPONENT_KINDS:
            raise ValueError(f"unknown component kind {self.kind!r}; use one of {', '.join(COMPONENT_KINDS)}")
        if (self.index is None) != (self.kind in ("attn", "mlp")):
            raise ValueError(f"a {self.kind} component {'needs' if self.kind in ('head', 'neuron') else 'takes no'} an index")

    @property
    def id(self) -> str:
        """Stable string id: ``L12.H3``, ``L5.N1234``, ``L7.attn``, ``L7.mlp``."""
        if self.kind == "head":
            return f"L{self.layer}.H{self.index}"
        if self.kind == "neuron":
            return f"L{self.layer}.N{self.index}"
        return f"L{self.layer}.{self.kind}"

    @property
    def hook(self) -> str:
        """The hook name this component lives in."""
        return hook_name(self.layer, HOOK_OF_KIND[self.kind])

    @classmethod
    def parse(cls, text: str) -> Component:
        """Inverse of :attr:`id`."""
        m = _ID_RE.match(text.strip())
        if not m:
            raise ValueError(f"bad component id {text!r}; use L<layer>.H<head>, L<layer>.N<neuron>, L<layer>.attn or L<layer>.mlp")
        layer = int(m.group(1))
        if m.group(2) is not None:
            return cls("head", layer, int(m.group(2)))
        if m.group(3) is not None:
            return cls("neuron", layer, int(m.group(3)))
        return cls("attn" if m.group(4) else "mlp", layer)

    def __str__(self) -> str:
        return self.id


def as_component(c: Component | str) -> Component:
    """``c`` itself, or the component an id such as ``"L12.H3"`` names."""
    return c if isinstance(c, Component) else Component.parse(c)


def as_components(cs: Iterable[Component | str]) -> tuple[Component, ...]:
    """A component set as :class:`Component` values (ids such as ``"L12.H3"`` parsed), e.g. for
    :class:`mech.interventions.Ablate`.

    >>> [c.id for c in as_components(["L1.H0", "L2.mlp"])]
    ['L1.H0', 'L2.mlp']
    """
    return tuple(as_component(c) for c in cs)


def component_at(layer: int, hook: str, index: int | None = None) -> Component:
    """The ablatable component that lives in hook kind ``hook`` of ``layer`` (unit ``index`` for heads and
    neurons): patching and ablation name components by the hook they live in (a patching site's
    :attr:`mech.patching.spec.SiteComponent.hook`), so ``("attn.hook_z", head 3)`` of layer 12 is ``L12.H3``."""
    if hook not in KIND_OF_HOOK:
        raise ValueError(f"no ablatable component lives in {hook!r}; ablatable hook kinds: {', '.join(KIND_OF_HOOK)}")
    return Component(KIND_OF_HOOK[hook], layer, index)  # type: ignore[arg-type]


def all_components(lm: LoadedModel, kind: ComponentKind, layers: Sequence[int] | None = None) -> list[Component]:
    """Every component of ``kind`` in the model (optionally only in ``layers``), in (layer, index) order."""
    s = lm.shape
    layers = range(s.n_layers) if layers is None else layers
    if kind == "head":
        return [Component("head", L, h) for L in layers for h in range(s.n_heads)]
    if kind == "neuron":
        return [Component("neuron", L, n) for L in layers for n in range(s.d_mlp)]
    if kind in ("attn", "mlp"):
        return [Component(kind, L) for L in layers]
    raise ValueError(f"unknown component kind {kind!r}; use one of {', '.join(COMPONENT_KINDS)}")


def check_component(lm: LoadedModel, c: Component) -> None:
    """A one-line ValueError when ``c``'s layer or index is out of the model's range."""
    s = lm.shape
    if not 0 <= c.layer < s.n_layers:
        raise ValueError(f"component {c.id}: layer out of range 0..{s.n_layers - 1}")
    limit = {"head": s.n_heads, "neuron": s.d_mlp}.get(c.kind)
    if limit is not None and not 0 <= (c.index or 0) < limit:
        raise ValueError(f"component {c.id}: index out of range 0..{limit - 1}")


# ------------------------------------------------------------------------------------- param fractions


def _numel(p: Tensor) -> int:
    qs = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: the stored tensor is packed
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(np.prod(tuple(qs.shape)))
    return int(p.numel())


def param_breakdown(lm: LoadedModel) -> dict[str, int]:
    """Parameter counts by owner; the values other than ``total`` sum to ``total`` (unique parameters).

    Keys: ``heads`` (q/k/v weights and biases + o_proj weights), ``attn_other`` (the rest of self_attn),
    ``neurons`` (gate/up weights and biases + down_proj weights), ``mlp_other``, ``norms``, ``embeddings``,
    ``lm_head`` (0 when tied to the embeddings), ``other``, ``total``.
    """
    out = dict.fromkeys(("heads", "attn_other", "neurons", "mlp_other", "norms", "embeddings", "lm_head", "other"), 0)
    arch = architecture_of(lm.model)
    head_params, neuron_params = arch.head_params(), arch.neuron_params()
    for name, p in lm.model.named_parameters():  # remove_duplicate=True: a tied lm_head is counted once
        n = _numel(p)
        if head_params.search(name):
            out["heads"] += n
        elif f".{arch.attn}." in name:
            out["attn_other"] += n
        elif neuron_params.search(name):
            out["neurons"] += n
        elif f".{arch.mlp}." in name:
            out["mlp_other"] += n
        elif arch.embed in name:
            out["embeddings"] += n
        elif name.startswith(arch.unembed):
            out["lm_head"] += n
        elif "norm" in name:
            out["norms"] += n
        else:
            out["other"] += n
    out["total"] = sum(out.values())
    return out


def _module_params(module: torch.nn.Module, pattern: re.Pattern[str] | None = None) -> int:
    return sum(_numel(p) for n, p in module.named_parameters(prefix="x") if pattern is None or pattern.search(n))


def component_param_count(lm: LoadedModel, component: Component | str) -> float:
    """Parameters owned by one component (fractional for heads: the shared K/V share; see module doc)."""
    c = as_component(component)
    check_component(lm, c)
    arch = architecture_of(lm.model)
    block: Any = decoder_layers(lm.model)[c.layer]  # a decoder layer: attention, MLP
    if c.kind == "attn":
        return float(_module_params(arch.attention(block)))
    if c.kind == "mlp":
        return float(_module_params(arch.mlp_module(block)))
    if c.kind == "head":
        return _module_params(arch.attention(block), arch.head_params(inside=True)) / lm.shape.n_heads
    return _module_params(arch.mlp_module(block), arch.neuron_params(inside=True)) / lm.shape.d_mlp


def param_fraction(lm: LoadedModel, components: Sequence[Component | str]) -> float:
    """Fraction of all model parameters (embeddings included) owned by ``components`` (duplicates once).

    A block and a head inside it overlap; their counts are simply added (don't mix them in one set).
    """
    unique = {as_component(c) for c in components}
    return sum(component_param_count(lm, c) for c in unique) / param_breakdown(lm)["total"]


def random_components(
    lm: LoadedModel,
    like: Sequence[Component | str],
    rng: np.random.Generator,
    pool: Sequence[Component | str] | None = None,
    match_layers: bool = False,
) -> list[Component]:
    """As many components of each kind as ``like`` has, drawn uniformly without replacement.

    From ``pool`` (default: every component of that kind in the model). ``match_layers``: as many of each kind
    *in each layer* as ``like`` has (the matched null for a ranked set, whose layers are not uniform).
    Reproducible under ``rng``'s seed.
    """
    if match_layers:
        groups = Counter((c.layer, c.kind) for c in (as_component(x) for x in like))
        pool_m: list[Component] | None = None if pool is None else [as_component(c) for c in pool]
        out_m: list[Component] = []
        for (layer, kind), need in sorted(groups.items()):
            if pool_m is None:
                cands = all_components(lm, kind, [layer])
            else:
                cands = [c for c in pool_m if c.layer == layer and c.kind == kind]
            if need > len(cands):
                raise ValueError(f"cannot draw {need} {kind} components in layer {layer} from a pool of {len(cands)}")
            out_m += [cands[int(i)] for i in sorted(rng.choice(len(cands), size=need, replace=False))]
        return out_m
    counts = Counter(as_component(c).kind for c in like)
    pool_c = None if pool is None else [as_component(c) for c in pool]
    out: list[Component] = []
    s = lm.shape
    per_layer = {"head": s.n_heads, "neuron": s.d_mlp, "attn": 1, "mlp": 1}
    for kind in sorted(counts):
        of_kind = None if pool_c is None else [c for c in pool_c if c.kind == kind]
        size = s.n_layers * per_layer[kind] if of_kind is None else len(of_kind)
        if counts[kind] > size:
            raise ValueError(f"cannot draw {counts[kind]} {kind} components from a pool of {size}")
        for i in sorted(int(i) for i in rng.choice(size, size=counts[kind], replace=False)):
            if of_kind is not None:
                out.append(of_kind[i])
            else:  # index i enumerates all_components(lm, kind) without building the list
                layer, unit = divmod(i, per_layer[kind])
                out.append(Component(kind, layer, unit if kind in ("head", "neuron") else None))
    return out
