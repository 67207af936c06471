"""What to patch: directions, the component registry, sites, patches and the builders of patch lists.

A **component kind** (:class:`SiteComponent`) is one registry entry: the hook it lives in, whether it is a
residual-stream slot, and, for kinds made of units (attention heads, MLP neurons), the unit's label key and how
many units a layer has. Everything else (site checks, the fast path's masks, AtP's per-unit contributions, the
``attribution_patching`` groups, result ids) reads the registry, so a new granularity is one
:func:`register_component` call (plus a builder, if it wants one: :func:`unit_patches` serves any unit kind).
Patching and ablation share one vocabulary, the hook a component lives in: :meth:`Patch.component` is the
ablatable :class:`~mech.components.Component` a one-unit patch patches (:func:`mech.components.component_at`),
so a granularity registered on an ablatable hook kind is ablated by the same name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mech.components import Component, component_at
from mech.hooks import hook_name

if TYPE_CHECKING:
    from mech.models import ModelShape


PatchDirection = Literal["harmful_to_harmless", "harmless_to_harmful"]
DENOISE: PatchDirection = "harmful_to_harmless"
NOISE: PatchDirection = "harmless_to_harmful"
DIRECTIONS: tuple[PatchDirection, PatchDirection] = (DENOISE, NOISE)
_DIRECTION_ALIASES: dict[str, PatchDirection] = {
    DENOISE: DENOISE,
    "denoise": DENOISE,
    "harmful->harmless": DENOISE,
    NOISE: NOISE,
    "noise": NOISE,
    "harmless->harmful": NOISE,
}
ALL_POSITIONS = "all"  # label value of "position" when all positions are patched together


class PatchingError(ValueError):
    """Bad patching input (layer, position, pair alignment, model); the message is one line saying the fix."""


def normalize_direction(direction: str) -> PatchDirection:
    if direction not in _DIRECTION_ALIASES:
        raise PatchingError(f"unknown direction {direction!r}; use {DENOISE} (denoise) or {NOISE} (noise)")
    return _DIRECTION_ALIASES[direction]


# -------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class SiteComponent:
    """One patchable component kind.

    ``hook``: the :mod:`mech.hooks` kind it lives in. ``resid_offset``: for a residual-stream slot, the slot of
    layer ``L`` is ``L + resid_offset`` (resid_pre 0, resid_post 1); ``None`` for components inside a layer.
    ``unit``: the label key of one unit (``head``, ``neuron``) for kinds a site may index; ``n_units(shape)``
    how many a layer has; ``trailing_dims``: activation dims after the unit axis (``attn.hook_z`` is
    ``[batch, pos, head, d_head]``: 1; ``mlp.hook_post`` ``[batch, pos, d_mlp]``: 0).
    """

    name: str
    hook: str
    resid_offset: int | None = None
    unit: str | None = None
    n_units: Callable[[ModelShape], int] | None = None
    trailing_dims: int = 0

    @property
    def kind(self) -> str:
        """The engine's kind: ``resid`` for residual slots (resid_pre[L+1] is resid_post[L]), else the name."""
        return "resid" if self.resid_offset is not None else self.name

    def features(self, shape: ModelShape) -> int:
        """Units per layer (1 for a kind patched as a whole vector)."""
        return self.n_units(shape) if self.n_units is not None else 1


COMPONENT_REGISTRY: dict[str, SiteComponent] = {}


def register_component(component: SiteComponent) -> SiteComponent:
    """Add a component kind to the registry (a name already there is replaced)."""
    COMPONENT_REGISTRY[component.name] = component
    COMPONENTS[component.name] = component.hook
    return component


COMPONENTS: dict[str, str] = {}  # name -> hook kind: a view of the registry
for _c in (
    SiteComponent("resid_pre", "hook_resid_pre", resid_offset=0),
    SiteComponent("attn_out", "hook_attn_out"),
    SiteComponent("mlp_out", "hook_mlp_out"),
    SiteComponent("z", "attn.hook_z", unit="head", n_units=lambda s: s.n_heads, trailing_dims=1),
    SiteComponent("mlp_post", "mlp.hook_post", unit="neuron", n_units=lambda s: s.d_mlp),
    SiteComponent("resid_post", "hook_resid_post", resid_offset=1),
):
    register_component(_c)
LAYER_COMPONENTS = ("resid_pre", "attn_out", "mlp_out")  # the default of layer sweeps


def kind_hook(kind: str, slot: int, n_layers: int) -> str:
    """Hook name of an engine key ``(kind, slot)``: residual slot ``n_layers`` is the last layer's resid_post."""
    if kind == "resid":
        return hook_name(slot, "hook_resid_pre") if slot < n_layers else hook_name(n_layers - 1, "hook_resid_post")
    return hook_name(slot, COMPONENT_REGISTRY[kind].hook)


# ------------------------------------------------------------------------------------- sites, patches


@dataclass(frozen=True)
class Site:
    """One place to patch: ``component`` of ``layer`` at ``positions``, optionally only some heads/neurons.

    ``positions``: negative = end-aligned (``-1`` is the last token); non-negative = absolute (only for pairs
    whose prompts have the same token length). ``index``: units (heads for ``z``, neurons for ``mlp_post``);
    ``None`` = the whole activation.
    """

    layer: int
    component: str
    positions: tuple[int, ...]
    index: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.component not in COMPONENT_REGISTRY:
            raise PatchingError(f"unknown component {self.component!r}; use one of {', '.join(COMPONENT_REGISTRY)}")
        object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        if not self.positions:
            raise PatchingError(f"site {self.component} of layer {self.layer} has no positions; give at least one")
        if len({p < 0 for p in self.positions}) > 1:
            raise PatchingError(
                f"positions {self.positions} mix end-aligned (negative) and absolute indices; use one kind per site"
            )
        if self.index is not None:
            if self.spec.unit is None:
                units = " and ".join(f"{c.name} ({c.unit}s)" for c in COMPONENT_REGISTRY.values() if c.unit)
                raise PatchingError(f"index is only for {units}, not {self.component!r}")
            object.__setattr__(self, "index", tuple(int(i) for i in self.index))

    @property
    def spec(self) -> SiteComponent:
        return COMPONENT_REGISTRY[self.component]

    @property
    def kind(self) -> str:
        """Internal kind: ``resid`` (a residual-stream slot) or one of ``z attn_out mlp_post mlp_out``."""
        return self.spec.kind

    @property
    def slot(self) -> int:
        """Layer for inner components; residual slot for resid (resid_pre[L] = slot L, resid_post[L] = L + 1)."""
        return self.layer + (self.spec.resid_offset or 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d, "positions": list(self.positions), "index": None if self.index is None else list(self.index)}

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

    def component(self) -> Component:
        """The ablatable component this patch patches: one site of one unit (``z`` head 3 of layer 12 ->
        ``L12.H3``) or of a whole block (``attn_out`` of layer 7 -> ``L7.attn``); a one-line PatchingError
        otherwise."""
        if len(self.sites) != 1 or (self.sites[0].index is not None and len(self.sites[0].index) != 1):
            raise PatchingError(f"patch {dict(self.label)} is not one component (one site, at most one unit)")
        s = self.sites[0]
        try:
            return component_at(s.layer, s.spec.hook, None if s.index is None else s.index[0])
        except ValueError as e:
            raise PatchingError(f"patch {dict(self.label)}: {e}") from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Patch:
        return cls(tuple(Site.from_dict(s) for s in d["sites"]), dict(d.get("label", {})))


# ------------------------------------------------------------------------------------------ builders


def end_positions(k: int) -> tuple[int, ...]:
    """The last ``k`` positions as end-aligned indices: ``(-k, ..., -1)``."""
    if k < 1:
        raise PatchingError(f"need at least one end position, got k={k}")
    return tuple(range(-k, 0))


def _label(layer: int, component: str, position: int | str, **extra: Any) -> dict[str, Any]:
    return {"layer": layer, "component": component, **extra, "position": position}


def _position_groups(
    positions: Sequence[int], per_position: bool, together: bool
) -> list[tuple[int | str, tuple[int, ...]]]:
    groups: list[tuple[int | str, tuple[int, ...]]] = []
    if per_position:
        groups += [(p, (p,)) for p in positions]
    if together or not per_position:
        groups.append((ALL_POSITIONS, tuple(positions)))
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
    all ``positions`` in one patch; label ``position`` is the index or ``"all"``). Components patched as a
    whole vector: resid_pre, attn_out, mlp_out, resid_post."""
    whole = [c.name for c in COMPONENT_REGISTRY.values() if c.unit is None]
    for c in components:
        if c not in whole:
            raise PatchingError(f"layer sweeps patch {', '.join(whole[:-1])} or {whole[-1]}, not {c!r}")
    out = []
    for L in range(n_layers) if layers is None else layers:
        for c in components:
            for plabel, pos in _position_groups(positions, per_position, together):
                out.append(Patch((Site(L, c, pos),), _label(L, c, plabel)))
    return out


def unit_patches(
    component: str,
    units: Sequence[tuple[int, int]],
    positions: Sequence[int] = end_positions(5),
    per_position: bool = False,
    together: bool = True,
) -> list[Patch]:
    """One patch per ``(layer, unit)`` of a unit kind (``z``: heads, ``mlp_post``: neurons) x position group;
    the label carries the unit under the kind's key (``head``, ``neuron``)."""
    key = COMPONENT_REGISTRY[component].unit
    if key is None:
        raise PatchingError(f"{component!r} has no units; use layer_patches")
    out = []
    for L, u in units:
        for plabel, pos in _position_groups(positions, per_position, together):
            out.append(Patch((Site(L, component, pos, (u,)),), _label(L, component, plabel, **{key: u})))
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
    units = [(L, h) for L in (range(n_layers) if layers is None else layers)
             for h in (range(n_heads) if heads is None else heads)]
    return unit_patches("z", units, positions, per_position, together)


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
    return unit_patches("mlp_post", cand, positions, per_position, together)
