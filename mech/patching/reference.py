"""Reference (unpatched) runs of every receiver and source, on :class:`mech.engine.Engine`.

:func:`reference_runs` runs every receiver and source once, the token prefix common to all of them only once, and
keeps what patched runs need: the receivers' prefix K/V and residual stream in the window, the sources'
activations there, the clean and source metrics. :func:`engine` gives the engine with its refusals as
:class:`~mech.patching.spec.PatchingError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from mech.engine import Engine, EngineError, PrefixKV
from mech.hooks import HookFn, HookPoint
from mech.patching.plan import Metric
from mech.patching.spec import PatchingError, kind_hook

if TYPE_CHECKING:
    from mech.models import LoadedModel

Key = tuple[str, int]  # (engine kind, layer or residual slot): see mech.patching.spec.SiteComponent.kind


def engine(lm: LoadedModel) -> Engine:
    """:class:`~mech.engine.Engine` of ``lm`` for a sweep: a model it cannot run is a one-line
    :class:`~mech.patching.spec.PatchingError` (the sweeps' ``method="naive"`` runs it)."""
    try:
        return Engine(lm)
    except EngineError as e:
        raise PatchingError(str(e)) from None


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """Per-row positions: ``x [B, T, ...]``, ``idx [B, W]`` -> ``[B, W, ...]``."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


@dataclass
class ReferenceRuns:
    """Reference (unpatched) runs of every receiver and source, as the patched runs need them."""

    n_shared: int  # P0: tokens shared by every prompt, run once
    shared: PrefixKV | None
    rem: PrefixKV | None  # receivers: K/V of their tokens after P0, [n_recv, kv, R, d_head] (right-padded)
    rem_len: list[int]  # receivers: tokens after P0
    recv_metric: Tensor  # [n_recv]
    src_metric: Tensor  # [n_src]
    resid: dict[int, Tensor]  # slot -> receivers' residual at their last W positions [n_recv, W, d_model]
    acts: dict[Key, Tensor]  # (kind, layer/slot) -> sources' activation at last W positions
    recv_logits: Tensor | None = None
    src_logits: Tensor | None = None


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def reference_runs(
    eng: Engine,
    recv: list[list[int]],
    src: list[list[int]],
    window: int,
    resid_slots: set[int],
    src_needs: set[Key],
    metric: Metric,
    chunk_rows: int = 32,
    keep_logits: bool = False,
    recv_needs: frozenset[Key] | set[Key] = frozenset(),
) -> tuple[ReferenceRuns, dict[Key, Tensor]]:
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
        shared = PrefixKV([rec[L][0] for L in range(eng.n_layers)], [rec[L][1] for L in range(eng.n_layers)])

    def role(
        seqs: list[list[int]], slots: set[int], needs: set[Key], want_kv: bool
    ) -> tuple[Tensor, Tensor | None, dict[Key, Tensor], PrefixKV | None]:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        r_max = max(len(s) - n_shared for s in seqs)
        metrics: list[Tensor] = []
        logits_out: list[Tensor] = []
        caps: dict[Key, list[Tensor]] = {}
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

            def make(key: Key, win: Tensor = win) -> HookFn:
                def cap(x: Tensor, hook: HookPoint) -> None:
                    caps.setdefault(key, []).append(_gather(x, win))

                return cap

            fh = [(kind_hook(k, L, eng.n_layers), make((k, L))) for k, L in sorted(needs) if k != "resid"]
            rec: dict[int, tuple[Tensor, Tensor]] | None = {} if want_kv else None
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
            kv = PrefixKV([torch.cat(x)[inv] for x in kv_k], [torch.cat(x)[inv] for x in kv_v])
        return metric_t, logits_t, acts, kv

    r_metric, r_logits, r_acts, rem = role(recv, set(resid_slots), set(recv_needs), True)
    s_metric, s_logits, s_acts, _ = role(src, set(), set(src_needs), False)
    refs = ReferenceRuns(
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
