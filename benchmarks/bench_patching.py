"""Patching benchmark on the standard workload (``benchmarks/workload.json``, an unchanged copy of the shared one).

Run: ``.venv/bin/python -m pytest benchmarks/bench_patching.py --benchmark-only -p no:cacheprovider -s``

Tasks, on the default model (Qwen2.5-Coder-0.5B-Instruct, fp32, CPU), 8 pairs, the 5 end-aligned positions,
the refusal log-odds of tokens ``I``/``As``, direction harmful -> harmless (the workload's):

* t1: resid_pre layer sweep, 24 patches per pair.
* t2: head sweep, 336 patches per pair (all 8 pairs; per-pair time reported too).
* t3: attribution patching of all heads (and its Spearman rho against t2 on the top-20 heads by |AtP|).
* wide: all 24 layers x {resid_pre, attn_out, mlp_out}, 72 patches per pair.

Each task's wall time includes its unpatched reference runs (one untimed warm-up forward runs first). Reported
per task: forward calls of ``model.model`` (a forward pre-hook; in the fast path these are embedding-only calls
stopped at layer 0), rows and tokens of those calls, the fast path's own counters (partial forwards, rows,
token x layer products, unembedded rows, backward passes), useful GFLOP (2 x decoder-layer params per
token-layer + 2 x lm_head params per unembedded row; a backward pass w.r.t. activations counted as much again)
and GFLOP/s against the fp32 matmul GFLOP/s measured in the same run, peak RSS, and the speed-up over the naive
loop (one full HF forward per patch, with hooks) — the naive loop runs on a subset (pair 0, a few layers and
heads) and is **extrapolated** per token (time per token of a full forward x the tokens a full naive run of
the task needs, reference runs included). Numbers go to ``benchmark.extra_info`` and
``reports/bench_patching.json``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mech.engine import Work
from mech.models import LoadedModel
from mech.patching import PatchResult, end_positions, head_sweep, layer_sweep, patch_sweep
from mech.patching.attribution import attribution_patching, verify_against_exact

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = json.loads((Path(__file__).with_name("workload.json")).read_text())
PAIRS = [(p["harmful"], p["harmless"]) for p in WORKLOAD["pairs"]]
IDS = WORKLOAD["metric"]["refusal_token_ids"]
POS = end_positions(WORKLOAD["positions"]["count"])
REPORT = ROOT / "reports" / "bench_patching.json"
TARGET_SPEEDUP = 10.0
TARGET_ATP_CHEAPER = 50.0
TARGET_RHO = 0.8

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]


# --------------------------------------------------------------------------------------------- helpers


class ForwardCounter:
    """Counts calls of ``model.model`` (the HF base model's forward) with their rows and tokens."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = self.rows = self.tokens = 0
        self._h = model.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        self.calls += 1
        if x is not None:
            self.rows += x.shape[0]
            self.tokens += x.shape[0] * x.shape[1]

    def close(self) -> None:
        self._h.remove()


class PeakRSS:
    """Peak resident memory of this process, sampled every 20 ms while active."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._t = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.02)

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _warmup(lm: LoadedModel) -> None:
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor(lm.encode_chat([PAIRS[0][1]])), logits_to_keep=1, use_cache=False)


def _run_task(benchmark: Any, lm: LoadedModel, fn: Any) -> tuple[Any, dict[str, Any]]:
    """Warm up, then time ``fn`` once under the counters."""
    _warmup(lm)
    counter = ForwardCounter(lm.model)
    holder: dict[str, Any] = {}
    try:
        with PeakRSS() as rss:

            def call() -> None:
                t0 = time.perf_counter()
                holder["result"] = fn()
                holder["seconds"] = time.perf_counter() - t0

            benchmark.pedantic(call, rounds=1, iterations=1, warmup_rounds=0)
    finally:
        counter.close()
    info = {
        "seconds": holder["seconds"],
        "forward_calls": counter.calls,
        "sequences": counter.rows,
        "tokens": counter.tokens,
        "peak_rss_mib": rss.peak / 2**20,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    return holder["result"], info


def _work(results: list[PatchResult] | PatchResult) -> Work:
    w = Work()
    for r in results if isinstance(results, list) else [results]:
        w.add(Work(**r.meta["work"]))
    return w


def _lengths(lm: LoadedModel) -> tuple[list[int], list[int]]:
    harmful = [len(s) for s in lm.encode_chat([a for a, _ in PAIRS])]
    harmless = [len(s) for s in lm.encode_chat([b for _, b in PAIRS])]
    return harmful, harmless


def _naive_seconds(lm: LoadedModel, state: dict[str, Any], patches_per_pair: int, n_pairs: int) -> float:
    """Extrapolated naive time: per-token time of the measured naive forwards x the tokens a naive run needs
    (per pair: one source and one clean reference forward + one forward of the receiver per patch)."""
    harmful, harmless = _lengths(lm)
    tokens = sum(h + s + patches_per_pair * s for h, s in list(zip(harmful, harmless, strict=True))[:n_pairs])
    return state["naive"]["seconds_per_token"] * tokens


def _finish(benchmark: Any, lm: LoadedModel, state: dict[str, Any], name: str, info: dict[str, Any],
            work: Work, naive_s: float | None) -> dict[str, Any]:
    flops = work.useful_flops(lm)
    peak = state["machine"]["matmul_gflops"]["mlp_2048x896x4864"]
    info.update(
        {
            "work": work.to_dict(),
            "useful_gflop": flops / 1e9,
            "useful_gflops_per_s": flops / 1e9 / info["seconds"],
            "matmul_gflops_per_s": peak,
            "fraction_of_matmul": flops / 1e9 / info["seconds"] / peak,
        }
    )
    if naive_s is not None:
        info["naive_seconds_extrapolated"] = naive_s
        info["speedup_vs_naive"] = naive_s / info["seconds"]
    if benchmark is not None:
        benchmark.extra_info.update(info)
    state["tasks"][name] = info
    return info


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def state(bench_lm: LoadedModel, matmul_gflops: dict[str, float]) -> Iterator[dict[str, Any]]:
    """Shared across the tasks; written to reports/bench_patching.json at the end."""
    lm = bench_lm
    imp = subprocess.run(
        [sys.executable, "-c", "import time; t = time.perf_counter(); import mech.patching, mech.patching.attribution; "
         "print(time.perf_counter() - t)"], capture_output=True, text=True, cwd=ROOT, check=True,
    )
    st: dict[str, Any] = {
        "workload": {"name": WORKLOAD["name"], "version": WORKLOAD["version"]},
        "model": lm.name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_s": lm.load_seconds,
        "import_s": float(imp.stdout.strip().splitlines()[-1]),
        "machine": {"matmul_gflops": matmul_gflops, "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()},
        "tasks": {},
        "_results": {},  # PatchResult objects shared between tasks (not written)
    }
    yield st
    st["machine"]["loadavg_end"] = os.getloadavg()
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({k: v for k, v in st.items() if not k.startswith("_")}, indent=1, default=float))
    _print_table(st)


def _print_table(st: dict[str, Any]) -> None:
    rows = []
    for name, t in st["tasks"].items():
        rows.append(
            f"{name:<14} {t['seconds']:8.1f}s  fwd={t['forward_calls']:<4} partial={t['work']['partial_forwards']:<3} "
            f"tok*layers={t['work']['layer_tokens']:<8} GF={t['useful_gflop']:8.0f} GF/s={t['useful_gflops_per_s']:6.1f} "
            f"({100 * t['fraction_of_matmul']:4.0f}% of matmul)"
            + (f"  naive~{t['naive_seconds_extrapolated']:7.0f}s  x{t['speedup_vs_naive']:.1f}" if "speedup_vs_naive" in t else "")
        )
    sys.stdout.write("\n" + "\n".join(rows) + "\n")
    for k in ("atp_vs_exact", "findings"):
        if k in st:
            sys.stdout.write(f"{k}: {json.dumps(st[k], default=float)}\n")


# ---------------------------------------------------------------------------------------------- tasks


@pytest.fixture(scope="module")
def naive(bench_lm: LoadedModel, state: dict[str, Any]) -> dict[str, Any]:
    """The naive baseline, measured on pair 0: resid_pre at 4 layers and 3 heads, one full HF forward with hooks
    per patch (+ the 2 reference forwards); its time per token is what the tasks extrapolate from."""
    from mech.patching import head_patches, layer_patches

    lm = bench_lm
    patches = layer_patches(24, ("resid_pre",), layers=[0, 8, 16, 23], positions=POS) + head_patches(
        24, 14, layers=[0, 12, 23], heads=[5], positions=POS
    )
    _warmup(lm)
    counter = ForwardCounter(lm.model)
    try:
        t0 = time.perf_counter()
        res = patch_sweep(lm, PAIRS[:1], patches, refusal_ids=IDS, method="naive", progress=False)
        seconds = time.perf_counter() - t0
    finally:
        counter.close()
    work = _work(res)
    fast = patch_sweep(lm, PAIRS[:1], patches, refusal_ids=IDS)
    info = {
        "seconds": seconds,
        "forward_calls": counter.calls,
        "sequences": counter.rows,
        "tokens": counter.tokens,
        "patches": len(patches),
        "seconds_per_forward": seconds / work.full_forwards,
        "seconds_per_token": seconds / work.full_tokens,
        "max_abs_diff_fast_vs_naive": float(np.abs(fast.raw - res.raw).max()),
    }
    state["naive"] = info
    _finish(None, lm, state, "naive_subset", info, work, None)
    assert info["max_abs_diff_fast_vs_naive"] < 1e-4
    return info


def test_t1_layer_sweep(benchmark: Any, bench_lm: LoadedModel, state: dict[str, Any], naive: dict[str, Any]) -> None:
    lm = bench_lm
    res, info = _run_task(
        benchmark, lm, lambda: layer_sweep(lm, PAIRS, components=("resid_pre",), positions=POS, refusal_ids=IDS)
    )
    info["values"] = res.raw.tolist()  # values[pair][layer]
    info["normalized_mean"] = res.mean.tolist()
    info["clean"], info["source"] = res.clean.tolist(), res.source.tolist()
    _finish(benchmark, lm, state, "t1_layer_sweep", info, _work(res), _naive_seconds(lm, state, 24, len(PAIRS)))
    state["_results"]["t1"] = res
    assert info["speedup_vs_naive"] >= TARGET_SPEEDUP


def test_t2_head_sweep(benchmark: Any, bench_lm: LoadedModel, state: dict[str, Any], naive: dict[str, Any]) -> None:
    lm = bench_lm
    res, info = _run_task(benchmark, lm, lambda: head_sweep(lm, PAIRS, positions=POS, refusal_ids=IDS))
    info["seconds_per_pair"] = info["seconds"] / len(PAIRS)
    info["values"] = res.as_array("layer", "head", which="raw", per_pair=True).tolist()  # values[pair][layer][head]
    _finish(benchmark, lm, state, "t2_head_sweep", info, _work(res), _naive_seconds(lm, state, 336, len(PAIRS)))
    info["naive_seconds_per_pair_extrapolated"] = info["naive_seconds_extrapolated"] / len(PAIRS)
    state["_results"]["t2"] = res
    grid = res.as_array("layer", "head")
    order = np.argsort(-np.abs(grid).ravel())[:10]
    state.setdefault("findings", {})["top10_heads"] = [
        {"head": f"{j // 14}.{j % 14}", "normalized_effect": float(grid.ravel()[j])} for j in order
    ]
    assert info["speedup_vs_naive"] >= TARGET_SPEEDUP


def test_t3_atp_heads(benchmark: Any, bench_lm: LoadedModel, state: dict[str, Any], naive: dict[str, Any]) -> None:
    lm = bench_lm
    out, info = _run_task(
        benchmark, lm, lambda: attribution_patching(lm, PAIRS, components=("z",), positions=POS, refusal_ids=IDS)
    )
    atp = out["head"]
    info["values"] = atp.as_array("layer", "head", which="delta", per_pair=True).tolist()
    info["clean"], info["source"] = atp.clean.tolist(), atp.source.tolist()
    naive_t2 = _naive_seconds(lm, state, 336, len(PAIRS))
    # textbook AtP: a source forward, a receiver forward and a backward (counted as one more forward) per pair
    naive_atp_tokens = sum(h + 2 * s for h, s in zip(*_lengths(lm), strict=True))
    info["naive_atp_seconds_extrapolated"] = state["naive"]["seconds_per_token"] * naive_atp_tokens
    _finish(benchmark, lm, state, "t3_atp_heads", info, _work(atp), info["naive_atp_seconds_extrapolated"])
    cmp: dict[str, Any] = {
        "cheaper_than_naive_exact_head_sweep": naive_t2 / info["seconds"],
    }
    if "t2" in state["_results"]:
        v = verify_against_exact(lm, PAIRS, atp, k=20, exact=state["_results"]["t2"])
        t2 = state["tasks"]["t2_head_sweep"]
        cmp.update(
            {
                "cheaper_than_fast_exact_head_sweep": t2["seconds"] / info["seconds"],
                "flop_ratio_fast_exact_over_atp": t2["useful_gflop"] / info["useful_gflop"],
                "spearman_top20": v.spearman,
                "spearman_top20_p": v.p_value,
                "overlap_top20": v.overlap,
                "spearman_all_heads": v.spearman_candidates,
                "top20": [{**lab, "atp": a, "exact": e} for lab, a, e in zip(v.labels, v.atp, v.exact, strict=True)],
            }
        )
    state["atp_vs_exact"] = cmp
    benchmark.extra_info["atp_vs_exact"] = cmp
    assert cmp["cheaper_than_naive_exact_head_sweep"] >= TARGET_ATP_CHEAPER
    if "spearman_top20" in cmp:
        assert cmp["spearman_top20"] >= TARGET_RHO


def test_wide_layer_sweep(benchmark: Any, bench_lm: LoadedModel, state: dict[str, Any], naive: dict[str, Any]) -> None:
    lm = bench_lm
    res, info = _run_task(benchmark, lm, lambda: layer_sweep(lm, PAIRS, positions=POS, refusal_ids=IDS))
    grid = res.as_array("layer", "component")  # [24, 3] mean normalized effect
    info["normalized_mean"] = grid.tolist()
    _finish(benchmark, lm, state, "wide_layer_sweep", info, _work(res), _naive_seconds(lm, state, 72, len(PAIRS)))
    comps = res.axis("component")
    state.setdefault("findings", {})["peak_layers"] = {
        c: {"layer": int(np.nanargmax(grid[:, i])), "effect": float(np.nanmax(grid[:, i]))} for i, c in enumerate(comps)
    }
    state["findings"]["layer_component_grid"] = {c: [round(float(x), 3) for x in grid[:, i]] for i, c in enumerate(comps)}
    assert info["speedup_vs_naive"] >= TARGET_SPEEDUP
