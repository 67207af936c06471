"""The result of a sweep: :class:`PatchResult`, one column per patch, one row per pair, with labelled views."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import Tensor

from mech.patching.spec import COMPONENT_REGISTRY, Patch, PatchDirection
from mech.stats import jsonable

_NAN_EPS = 1e-6  # |source - clean| below this: the normalized effect is undefined (NaN)
Values = Literal["normalized", "raw", "delta"]


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

    kind: str  # "layer" | "head" | "neuron" | "custom" | "atp" (a unit kind's label key for unit sweeps)
    method: Literal["fast", "naive", "atp"]
    direction: PatchDirection
    patches: list[Patch]
    raw: np.ndarray  # [n_pairs, n_patches]
    clean: np.ndarray  # [n_pairs]
    source: np.ndarray  # [n_pairs]
    meta: dict[str, Any] = field(default_factory=dict)
    normalized: np.ndarray = field(default=None)  # type: ignore[arg-type]  # [n_pairs, n_patches], computed when None
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

    def values(self, which: Values = "normalized") -> np.ndarray:
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
        self, *keys: str, which: Values = "normalized", per_pair: bool = False, where: Mapping[str, Any] | None = None
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
                out[(slice(None),) + cell] = vals[:, j]
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

    def top(self, k: int = 10, by: Literal["abs", "value"] = "abs") -> list[tuple[dict[str, Any], float]]:
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
            unit = next((c.unit for c in COMPONENT_REGISTRY.values() if c.unit and c.unit in lab), None)
            if unit is not None:
                out.append(f"{unit}{lab['layer']}.{lab[unit]}-{pos}")
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
        return jsonable(
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
