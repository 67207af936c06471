"""Wall time of the whole hypothesis suite (``pytest hypotheses/``) on the configured model, cold and warm.

Cold = empty sweep cache (the model itself already set up); warm = every sweep read from the cache. Runs
the suite in subprocesses with a private cache dir under ``--basetemp``; expect tens of minutes on 2 CPU
cores for the cold run. Select it alone with ``pytest benchmarks/bench_suite.py --benchmark-only``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mech.models import default_cache_dir

ROOT = Path(__file__).resolve().parents[1]


def _run_suite(cache: Path, reports: Path) -> float:
    env = dict(os.environ, MECH_REPORTS_DIR=str(reports))
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "hypotheses"), "-q", "-p", "no:cacheprovider", "--tb=no",
         "--cache-dir", str(cache)],
        cwd=ROOT, env=env, check=False, capture_output=True,
    )
    return time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.realmodel
def test_suite_cold_and_warm(benchmark: Any, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # share the prepared model, not the sweeps: link the model dirs into the private cache
    (cache / "models").mkdir(parents=True)
    for d in (default_cache_dir() / "models").glob("*"):
        (cache / "models" / d.name).symlink_to(d)
    cold = _run_suite(cache, tmp_path / "reports-cold")
    warm = benchmark.pedantic(_run_suite, args=(cache, tmp_path / "reports-warm"), rounds=1, iterations=1)
    benchmark.extra_info.update({"cold_s": round(cold, 1), "warm_s": round(float(warm or 0), 1),
                                 "targets": {"cold_s": 600, "warm_s": 60}})
    shutil.rmtree(tmp_path / "reports-cold", ignore_errors=True)
