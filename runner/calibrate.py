"""Calibration: every primary claim run where there is nothing to find, and how often it says "supported".

A test is evidence only if it has been seen to say "no" when there is nothing there. This runs the suite's
primary claims (``pytest hypotheses/ -m primary``) under nulls, with the refusal gate held open
(``--set gate_open=true``) and every other rule of the analysis plan unchanged, and reports each primary's
rejection rate under each null against alpha.

1. The runs (:func:`plan_calibration`), each ``pytest hypotheses/ -m primary`` in a subprocess with its own reports
   dir ``<out>/calibration/<run>/`` and the shared ``--cache-dir`` (launched by :func:`runner.replicate.run.run_one`):

   * ``real``: the model with its true labels and the gate as configured: the real run whose p is shown beside
     the nulls' (warm from the cache when the suite has run on this model and config);
   * ``label-shuffle`` (``shuffle-01`` ... ``shuffle-K``): the model with ``--shuffle-labels SEED``: the labels of
     every train and validation pair swapped by a seeded fair coin (:meth:`mech.prompts.PromptSet.swap_pair_labels`),
     so rankings, ablation means, the direction and the probes are found on noise; the test split is judged as
     usual. The instruments (refusal token set, coherence calibration) keep the true labels, so the baseline
     generations, their grades, the coherence calibration and the model are shared through the cache;
   * ``non-refusing``: a model that does not refuse (``smollm2-135m-instruct``), true labels, gate open, on S prompt
     splits (``--non-refusing-splits``, ``split_seed`` 0..S-1; one run of a deterministic model is one draw);
   * ``random-init`` (optional): a copy of the model's architecture with random weights (:func:`random_init_copy`).

2. A finished run leaves a stamp keyed by its inputs and the code (as in :mod:`runner.replicate`): a killed or
   interrupted calibration resumes by running the same command (finished runs are reused without starting
   pytest; the killed run reads its finished sweeps from the cache), also in a later session on the same cache.
3. Aggregation (:func:`aggregate`, a pure function of the runs' findings): per primary and null, the rejection
   rate (runs whose verdict is ``supported``, i.e. the suite's Holm-corrected decision, out of the runs that
   reached ``supported`` or ``NOT supported``) with its exact Clopper-Pearson 95% CI (``scipy.stats.binomtest``),
   the same for raw ``p < alpha``, and the p-values. A null *applies* to a primary when the hypothesis is false
   under it: a label shuffle only to claims that select or train on labels (``data_use`` ``select``; the
   baseline's refusal rate is judged on the test split and is untouched by it); the non-refusing and random models
   to every primary. A primary is ``miscalibrated`` when, under any null that applies, the lower bound of its
   rejection rate's CI is above alpha; ``calibrated`` when at least one applicable null has runs with a verdict
   and none is miscalibrated; ``not calibrated`` otherwise. A null with too few runs to flag anything (at alpha
   0.05 one run: even 1 of 1 supported has a CI lower bound of 0.025) is ``not calibrated``, never ``calibrated``.
4. ``<out>/calibration.json`` (keyed by the model's sha256 and :func:`fixtures.config.config_hash` of the plan, so
   the main report can look up each primary's ``status``) and ``<out>/calibration.html`` (self-contained,
   plotly.js inlined): the table, the rates with CIs against alpha, and a QQ plot of each primary's p-values
   against uniform with the real run's p.

``calibration.json`` (schema 1)::

    schema: 1, created, command, wall_s, code (sha256 of mech/ fixtures/ hypotheses/ data/: the runs' code)
    model: {name, sha256, dtype, quantization, device}      the calibrated model (from the real run's findings)
    config_hash: 16 hex                                      fixtures.config.config_hash(findings["config"])
    config: the suite configuration, alpha: float
    nulls: {<null>: {description, runs: [run ids]}}          <null> in label-shuffle | non-refusing | random-init
    runs: [{id, null ("real" or a null), model, seed, options, status ("complete" | "error" | "not run"), reused,
            wall_s, message, dir, model_sha256, config_hash, summary, label_shuffle}]
    primaries: [{id ("test_x.py::test_y", as in replication.json), hypothesis, claim,
                 status: "calibrated" | "miscalibrated" | "not calibrated",
                 real: {run, verdict, p_value, p_adjusted, effect, ci, message} | null,
                 nulls: {<null>: {applies, reason, status ("calibrated" | "miscalibrated" | "not calibrated" |
                                  "not a null"), runs, n_runs, supported, n, rate, ci [lo, hi],
                                  raw: {k, n, rate, ci}, flag_at, verdicts {verdict: count}, p_values, p_by_run}}}]

The main report finds a primary's status by matching ``model.sha256`` and ``config_hash`` with its own run's
(``findings.json`` ``model.sha256``, ``config_hash(findings["config"])``) and the claim's id without its
``hypotheses/`` prefix; no match means ``not calibrated``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import html
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fixtures.config import config_hash
from fixtures.verdicts import VERDICTS
from mech.cache import atomic_write_text
from mech.registry import DEFAULT_MODEL, REGISTRY, default_cache_dir, prepare
from runner.replicate.gather import gather
from runner.replicate.memory import memory_plan
from runner.replicate.page import CSS, fmt
from runner.replicate.run import (
    RunResult,
    code_hash,
    preflight,
    prepare_models,
    pytest_args,
    run_one,
    stamp_key,
    stop_like_ctrl_c,
    usage_error,
)
from runner.replicate.specs import (
    DEFAULT_PROMPTS,
    ROOT,
    ReplicationError,
    RunSpec,
    check_inputs,
    check_set_items,
    model_label,
    slug,
)

log = logging.getLogger(__name__)

SUBDIR = "calibration"
NON_REFUSING = "smollm2-135m-instruct"
DEFAULT_SHUFFLES = 20
DEFAULT_NON_REFUSING_SPLITS = 5
GATE_OPEN = "gate_open=true"
NULLS = {
    "label-shuffle": "the model with the harmful/harmless labels of each train and validation pair swapped by a "
                     "seeded coin (--shuffle-labels SEED): selection and training on noise, the test split judged "
                     "as usual",
    "non-refusing": "a model that does not refuse, with its true labels, on S prompt splits (split_seed 0..S-1)",
    "random-init": "the model's architecture with random weights",
}
STATUS = ("calibrated", "miscalibrated", "not calibrated")


class CalibrationError(ReplicationError):
    """Bad input to a calibration, found before any run: ``str(err)`` is one line with the fix."""


@dataclass(frozen=True)
class CalRun:
    """One suite run of the calibration: its :class:`RunSpec` and the null it samples (``real`` for none)."""

    spec: RunSpec
    null: str  # "real" | a key of NULLS
    seed: int | None = None  # the label-shuffle seed, or the non-refusing run's split_seed
    gate_open: bool = True


# ------------------------------------------------------------------------------------------------- the runs


def plan_calibration(model: str, prompts: str = DEFAULT_PROMPTS, shuffles: int = DEFAULT_SHUFFLES,
                     non_refusing: str | None = NON_REFUSING, random_init: str | None = None,
                     dtype: str = "auto", non_refusing_splits: int = DEFAULT_NON_REFUSING_SPLITS) -> list[CalRun]:
    """The runs in order: the real run, the ``shuffles`` label shuffles (seeds 1..K), the non-refusing model on
    ``non_refusing_splits`` prompt splits (``split_seed`` 0, the suite's default, then 1..S-1), the random-init copy
    (a prepared model dir, see :func:`random_init_copy`) when given.

    One run of a deterministic model is one draw of its null: its rate could never be flagged (1 of 1 supported
    has a Clopper-Pearson lower bound of 0.025 < alpha). Each split seed re-draws which pairs train, select and
    judge, so the non-refusing null gets S draws (at S = 5, two ``supported`` flag it)."""
    if shuffles < 0:
        raise CalibrationError(f"--shuffles must be ≥ 0, got {shuffles}")
    if non_refusing_splits < 1:
        raise CalibrationError(f"--non-refusing-splits must be ≥ 1, got {non_refusing_splits}")

    def spec(rid: str, m: str, extra: tuple[str, ...] = ()) -> RunSpec:
        return RunSpec(rid, m, prompts, model_label(m), "pairs" if prompts == DEFAULT_PROMPTS else Path(prompts).stem,
                       extra=extra, dtype=dtype)

    width = max(2, len(str(shuffles)))
    runs = [CalRun(spec("real", model), "real", gate_open=False)]
    runs += [CalRun(spec(f"shuffle-{s:0{width}d}", model, ("--shuffle-labels", str(s))), "label-shuffle", seed=s)
             for s in range(1, shuffles + 1)]
    if non_refusing:
        nr = f"non-refusing__{slug(model_label(non_refusing))}"
        runs.append(CalRun(spec(nr, non_refusing), "non-refusing"))  # split_seed 0: the id of a one-split plan
        runs += [CalRun(spec(f"{nr}__split-{s:02d}", non_refusing, ("--set", f"split_seed={s}")), "non-refusing",
                        seed=s) for s in range(1, non_refusing_splits)]
    if random_init:
        runs.append(CalRun(spec("random-init", random_init), "random-init"))
    return runs


def random_init_copy(model: str, cache_dir: Path, seed: int = 0) -> Path:
    """A copy of ``model``'s architecture and tokenizer with random weights (``from_config`` initialisation,
    seeded from ``seed``), saved once under ``<cache>/models/<model>-random-init-seed<seed>``. ``model`` is a
    registry name (prepared first) or a local model dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


    src = Path(model).expanduser()
    if model in REGISTRY:
        src = Path(prepare(model, cache_dir))
    if not src.is_dir():
        raise CalibrationError(f"--random-init needs a registry model or a local model dir, got {model!r}")
    dest = cache_dir / "models" / f"{slug(model_label(model))}-random-init-seed{seed}"
    if (dest / "config.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = AutoConfig.from_pretrained(src)
    for attr in ("quantization_config",):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    # a seed of its own (not the bare `seed`, which a tiny test model may have been initialised with)
    torch.manual_seed(int(hashlib.sha256(f"random-init:{seed}".encode()).hexdigest()[:8], 16))
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def _opts(run: CalRun, base: dict[str, Any]) -> dict[str, Any]:
    return {**base, "set": list(base["set"]) + ([GATE_OPEN] if run.gate_open else [])}


def run_state(run: CalRun, base: dict[str, Any], out: Path, code: str) -> str:
    """``finished`` when the run's stamp matches its inputs and the code (it will be reused), else ``to run``."""
    stamp = out / SUBDIR / run.spec.id / "run.json"
    try:
        st = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return "to run"
    ok = st.get("key") == stamp_key(run.spec, _opts(run, base), code) and st.get("status") == "complete"
    return "finished" if ok else "to run"


# ------------------------------------------------------------------------------------------------ statistics


def rejection_rate(k: int, n: int, alpha: float) -> dict[str, Any]:
    """``k`` of ``n`` runs rejected: the rate with its exact Clopper-Pearson 95% CI (None when n = 0)."""
    from scipy.stats import binomtest

    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci": None}
    ci = binomtest(k, n, alpha).proportion_ci(confidence_level=0.95, method="exact")
    return {"k": k, "n": n, "rate": k / n, "ci": [float(ci.low), float(ci.high)]}


def flag_at(n: int, alpha: float) -> int | None:
    """The fewest ``supported`` runs of ``n`` that mark a claim miscalibrated (CI lower bound above alpha): what
    the calibration can detect at this n (None: not even n of n)."""
    from scipy.stats import binomtest

    if n == 0:
        return None
    return next((k for k in range(n + 1)
                 if binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact").low > alpha), None)


def _selects(findings: Mapping[str, Any], claim_id: str) -> bool:
    return bool(((findings.get("data_use") or {}).get(claim_id) or {}).get("select"))


def aggregate(results: Sequence[RunResult], nulls: Mapping[str, str], alpha: float) -> list[dict[str, Any]]:
    """One entry per primary claim (the suite's order): per null the rejection rate (Holm-corrected verdict
    ``supported``) and raw ``p < alpha``, each with its Clopper-Pearson CI, the counts of every verdict, the
    p-values, whether the null applies and its status; the real run's verdict and p; the primary's ``status``.
    ``nulls`` maps each run id to its null (``real`` for the real run). A pure function of the findings."""
    rows = gather(results, ())
    by_id = {r.spec.id: r for r in results}
    out = []
    for row in rows:
        entry: dict[str, Any] = {"id": row["id"], "hypothesis": row["hypothesis"], "claim": row["claim"],
                                 "real": None, "nulls": {}}
        full_id = {c["id"].split("hypotheses/", 1)[-1]: c["id"] for r in results
                   for c in r.findings.get("claims", [])}.get(row["id"], row["id"])
        for rid, cell in row["cells"].items():
            if nulls.get(rid) == "real":
                entry["real"] = {"run": rid, **{k: cell.get(k) for k in ("verdict", "p_value", "p_adjusted", "effect",
                                                                        "ci", "message")}}
        for null in NULLS:
            rids = [rid for rid in row["cells"] if nulls.get(rid) == null]
            if not rids:
                continue
            cells = [row["cells"][rid] for rid in rids]
            verdicts = [c.get("verdict") for c in cells]
            judged = [c for c in cells if c.get("verdict") in ("supported", "NOT supported")]
            raw = [c for c in judged if c.get("p_value") is not None and c["p_value"] < alpha]
            ran_without_select = [rid for rid, c in zip(rids, cells, strict=True)
                                  if c.get("verdict") in ("supported", "NOT supported")
                                  and not _selects(by_id[rid].findings, full_id)]
            applies = True
            reason = "the hypothesis is false under this null: a model without a refusal mechanism"
            if null == "label-shuffle":
                applies = not (ran_without_select and len(ran_without_select) == len(judged))
                reason = ("the claim selects or trains on train/validation labels, now noise" if applies else
                          "the claim selects and trains on nothing (no data_use select): a label shuffle leaves it "
                          "unchanged, so its rate here is not a size")
            rate = rejection_rate(sum(v == "supported" for v in verdicts), len(judged), alpha)
            if not applies:
                status = "not a null"
            elif rate["n"] and rate["ci"][0] > alpha:
                status = "miscalibrated"
            elif flag_at(rate["n"], alpha) is None:  # too few runs: not even all of them supported would flag it
                status = "not calibrated"
            else:
                status = "calibrated"
            entry["nulls"][null] = {
                "applies": applies, "reason": reason, "status": status, "runs": rids, "n_runs": len(rids),
                "supported": rate["k"], "n": rate["n"], "rate": rate["rate"], "ci": rate["ci"],
                "raw": rejection_rate(len(raw), len(judged), alpha), "flag_at": flag_at(len(judged), alpha),
                "verdicts": {v: verdicts.count(v) for v in VERDICTS},
                "p_values": [c.get("p_value") for c in judged],
                "p_by_run": {rid: c.get("p_value") for rid, c in zip(rids, cells, strict=True)}}
        states = [v["status"] for v in entry["nulls"].values() if v["applies"]]
        entry["status"] = ("miscalibrated" if "miscalibrated" in states else
                           "calibrated" if "calibrated" in states else "not calibrated")
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------------- figures


NULL_COLOR = {"label-shuffle": "#0969da", "non-refusing": "#9a6700", "random-init": "#8250df"}


def rates_figure(primaries: Sequence[dict[str, Any]], alpha: float) -> Any:
    """Each primary's rejection rate under each null with its Clopper-Pearson 95% CI, against alpha."""
    import plotly.graph_objects as go

    fig = go.Figure()
    labels = [f"{p['hypothesis']}: {p['id'].split('::')[-1]}" for p in primaries]
    for null, color in NULL_COLOR.items():
        pts = [(lab, p["nulls"][null]) for lab, p in zip(labels, primaries, strict=True)
               if null in p["nulls"] and p["nulls"][null]["rate"] is not None]
        if not pts:
            continue
        fig.add_trace(go.Scatter(
            x=[v["rate"] for _, v in pts], y=[lab for lab, _ in pts], mode="markers", name=null,
            marker=dict(color=color, size=11, symbol=["circle" if v["applies"] else "circle-open" for _, v in pts]),
            error_x=dict(type="data", symmetric=False, array=[v["ci"][1] - v["rate"] for _, v in pts],
                         arrayminus=[v["rate"] - v["ci"][0] for _, v in pts], color=color),
            text=[f"{v['supported']}/{v['n']} supported, {v['status']}" for _, v in pts], hoverinfo="text+x"))
    fig.add_vline(x=alpha, line_dash="dash", line_color="#cf222e", annotation_text=f"alpha = {alpha}")
    fig.update_layout(title="Rejection rate under each null (95% Clopper-Pearson CI); open marker: not a null for "
                            "that claim", xaxis=dict(range=[-0.02, 1.02], title="share of runs 'supported'"),
                      yaxis=dict(categoryorder="array", categoryarray=labels[::-1], type="category"),
                      height=180 + 60 * len(labels), margin=dict(l=10, r=10, t=50, b=50),
                      legend=dict(orientation="h", y=-0.25))
    return fig


def qq_figure(primary: dict[str, Any], alpha: float) -> Any:
    """The primary's p-values under each null against uniform quantiles i/(n+1); the real run's p as a line."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="uniform", line=dict(color="#888", dash="dot")))
    for null, v in primary["nulls"].items():
        ps = sorted(p for p in v["p_values"] if p is not None)
        if not ps:
            continue
        q = [(i + 1) / (len(ps) + 1) for i in range(len(ps))]
        fig.add_trace(go.Scatter(x=q, y=ps, mode="markers", name=f"{null} (n={len(ps)})",
                                 marker=dict(color=NULL_COLOR.get(null, "#555"), size=9)))
    real = primary.get("real") or {}
    if real.get("p_value") is not None:
        fig.add_hline(y=real["p_value"], line_color="#1a7f37",
                      annotation_text=f"real run: p = {real['p_value']:.3g} ({real.get('verdict')})")
    fig.add_hline(y=alpha, line_dash="dash", line_color="#cf222e", annotation_text=f"alpha = {alpha}",
                  annotation_position="bottom right")
    fig.update_layout(title=f"{primary['hypothesis']}: p-values against uniform (QQ)", height=380,
                      xaxis=dict(range=[0, 1], title="uniform quantile"), yaxis=dict(range=[0, 1], title="p-value"),
                      margin=dict(l=10, r=10, t=50, b=40))
    return fig


# -------------------------------------------------------------------------------------------------- the page

_STATUS_COLOR = {"calibrated": "#1a7f37", "miscalibrated": "#cf222e", "not calibrated": "#6e7781",
                 "not a null": "#6e7781"}


def _rate_html(v: dict[str, Any]) -> str:
    ci = v["ci"]
    raw = v["raw"]
    rate = "—" if v["rate"] is None else f"{v['supported']}/{v['n']} = {v['rate']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    rawt = "—" if raw["rate"] is None else f"raw p&lt;α {raw['k']}/{raw['n']} [{raw['ci'][0]:.2f}, {raw['ci'][1]:.2f}]"
    other = ", ".join(f"{n} {k}" for k, n in v["verdicts"].items() if n and k not in ("supported", "NOT supported"))
    fa = "" if v["flag_at"] is None else f"; flagged at ≥ {v['flag_at']}/{v['n']}"
    return (f"<td class='cell' data-null-status='{html.escape(v['status'])}'><b style='color:"
            f"{_STATUS_COLOR[v['status']]}'>{html.escape(v['status'])}</b>{rate}<br><span class='muted'>{rawt}{fa}"
            + (f"; {html.escape(other)}" if other else "") + "</span></td>")


def render_html(report: dict[str, Any], figures: dict[str, Any]) -> str:
    """The self-contained page: plotly.js inlined once, every figure drawn from inline JSON."""
    import plotly.offline

    nulls = [n for n in NULLS if any(n in p["nulls"] for p in report["primaries"])]
    model = report["model"] or {}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Calibration of the primary claims</title>"
             f"<style>{CSS}</style><script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head>"
             "<body><h1>Calibration: the primary claims where there is nothing to find</h1>"
             f"<p class='muted'>Generated {html.escape(report['created'])} by <code>"
             f"{html.escape(' '.join(report['command']))}</code> in {report['wall_s']:.0f} s. Model "
             f"<code>{html.escape(str(model.get('name')))}</code> (sha256 {html.escape(str(model.get('sha256'))[:12])}), "
             f"plan <code>{html.escape(str(report['config_hash']))}</code>, alpha {report['alpha']}. Each run is "
             "<code>pytest hypotheses/ -m primary</code> with the refusal gate held open; a claim's rejection rate is "
             "the share of runs whose verdict is <b>supported</b> (the suite's Holm-corrected decision) among those "
             "that reached a verdict, with its exact Clopper–Pearson 95% CI. A claim is <b>miscalibrated</b> when "
             "the CI's lower bound is above alpha under a null that applies to it; <b>calibrated</b> means it was not: with "
             "n runs only a rate of at least the shown <i>flagged at</i> count can be detected, so a calibration with "
             "few runs is weak evidence.</p><ul>"]
    parts += [f"<li><b>{html.escape(n)}</b>: {html.escape(NULLS[n])}</li>" for n in nulls]
    parts.append("</ul><h2>Primary claims</h2><table id='calibration-table'><tr><th>hypothesis</th><th>claim</th>"
                 "<th>status</th><th>real run</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in nulls) + "</tr>")
    for p in report["primaries"]:
        real = p.get("real") or {}
        real_s = (f"{html.escape(str(real.get('verdict')))}<br>p {fmt(real.get('p_value'))}, Holm "
                  f"{fmt(real.get('p_adjusted'))}") if real else "—"
        parts.append(f"<tr data-claim='{html.escape(p['id'])}' data-status='{html.escape(p['status'])}'><td>"
                     f"{html.escape(str(p['hypothesis']))}</td><td><b>{html.escape(p['id'].split('::')[-1])}</b>"
                     f"<div class='muted'>{html.escape((p['claim'] or '')[:300])}</div></td><td><b style='color:"
                     f"{_STATUS_COLOR[p['status']]}'>{html.escape(p['status'])}</b></td><td>{real_s}</td>"
                     + "".join(_rate_html(p["nulls"][n]) if n in p["nulls"] else "<td>—</td>" for n in nulls)
                     + "</tr>")
    parts.append("</table><h2>Rejection rates against alpha</h2><div class='mech-rates'>"
                 + figures["__rates__"].to_html(full_html=False, include_plotlyjs=False) + "</div>"
                 "<h2>p-values against uniform</h2>")
    for p in report["primaries"]:
        parts.append(f"<div class='mech-qq' data-claim='{html.escape(p['id'])}'>"
                     + figures[p["id"]].to_html(full_html=False, include_plotlyjs=False) + "</div>")
    parts.append("<h2>Runs</h2><table id='runs'><tr><th>run</th><th>null</th><th>model</th><th>options</th>"
                 "<th>status</th><th>wall time</th><th>report</th></tr>")
    for r in report["runs"]:
        wall = "—" if r["wall_s"] is None else f"{r['wall_s']:.0f} s"
        status = r["status"] + (" (reused)" if r["reused"] else "") + (f": {r['message']}" if r["message"] else "")
        rep = f"{SUBDIR}/{r['id']}/hypotheses.partial.html"
        parts.append(f"<tr><td>{html.escape(r['id'])}</td><td>{html.escape(r['null'])}</td><td>"
                     f"{html.escape(r['model'])}</td><td><code>{html.escape(' '.join(r['options']))}</code></td><td>"
                     f"{html.escape(status)}</td><td>{wall}</td><td><a href='{html.escape(rep)}'>suite report</a></td>"
                     "</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------ main


def build_report(results: Sequence[RunResult], runs: Sequence[CalRun], alpha: float | None = None,
                 command: Sequence[str] = (), wall_s: float = 0.0, code: str = "") -> dict[str, Any]:
    """What ``calibration.json`` holds (module docstring, step 4), from the runs' results."""
    nulls = {c.spec.id: c.null for c in runs}
    by_id = {r.spec.id: r for r in results}
    real = by_id.get(next((c.spec.id for c in runs if c.null == "real"), ""))
    ref = real if real is not None and real.status == "complete" else next(
        (by_id[c.spec.id] for c in runs if c.null == "label-shuffle" and by_id.get(c.spec.id)
         and by_id[c.spec.id].status == "complete"), None)
    config = (ref.findings.get("config") if ref else None) or {}
    if alpha is None:
        alpha = float(config.get("alpha", 0.05))
    m = (ref.findings.get("model") if ref else None) or {}
    runs_out = []
    for c in runs:
        r = by_id.get(c.spec.id)
        cfg = (r.findings.get("config") if r else None) or {}
        runs_out.append({
            "id": c.spec.id, "null": c.null, "model": c.spec.model, "seed": c.seed,
            "options": list(c.spec.extra) + (["--set", GATE_OPEN] if c.gate_open else []),
            "status": r.status if r else "not run", "reused": bool(r and r.reused), "wall_s": r.wall_s if r else None,
            "message": r.message if r else "", "dir": str(r.dir) if r else None,
            "model_sha256": ((r.findings.get("model") or {}).get("sha256") if r else None),
            "config_hash": config_hash(cfg) if cfg else None,
            "summary": r.findings.get("summary") if r else None,
            "label_shuffle": ((r.findings.get("run") or {}).get("label_shuffle") if r else None)})
    primaries = aggregate([r for r in results if r.spec.id in nulls], nulls, alpha)
    return {
        "schema": 1, "created": _dt.datetime.now().isoformat(timespec="seconds"), "command": list(command),
        "model": {k: m.get(k) for k in ("name", "sha256", "dtype", "quantization", "device")} if m else None,
        "config_hash": config_hash(config) if config else None, "config": config, "alpha": alpha, "code": code,
        "nulls": {n: {"description": d, "runs": [c.spec.id for c in runs if c.null == n]} for n, d in NULLS.items()
                  if any(c.null == n for c in runs)},
        "runs": runs_out, "primaries": primaries, "wall_s": wall_s,
    }


def write_report(report: dict[str, Any], out: Path) -> None:
    """``calibration.json`` and ``calibration.html`` under ``out``."""
    figures = {p["id"]: qq_figure(p, report["alpha"]) for p in report["primaries"]}
    figures["__rates__"] = rates_figure(report["primaries"], report["alpha"])
    atomic_write_text(out / "calibration.json", json.dumps(report, indent=1, sort_keys=True, default=str))
    atomic_write_text(out / "calibration.html", render_html(report, figures))


def _print_plan(runs: Sequence[CalRun], base: dict[str, Any], out: Path, code: str) -> None:
    states = [run_state(c, base, out, code) for c in runs]
    sys.stdout.write(f"calibration plan: {len(runs)} runs of `pytest hypotheses/ -m primary` "
                     f"({states.count('finished')} finished and reused, {states.count('to run')} to run), reports in "
                     f"{out / SUBDIR}/<run>/, cache {base['cache_dir']}\n")
    for c, s in zip(runs, states, strict=True):
        opts = " ".join(c.spec.extra + (("--set", GATE_OPEN) if c.gate_open else ()))
        sys.stdout.write(f"  {c.spec.id:36s} {c.null:14s} {c.spec.model:32s} {opts:40s} {s}\n")
    shown: set[str] = set()
    for c, s in zip(runs, states, strict=True):  # the suite's own plan (stages, estimates) once per kind of run
        kind = c.null if c.null != "real" else "real"
        if s != "to run" or kind in shown:
            continue
        shown.add(kind)
        import subprocess

        proc = subprocess.run(pytest_args(c.spec, _opts(c, base), ["--plan"]), cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "MECH_NO_PROGRESS": "1"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("plan:", "  "))]
        sys.stdout.write(f"\nsuite plan of {c.spec.id} ({kind}):\n" + "\n".join(lines) + "\n")


def calibrate(model: str, prompts: str = DEFAULT_PROMPTS, shuffles: int = DEFAULT_SHUFFLES,
              non_refusing: str | None = NON_REFUSING, random_init: bool = False, set_items: Sequence[str] = (),
              out: str | Path = "reports", cache_dir: str | Path | None = None, device: str = "auto",
              dtype: str = "auto", quantize: str = "none", force: bool = False, plan_only: bool = False,
              progress: bool = True, command: Sequence[str] = (),
              non_refusing_splits: int = DEFAULT_NON_REFUSING_SPLITS) -> dict[str, Any] | None:
    """Run (or resume) the calibration and write its report; returns what ``calibration.json`` holds (None with
    ``plan_only``). Raises :class:`CalibrationError` (one line) for bad input, before any run."""

    t0 = time.monotonic()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = Path(out)
    if shuffles < 0:
        raise CalibrationError(f"--shuffles must be ≥ 0, got {shuffles}")
    if os.environ.get("MECH_SHUFFLE_LABELS"):
        raise CalibrationError("MECH_SHUFFLE_LABELS is set in the environment: unset it (the calibration chooses "
                               "each run's shuffle)")
    if any(i.split("=", 1)[0].strip().replace("-", "_") == "gate_open" for i in set_items):
        raise CalibrationError("--set gate_open: the calibration opens the gate itself on every null run")
    if non_refusing_splits < 1:
        raise CalibrationError(f"--non-refusing-splits must be ≥ 1, got {non_refusing_splits}")
    if non_refusing and non_refusing_splits > 1 and any(
            i.split("=", 1)[0].strip().replace("-", "_") == "split_seed" for i in set_items):
        raise CalibrationError("--set split_seed with --non-refusing-splits > 1: the non-refusing runs choose their "
                               "own split seeds; use --non-refusing-splits 1 to fix the split")
    models = [model] + ([non_refusing] if non_refusing else [])
    try:
        check_inputs(models, [prompts], cache)
        check_set_items(set_items)
    except ReplicationError as e:
        raise CalibrationError(str(e)) from None
    mem = memory_plan(models, cache, device, dtype, quantize)
    bad = [row for row in mem if row["fits"] is False]
    if bad:
        raise CalibrationError(f"--model {bad[0]['model']} does not fit this machine's memory "
                               f"({bad[0]['estimate_gb']:.1f} GB of {bad[0]['budget_gb']:.1f} GB); try --quantize 4bit")
    base = {"cache_dir": cache, "set": list(set_items), "device": device, "dtype": dtype, "quantize": quantize}
    code = code_hash()
    rand_dir = None
    if random_init:
        rand_dir = cache / "models" / f"{slug(model_label(model))}-random-init-seed0"
    runs = plan_calibration(model, prompts, shuffles, non_refusing, str(rand_dir) if rand_dir else None, dtype,
                            non_refusing_splits)
    if plan_only:
        _print_plan(runs, base, out, code)
        return None
    prepare_models(models, cache)
    if random_init:
        random_init_copy(model, cache)
    pre = next((c for c in runs if c.gate_open), runs[0])  # the suite checks the options as a null run sees them
    preflight(pre.spec, _opts(pre, base), out / SUBDIR / ".preflight")
    from tqdm import tqdm

    results: list[RunResult] = []
    bar = tqdm(runs, desc="calibration", unit="run", disable=not progress, file=sys.stderr)
    for c in bar:
        bar.set_postfix_str(f"{c.spec.id} (log {out / SUBDIR / c.spec.id / 'pytest.log'})")
        res = run_one(c.spec, _opts(c, base), out, code, force=force, subdir=SUBDIR)
        if (usage := usage_error(res)) is not None:
            raise CalibrationError(f"the suite refused the options of run {c.spec.id}: {usage}")
        if res.status != "complete":
            log.warning("run %s: %s", c.spec.id, res.message)
        results.append(res)
    bar.close()
    report = build_report(results, runs, command=command, wall_s=time.monotonic() - t0, code=code)
    write_report(report, out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runner calibrate", description=__doc__.split("\n\n")[0])

    ap.add_argument("--model", default=DEFAULT_MODEL, help="the model calibrated (its real run and label shuffles)")
    ap.add_argument("--prompts", default=DEFAULT_PROMPTS, help="prompt file (JSON/CSV) or 'pairs' (the project's)")
    ap.add_argument("--shuffles", type=int, default=DEFAULT_SHUFFLES, help="label shuffles K (seeds 1..K)")
    ap.add_argument("--non-refusing", default=NON_REFUSING, help="the non-refusing model; 'none' to leave it out")
    ap.add_argument("--non-refusing-splits", type=int, default=DEFAULT_NON_REFUSING_SPLITS,
                    help="runs of the non-refusing model, each on another prompt split (split_seed 0..S-1)")
    ap.add_argument("--random-init", action="store_true", help="also a random-weight copy of --model's architecture")
    ap.add_argument("--set", dest="set_items", action="append", default=[], metavar="NAME=VALUE",
                    help="override a suite configuration field in every run (repeatable)")
    ap.add_argument("--out", default="reports", help="where calibration.{json,html} and calibration/<run>/ go")
    ap.add_argument("--cache-dir", default=None, help="shared disk cache of models and sweeps (default ~/.cache/mech)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--force", action="store_true", help="re-run finished runs too (still warm from the disk cache)")
    ap.add_argument("--plan", action="store_true", help="print the runs (finished or to run) and the suite's plan "
                                                        "of each kind of run, run nothing")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    stop_like_ctrl_c()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    nr = None if args.non_refusing.strip().lower() in ("", "none") else args.non_refusing
    try:
        rep = calibrate(args.model, args.prompts, args.shuffles, nr, args.random_init, args.set_items, args.out,
                        args.cache_dir, args.device, args.dtype, args.quantize, args.force, args.plan,
                        not args.no_progress and not os.environ.get("MECH_NO_PROGRESS"),
                        ["python", "-m", "runner", "calibrate", *(sys.argv[2:] if argv is None else argv)],
                        args.non_refusing_splits)
    except ReplicationError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("calibrate: interrupted; finished runs and cached sweeps are kept: run the same command "
                         "again to resume\n")
        return 130
    if rep is None:
        return 0
    sys.stdout.write(f"calibrate: {len(rep['runs'])} runs in {rep['wall_s']:.0f} s; wrote {args.out}/calibration.html "
                     f"and {args.out}/calibration.json\n")
    for p in rep["primaries"]:
        cells = "  ".join(f"{n}: {v['supported']}/{v['n']} {v['status']}" for n, v in p["nulls"].items())
        sys.stdout.write(f"  {str(p['hypothesis']):8} {p['id'].split('::')[-1]:45} {p['status']:15} {cells}\n")
    return 1 if any(r["status"] != "complete" for r in rep["runs"]) else 0
