"""Findings that must stay stable, as syrupy snapshots: a code change that changes a finding shows up as a
snapshot diff (review it, then ``--snapshot-update``). Only for the embedded default model."""

from __future__ import annotations

import pytest
import torch

from fixtures.h1_circuit import top_heads
from mech.registry import DEFAULT_MODEL

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _default_model_only(run_config, lm):
    if run_config.model != DEFAULT_MODEL or run_config.quantize != "none" or lm.dtype != torch.float32:
        pytest.skip("snapshots are recorded for the default model in float32 (--dtype float32); a bfloat16 run is "
                    "checked against float32 by the verdict-equality benchmark (benchmarks/bench_precision.py)")


def test_top_heads_snapshot(atp_noise, snapshot):
    """The top-10 heads by attribution (harmless → harmful) on the train split."""
    assert top_heads(atp_noise, 10) == snapshot


def test_direction_snapshot(refusal_direction, snapshot):
    """The selected refusal direction's layer and position, and its rounded norm."""
    sel = refusal_direction.selection
    assert {"layer": sel.layer, "pos": sel.pos, "norm": round(sel.norm, 1)} == snapshot
