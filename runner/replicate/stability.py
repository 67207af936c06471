"""How often each selection of a run recurs over bootstrap resamples, where the suite recorded it (see
:mod:`runner.replicate`, step 5).

The suite records it per primary claim as ``numbers["stability"]``, a list of records, one per selection (H3: one
per category), as :mod:`fixtures.stability` documents: ``{"selection", "category"?, "B", "full" (what the run
selected), "recurrence" (share of resamples in which that selection recurs), "distribution" {value: count},
"flagged" (recurrence < 0.5), ...}``. A run without it (a suite that does not
compute stability, a claim that did not get as far as selecting, a crashed run) has no cell, never a number."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from runner.replicate.gather import HYPOTHESIS_ORDER, claim_key, hypothesis_of
from runner.replicate.run import RunResult

FLAG_BELOW = 0.5  # a selection that recurs in fewer than half of the resamples is flagged


def _records(stab: Any) -> list[tuple[str, dict[str, Any]]]:
    """``(selection name, record)`` pairs of a claim's ``numbers["stability"]``: the suite's list of records (an H3
    record is named by its category too), or a ``{name: record}`` mapping; nothing for anything else."""
    if isinstance(stab, dict):
        return [(str(k), v) for k, v in stab.items() if isinstance(v, dict)]
    if isinstance(stab, list):
        return [(str(s.get("selection", "selection")) + (f" ({s['category']})" if s.get("category") else ""), s)
                for s in stab if isinstance(s, dict)]
    return []


def stability(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per (primary claim, selection) that any run recorded, in the order of the hypotheses: ``{claim,
    hypothesis, selection, cells: {run id: {B, selected, recurrence, distribution, flagged}}}``; runs without it
    have no cell. ``flagged`` is the suite's, or recurrence < :data:`FLAG_BELOW` where it gave none. Empty when
    no run recorded stability."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        for c in r.findings.get("claims", []):
            stab = (c.get("numbers") or {}).get("stability") if c.get("primary") else None
            key = claim_key(c["id"])
            for name, s in _records(stab):
                rec = s.get("recurrence")
                flagged = s.get("flagged")
                if flagged is None and rec is not None:
                    flagged = rec < FLAG_BELOW
                row = rows.setdefault((key, name), {"claim": key, "hypothesis": c.get("hypothesis") or
                                                    hypothesis_of(key), "selection": name, "cells": {}})
                row["cells"][r.spec.id] = {"B": s.get("B"), "selected": s.get("full", s.get("selected")),
                                           "recurrence": rec,
                                           "distribution": s.get("distribution") or {}, "flagged": bool(flagged)}
    order = {h: i for i, h in enumerate(HYPOTHESIS_ORDER)}
    return sorted(rows.values(), key=lambda r: (order.get(r["hypothesis"], 99), r["claim"], r["selection"]))
