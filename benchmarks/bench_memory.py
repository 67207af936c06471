"""Peak resident memory of the default model in float32 and 4-bit (bitsandbytes NF4) on this machine.

Each configuration runs in a fresh subprocess (peak RSS is per process): import, load, then the library's
typical work on 8 prompts (a forward with refusal scores, greedy generation of 16 tokens). Reported per
configuration: peak RSS, RSS after imports, the difference, the stored weight bytes and
:func:`mech.memory.estimate_memory`'s estimate, in ``extra_info`` of the benchmark JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

CHILD = r"""
import json, resource, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
import torch, transformers
from mech.models import load_model
from mech.memory import estimate_memory, stored_bytes
from mech.prompts import default_pairs
from mech.refusal import generate, refusal_scores
base = rss()
t0 = time.perf_counter()
lm = load_model(device="cpu", quantize=sys.argv[1])
load_s = time.perf_counter() - t0
after_load = rss()
prompts = [p.prompt for p in default_pairs()][:8]
refusal_scores(lm, prompts, [40])
generate(lm, prompts, max_new_tokens=16)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
est = estimate_memory(lm.model.config, "float32", sys.argv[1], batch=8, seq_len=64)
print(json.dumps({"rss_after_import": base, "rss_after_load": after_load, "peak_rss": peak, "load_s": load_s,
                  "stored_weight_bytes": stored_bytes(lm.model), "estimate": est.to_dict()}))
"""


def _measure(quantize: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", CHILD, quantize], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.parametrize("quantize", ["none", "4bit"])
def test_peak_memory(benchmark: Any, quantize: str) -> None:
    t0 = time.perf_counter()
    res = benchmark.pedantic(_measure, args=(quantize,), rounds=1, iterations=1)
    gib = 2**30
    benchmark.extra_info.update({
        "quantize": quantize,
        "peak_rss_gib": round(res["peak_rss"] / gib, 3),
        "rss_after_import_gib": round(res["rss_after_import"] / gib, 3),
        "model_and_work_gib": round((res["peak_rss"] - res["rss_after_import"]) / gib, 3),
        "stored_weights_gib": round(res["stored_weight_bytes"] / gib, 3),
        "estimate_total_gib": round(res["estimate"]["total"] / gib, 3),
        "load_s": round(res["load_s"], 1),
        "wall_s": round(time.perf_counter() - t0, 1),
    })
    assert res["stored_weight_bytes"] == res["estimate"]["weights"]
