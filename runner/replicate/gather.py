"""Gathering a replication's runs: each run's findings as rows of claims with one cell per run, in the suite's
order of hypotheses (see :mod:`runner.replicate`, step 4). A run without findings gives every claim an ``error``
cell, never a verdict; a finished run missing a claim does too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fixtures.families import FAMILY_LABELS, LABEL_OF_MODULE
from fixtures.report_html import claim_anchor
from runner.replicate.run import RunResult

# the hypothesis labels in the order of the argument (baseline, H1 ... H4), from the suite's own declaration
HYPOTHESIS_ORDER = FAMILY_LABELS
CELL_FIELDS = ("verdict", "effect", "ci", "n", "statistic", "p_value", "p_adjusted", "threshold", "mde", "test",
               "null", "message")


def claim_key(nodeid: str) -> str:
    """A claim's id without its ``hypotheses/`` prefix (``test_x.py::test_y[case]``), the same in every run."""
    return nodeid.split("hypotheses/", 1)[-1]


def hypothesis_of(key: str) -> str:
    """The hypothesis label of a claim key, from its file (``test_single_direction.py`` -> ``H4``)."""
    fam = key.split("::")[0]
    return LABEL_OF_MODULE.get(fam, fam)


def _rows(results: Sequence[RunResult], collected: Sequence[str], primary_only: bool) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}

    def row(nodeid: str, primary: bool) -> dict[str, Any]:
        key = claim_key(nodeid)
        return rows.setdefault(key, {"id": key, "hypothesis": None, "primary": primary, "claim": "",
                                     "anchor": claim_anchor({"id": nodeid}), "cells": {}})

    for nodeid in collected:
        row(nodeid, True)  # what the preflight collected is what `-m primary` selects
    for r in results:
        for c in r.findings.get("claims", []):
            if primary_only and not c.get("primary"):
                continue
            rw = row(c["id"], bool(c.get("primary")))
            rw["primary"] = bool(c.get("primary"))
            rw["hypothesis"] = rw["hypothesis"] or c.get("hypothesis")
            rw["claim"] = rw["claim"] or c.get("claim", "")
            rw["cells"][r.spec.id] = {k: c.get(k) for k in CELL_FIELDS}
    for rw in rows.values():
        rw["hypothesis"] = rw["hypothesis"] or hypothesis_of(rw["id"])
        for r in results:
            if r.spec.id in rw["cells"]:
                continue
            if r.status == "error":
                rw["cells"][r.spec.id] = {"verdict": "error", "message": r.message}
            else:  # the run finished but this claim is missing from its findings: never silently a verdict
                rw["cells"][r.spec.id] = {"verdict": "error", "message": "claim missing from the run's findings"}
        rw["replicates"] = sum(c["verdict"] == "supported" for c in rw["cells"].values())
    order = {h: i for i, h in enumerate(HYPOTHESIS_ORDER)}
    return sorted(rows.values(), key=lambda r: (not r["primary"], order.get(r["hypothesis"], 99), r["id"]))


def gather(results: Sequence[RunResult], collected: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per primary claim (in the suite's order of hypotheses), one cell per run: ``{id, hypothesis,
    primary, claim, anchor, cells: {run id: {verdict, effect, ci, n, p_value, p_adjusted, ..., message}},
    replicates}`` (``replicates``: the runs where it is supported; ``anchor``: its element on a run's page).
    ``collected`` (node ids from the preflight) adds the primaries no run reported."""
    return _rows(results, collected, primary_only=True)


def grid(results: Sequence[RunResult], collected: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows as :func:`gather`'s for every claim any run reported: the primaries first, then the exploratory
    claims, each part grouped by hypothesis in the order of the argument. A ``-m primary`` replication has only
    primaries; a run of the whole suite adds its exploratory claims below them."""
    return _rows(results, collected, primary_only=False)
