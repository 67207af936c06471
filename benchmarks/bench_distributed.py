"""Speed-up of a Ray-distributed exact sweep over the single-process one, on the default model.

The sweep: exact head patching (336 patches per pair, fast path) on the first 4 workload pairs. Single
process: this pytest process (all cores as torch threads). Distributed: a local Ray cluster of 2 workers,
each a model replica with cores/2 threads, one pair per unit; the pool's start (Ray and two model loads) is
timed separately. On a 2-core machine the two workers share the same cores as one process would, so the
ratio mainly shows the overhead; on a cluster each worker brings its own cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray")

from mech.distributed import RayPool, ReplicaSpec, distributed_sweep  # noqa: E402
from mech.patching import head_sweep  # noqa: E402

WORKLOAD = json.loads((Path(__file__).with_name("workload.json")).read_text())
PAIRS = [(p["harmful"], p["harmless"]) for p in WORKLOAD["pairs"]][:4]
IDS = WORKLOAD["metric"]["refusal_token_ids"]


@pytest.mark.slow
@pytest.mark.realmodel
def test_ray_two_workers_vs_one_process(benchmark: Any, lm, run_config) -> None:
    if lm.name != "qwen2.5-coder-0.5b-instruct":
        pytest.skip("defined on the default model")
    kw = dict(refusal_ids=IDS, direction="harmful_to_harmless")
    t0 = time.perf_counter()
    single = head_sweep(lm, PAIRS, **kw)
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool = RayPool(ReplicaSpec(lm.name, cache_dir=str(run_config.cache_dir)), workers=2)
    pool.start()
    start_s = time.perf_counter() - t0
    try:
        dist = benchmark.pedantic(lambda: distributed_sweep(pool, "head_sweep", PAIRS, **kw), rounds=1, iterations=1)
    finally:
        pool.close()
    dist_s = benchmark.stats.stats.mean
    diff = float(np.max(np.abs(dist.raw - single.raw)))
    benchmark.extra_info.update({
        "pairs": len(PAIRS), "patches_per_pair": single.n_patches, "single_process_s": round(single_s, 1),
        "two_workers_s": round(dist_s, 1), "pool_start_s": round(start_s, 1),
        "speedup": round(single_s / dist_s, 2), "speedup_with_start": round(single_s / (dist_s + start_s), 2),
        "max_abs_diff": diff,
    })
    assert diff < 1e-4
