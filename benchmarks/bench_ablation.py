"""Ablation-set benchmark: the H1 null (layer-matched random head sets, mean-ablated, scored on the held-out harmful
prompts) one set at a time with hooks vs :func:`mech.set_scores.ablation_set_scores`.

Run: ``.venv/bin/python -m pytest benchmarks/bench_ablation.py --benchmark-only -p no:cacheprovider -s``
(``--device`` etc. as for the suite). Env: ``MECH_BENCH_SETS`` (random sets per k, default 100, the suite's
``n_random_primary``) and ``MECH_BENCH_HOOK_SETS`` (how many of them the hook loop runs, default 10): the hook
loop's time for all sets is **extrapolated** linearly from those (every set is the same full forward: 5 sets
took 93.2, 93.3 and 92.8 s at the three k in the run below), and the scores are compared on them.

Workload, on the default model (Qwen2.5-Coder-0.5B-Instruct): the 33 harmful prompts of the suite's test split,
means over the first 24 harmless train prompts (end-aligned, ``n_end`` 5), refusal log-odds of ``I``/``As``
(the standard workload's tokens), for k in {k/4, k/2, k} with k = 5% of the heads (17): the top heads are a
fixed list (the suite's AtP ranking on train pairs, as cached by H1; its first 10 are the snapshot's), and
``MECH_BENCH_SETS`` random layer-matched sets of each (:func:`mech.components.random_components`, seed 0).

Per k, in ``benchmark.extra_info`` and ``reports/bench_ablation.json``: both wall times, their ratio, the max
score difference (asserted ≤ 2e-4), the useful GFLOP of each path (2 x decoder-layer params per token-layer +
2 x lm_head params per unembedded row; the hook loop's counted from its padded batches) and GFLOP/s against
the fp32 matmul throughput measured in the same run, the load average.

Measured on idle cores (load average 0.2 at the start; ``MECH_BENCH_SETS=100 MECH_BENCH_HOOK_SETS=5``, the
issue's 100 sets per k; about 9 min for the three k): hook loop 3.8-4.3 s per set (21.4 / 19.0 / 19.2 s for 5
sets); sets at once 130 s / 146 s / 156 s for 100 sets at k = 4 / 8 / 17, i.e. **x3.3 / x2.6 / x2.5**, max |diff|
9.2e-6 (asserted: 2e-4). Useful work: 546 GFLOP per set for the hook loop (24 layers, prompts left-padded to the
longest) against 218-269 GFLOP per set here (from layer 12 / 10 / 9, little padding, the clean run shared); the
hook loop runs at 127-143 GFLOP/s (72-81% of the 177 GFLOP/s fp32 matmul measured in the same run), the sets at
once at 167-173 GFLOP/s (**94-98%**). So the batched path is at the machine's limit and the ratio is the ratio
of FLOPs (x2.0-2.5) times the hook loop's lost efficiency: the issue's x10 cannot be reached on this workload
without leaving float32-exactness (an earlier contended run, load average 3.6-4, read x3.0-4.3 because the hook
loop suffered more from the contention).

**Direction candidates** (``test_direction_candidates``): H4's selection workload, the hook path of
:func:`mech.directions.select_direction` (per candidate: ``last_logits_under`` under directional ablation on the
harmful + harmless validation prompts, bypass score and harmless first-token KL; under activation addition at
the candidate's layer on the harmless ones, induce score; ``batch_size=16``; the clean logits once) against two
calls of :func:`mech.set_scores.direction_set_scores` (all ablations with ``kl=True``; all additions). Candidates:
:func:`mech.directions.diff_in_means` on the first 10 harmful / harmless train prompts, every post-instruction
position of the layers below the pruned 20 % (19 x 5 = 95 on the default model; zero vectors, layer 0 at
template tokens, are skipped as select_direction skips them), scored on the first 10 harmful and 10 harmless
validation prompts, refusal ids as above. Env ``MECH_BENCH_CANDIDATES`` (default 95): how many, evenly spaced
over the (layer, position) grid so the additions keep the layer mix; both paths run on all of them. Recorded:
both wall times (and this process's CPU times), the ratio, max differences (asserted: ≤ 2e-4 on log-odds,
≤ 1e-4 on KL), useful GFLOP and GFLOP/s of each path and their share of the matmul throughput. Few candidates
overstate the batched path's FLOPs: its rows are padded to the longest prompt of a group, and a group spans all
prompts until (candidates x prompts) fills ``max_rows`` (at 95 candidates, two prompts a group: little padding).

Measured on idle cores (``MECH_BENCH_CANDIDATES=19``: 18 scored, one per layer, the zero vector at layer 0
skipped): hook path 71.9 s, batched 39.7 s, **x1.81** (CPU time x1.79); max |diff| 1.1e-5 (log-odds), 4.2e-6 (KL).
Useful work 8221 vs 6679 GFLOP: 114 GFLOP/s (65% of the 177 GFLOP/s matmul) against 168 (95%). As for the
ablation sets, the batched path is at the machine's limit; the hook path loses a third to small batches, and the
additions save the layers below their own. (An earlier run at 6 candidates under contention read x8.2, which the
GFLOP/s above the matmul rate showed to be an artefact.)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mech.ablation import MeanActivations, mean_activations
from mech.chat import shared_prefix_len
from mech.components import random_components
from mech.directions import diff_in_means
from mech.engine import Work
from mech.evaluation import first_token_kl
from mech.interventions import Ablate, AddVector, ProjectOut
from mech.models import LoadedModel
from mech.prompts import default_pairs
from mech.refusal import refusal_log_odds
from mech.scoring import last_logits_under, refusal_scores
from mech.set_scores import MIN_REST, ablation_set_scores, direction_set_scores

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = json.loads((Path(__file__).with_name("workload.json")).read_text())
IDS = WORKLOAD["metric"]["refusal_token_ids"]
REPORT = ROOT / "reports" / "bench_ablation.json"
# the suite's AtP ranking of heads (train pairs; fixtures/h1_circuit.top_heads), top 17 = 5% of 336 heads
TOP = ["L14.H13", "L12.H2", "L14.H5", "L14.H7", "L14.H9", "L14.H2", "L10.H4", "L10.H12", "L14.H11", "L20.H2",
       "L14.H12", "L12.H3", "L9.H2", "L12.H5", "L15.H3", "L18.H2", "L12.H7"]
K = 17
KS = (K // 4, K // 2, K)
N_SETS = int(os.environ.get("MECH_BENCH_SETS", "100"))
N_HOOK_SETS = min(N_SETS, int(os.environ.get("MECH_BENCH_HOOK_SETS", "10")))
ATOL = 2e-4
TARGET_SPEEDUP = 10.0  # the target (recorded, not asserted: see the ratio and FLOP figures)
N_MEAN_PROMPTS = 24
N_CANDIDATES = int(os.environ.get("MECH_BENCH_CANDIDATES", "95"))
N_DIM_TRAIN = 10  # train prompts per side for the diff-in-means candidates
N_VAL = 10  # validation prompts per side the candidates are scored on
KL_ATOL = 1e-4

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]


def _hook_loop_work(lm: LoadedModel, prompts: list[str], n_sets: int, batch_size: int = 64) -> Work:
    """What the hook loop computes per set, from its batches (``batch_size`` prompts, left-padded to the longest,
    each batch on its own prefix row)."""
    seqs = lm.encode_chat(prompts)
    P = shared_prefix_len(seqs, MIN_REST)
    rest = sorted(len(s) - P for s in seqs)
    bs = batch_size
    tokens = P * (-(-len(rest) // bs)) + sum(len(rest[i : i + bs]) * max(rest[i : i + bs]) for i in range(0, len(rest), bs))
    return Work(layer_tokens=n_sets * tokens * lm.shape.n_layers, unembed_rows=n_sets * len(prompts))


@pytest.fixture(scope="module")
def setup(bench_lm: LoadedModel, matmul_gflops: dict[str, float]) -> Iterator[dict[str, Any]]:
    from fixtures.config import SuiteConfig

    lm = bench_lm
    suite = SuiteConfig()
    train, val, test = default_pairs().split(suite.split, seed=suite.split_seed)
    st: dict[str, Any] = {
        "model": lm.name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(lm.device),
        "n_sets": N_SETS,
        "n_hook_sets": N_HOOK_SETS,
        "matmul_gflops": matmul_gflops["mlp_2048x896x4864"],
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "tasks": {},
        "_prompts": test.harmful().texts(),
        "_train": train,
        "_val": val,
        "_prune_last_fraction": suite.prune_last_fraction,
    }
    yield st
    st["loadavg_end"] = os.getloadavg()
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({k: v for k, v in st.items() if not k.startswith("_")}, indent=1, default=float))
    for name, t in st["tasks"].items():
        if "summary" in t:
            sys.stdout.write(f"\n{name}: {t['summary']}")
            continue
        sys.stdout.write(
            f"\n{name}: {t['n_sets']} sets  hook loop {t['hook_seconds']:.1f}s"
            f"{' (extrapolated)' if t['hook_extrapolated'] else ''}  sets at once {t['fast_seconds']:.1f}s  "
            f"x{t['speedup']:.2f}  GFLOP {t['hook_gflop']:.0f} vs {t['fast_gflop']:.0f}  GFLOP/s "
            f"{t['hook_gflops_per_s']:.1f} vs {t['fast_gflops_per_s']:.1f} (matmul {st['matmul_gflops']:.0f})  "
            f"max|diff| {t['max_abs_diff']:.1e}"
        )
    sys.stdout.write("\n")


@pytest.fixture(scope="module")
def head_means(bench_lm: LoadedModel, setup: dict[str, Any]) -> MeanActivations:
    return mean_activations(bench_lm, setup["_train"].harmless().texts()[:N_MEAN_PROMPTS], kinds=("head",))


@pytest.mark.parametrize("k", KS, ids=[f"k{k}" for k in KS])
def test_random_head_sets(benchmark: Any, bench_lm: LoadedModel, setup: dict[str, Any], head_means: MeanActivations,
                          k: int) -> None:
    lm = bench_lm
    prompts: list[str] = setup["_prompts"]
    means = head_means
    rng = np.random.default_rng(0)
    sets = [random_components(lm, TOP[:k], rng, match_layers=True) for _ in range(N_SETS)]
    refusal_scores(lm, prompts[:2], IDS, [None])  # warm-up

    t0 = time.perf_counter()
    want = refusal_scores(lm, prompts, IDS, [Ablate(tuple(s), "mean", means) for s in sets[:N_HOOK_SETS]])
    hook_measured = time.perf_counter() - t0
    hook_s = hook_measured * N_SETS / N_HOOK_SETS

    work = Work()
    holder: dict[str, Any] = {}

    def fast() -> None:
        t = time.perf_counter()
        holder["scores"] = ablation_set_scores(lm, prompts, IDS, sets, "mean", means, work=work)
        holder["seconds"] = time.perf_counter() - t

    benchmark.pedantic(fast, rounds=1, iterations=1, warmup_rounds=0)
    got, fast_s = holder["scores"], holder["seconds"]
    diff = float((got[:N_HOOK_SETS] - want).abs().max())
    hook_work = _hook_loop_work(lm, prompts, N_SETS)
    peak = setup["matmul_gflops"]
    info = {
        "k": k,
        "first_layer": min(int(c.split(".")[0][1:]) for c in TOP[:k]),
        "n_sets": N_SETS,
        "n_prompts": len(prompts),
        "hook_sets_timed": N_HOOK_SETS,
        "hook_seconds_measured": hook_measured,
        "hook_seconds": hook_s,
        "hook_extrapolated": N_HOOK_SETS < N_SETS,
        "fast_seconds": fast_s,
        "speedup": hook_s / fast_s,
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": hook_s / fast_s >= TARGET_SPEEDUP,
        "max_abs_diff": diff,
        "fast_work": work.to_dict(),
        "hook_gflop": hook_work.useful_flops(lm) / 1e9,
        "fast_gflop": work.useful_flops(lm) / 1e9,
        "hook_gflops_per_s": hook_work.useful_flops(lm) / 1e9 / hook_s,
        "fast_gflops_per_s": work.useful_flops(lm) / 1e9 / fast_s,
        "matmul_gflops_per_s": peak,
        "hook_fraction_of_matmul": hook_work.useful_flops(lm) / 1e9 / hook_s / peak,
        "fast_fraction_of_matmul": work.useful_flops(lm) / 1e9 / fast_s / peak,
        "loadavg": os.getloadavg(),
    }
    benchmark.extra_info.update(info)
    setup["tasks"][f"k{k}"] = info
    assert diff <= ATOL
    assert info["speedup"] > 1.0


def test_direction_candidates(benchmark: Any, bench_lm: LoadedModel, setup: dict[str, Any]) -> None:
    """H4's candidate scoring: select_direction's per-candidate hook path vs two direction_set_scores calls."""
    lm = bench_lm
    train, val = setup["_train"], setup["_val"]
    hv, lv = val.harmful().texts()[:N_VAL], val.harmless().texts()[:N_VAL]
    nh = len(hv)
    layers = list(range(int(lm.shape.n_layers * (1 - setup["_prune_last_fraction"]))))
    dim = diff_in_means(lm, train.harmful().texts()[:N_DIM_TRAIN], train.harmless().texts()[:N_DIM_TRAIN],
                        layers=layers)
    grid = [(L, p) for L in dim.layers for p in dim.positions]
    n = min(N_CANDIDATES, len(grid))
    picked = [grid[i] for i in sorted({int(round(x)) for x in np.linspace(0, len(grid) - 1, n)})]
    cands = [(L, p, dim.vector(L, p)) for L, p in picked if float(dim.vector(L, p).norm()) > 0]
    last_logits_under(lm, hv[:2])  # warm-up

    t0, c0 = time.perf_counter(), time.process_time()  # select_direction's loop (batch_size=16), per prompt
    base = last_logits_under(lm, hv + lv, None, 16)
    h_bypass, h_kl, h_induce = [], [], []
    for L, _, v in cands:
        logits = last_logits_under(lm, hv + lv, ProjectOut.of(lm, v), 16)
        h_bypass.append(refusal_log_odds(logits[:nh], IDS))
        h_kl.append(first_token_kl(base[nh:], logits[nh:]))
        added = last_logits_under(lm, lv, AddVector.of(lm, v, L), 16)
        h_induce.append(refusal_log_odds(added, IDS))
    hook_s, hook_cpu = time.perf_counter() - t0, time.process_time() - c0

    work = Work()
    holder: dict[str, Any] = {}

    def fast() -> None:
        t, c = time.perf_counter(), time.process_time()
        holder["abl"] = direction_set_scores(lm, hv + lv, IDS, [("ablate", v) for _, _, v in cands], kl=True,
                                             work=work)
        holder["add"] = direction_set_scores(lm, lv, IDS, [("add", v, L) for L, _, v in cands], work=work)
        holder["seconds"], holder["cpu"] = time.perf_counter() - t, time.process_time() - c

    benchmark.pedantic(fast, rounds=1, iterations=1, warmup_rounds=0)
    abl, add, fast_s = holder["abl"], holder["add"], holder["seconds"]
    assert abl.kl is not None
    diff = max(float((abl.scores[:, :nh] - torch.stack(h_bypass)).abs().max()),
               float((add.scores - torch.stack(h_induce)).abs().max()))
    kl_diff = float((abl.kl[:, nh:] - torch.stack(h_kl)).abs().max())
    nc = len(cands)
    hook_work = _hook_loop_work(lm, hv + lv, 1 + nc, 16)  # the clean logits once, each candidate's ablation
    hook_work.add(_hook_loop_work(lm, lv, nc, 16))  # each candidate's addition
    peak = setup["matmul_gflops"]
    hook_gf, fast_gf = hook_work.useful_flops(lm) / 1e9, work.useful_flops(lm) / 1e9
    info = {
        "n_candidates": nc,
        "candidate_layers": sorted({L for L, _, _ in cands}),
        "n_harmful_val": nh,
        "n_harmless_val": len(lv),
        "n_dim_train": N_DIM_TRAIN,
        "hook_seconds": hook_s,
        "fast_seconds": fast_s,
        "speedup": hook_s / fast_s,
        # this process's CPU seconds (all threads): steadier than wall time when other jobs share the cores
        "hook_cpu_seconds": hook_cpu,
        "fast_cpu_seconds": holder["cpu"],
        "cpu_time_ratio": hook_cpu / holder["cpu"],
        "max_abs_diff": diff,
        "max_abs_kl_diff": kl_diff,
        "fast_work": work.to_dict(),
        "hook_gflop": hook_gf,
        "fast_gflop": fast_gf,
        "hook_gflops_per_s": hook_gf / hook_s,
        "fast_gflops_per_s": fast_gf / fast_s,
        "matmul_gflops_per_s": peak,
        "hook_fraction_of_matmul": hook_gf / hook_s / peak,
        "fast_fraction_of_matmul": fast_gf / fast_s / peak,
        "loadavg": os.getloadavg(),
    }
    info["summary"] = (
        f"{nc} candidates  hook path {hook_s:.1f}s  batched {fast_s:.1f}s  x{hook_s / fast_s:.2f} (CPU time "
        f"x{hook_cpu / holder['cpu']:.2f})  GFLOP "
        f"{hook_gf:.0f} vs {fast_gf:.0f}  GFLOP/s {hook_gf / hook_s:.1f} vs {fast_gf / fast_s:.1f} (matmul "
        f"{peak:.0f})  max|diff| {diff:.1e}  KL {kl_diff:.1e}"
    )
    benchmark.extra_info.update(info)
    setup["tasks"]["direction_candidates"] = info
    assert diff <= ATOL and kl_diff <= KL_ATOL
