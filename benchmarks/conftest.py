"""Collect ``bench_*.py`` here (pytest's default pattern is ``test_*.py``), so ``pytest benchmarks/`` finds them; the
``bench_lm`` fixture the real-model benchmarks share, and ``matmul_gflops``, the one matmul throughput every
benchmark's "share of matmul" is measured against."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

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


MATMUL_REPS = 30  # best of 5 moved by 20% between two probes on idle cores (140-175 GFLOP/s); best of 30: 170-174


@pytest.fixture(scope="session")
def matmul_gflops(lm: LoadedModel) -> dict[str, float]:
    """The fp32 matmul throughput of this machine on the model's device, GFLOP/s, measured once per session so that
    every benchmark's share of it is against the same number: best of ``MATMUL_REPS`` of an MLP-shaped product
    ``[2048, 896] x [896, 4864]`` (the default model's MLP; the figure the shares use) and of a square 2048^3."""
    dev = lm.device
    out = {}
    for name, (m, k, n) in {"mlp_2048x896x4864": (2048, 896, 4864), "square_2048": (2048, 2048, 2048)}.items():
        a, b = torch.randn(m, k, device=dev), torch.randn(k, n, device=dev)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(MATMUL_REPS):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.matmul(a, b)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * m * k * n / best / 1e9
    return out
