"""Collect ``bench_*.py`` here (pytest's default pattern is ``test_*.py``), so ``pytest benchmarks/`` finds them; the
``bench_lm`` fixture the real-model benchmarks share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mech.models import LoadedModel

WORKLOAD = json.loads((Path(__file__).with_name("workload.json")).read_text())


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Module | None:
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="module")
def bench_lm(lm: LoadedModel) -> LoadedModel:
    """The session model, when it is the one the standard workload (workload.json) is defined on; else skip."""
    w = WORKLOAD["model"]
    s = lm.shape
    if (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads) != (w["n_layers"], w["d_model"], w["n_heads"], w["n_kv_heads"]):
        pytest.skip(f"the workload is defined on the default model, not {lm.name}")
    return lm
