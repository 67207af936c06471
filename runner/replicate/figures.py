"""The replication's figures: a forest plot per primary claim and the depths per run (plotly)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go

from fixtures.report_html import COLOR
from fixtures.verdicts import VERDICTS
from runner.replicate.specs import RunSpec


def forest_figure(row: dict[str, Any], runs: Sequence[RunSpec]) -> go.Figure:
    """Effect and 95% CI of one primary claim (a :func:`~runner.replicate.gather.gather` row) per run; runs
    without an effect show their verdict as text."""
    labels = [r.id for r in runs]
    fig = go.Figure()
    for verdict in VERDICTS:
        pts = [(r.id, row["cells"][r.id]) for r in runs
               if row["cells"][r.id].get("verdict") == verdict and row["cells"][r.id].get("effect") is not None]
        if not pts:
            continue
        eff = [c["effect"] for _, c in pts]
        ci = [c.get("ci") or [None, None] for _, c in pts]
        hi = [(c[1] - e) if c[1] is not None else 0 for c, e in zip(ci, eff, strict=True)]
        lo = [(e - c[0]) if c[0] is not None else 0 for c, e in zip(ci, eff, strict=True)]
        fig.add_trace(go.Scatter(
            x=eff, y=[i for i, _ in pts], mode="markers", name=verdict, marker=dict(color=COLOR[verdict], size=11),
            error_x=dict(type="data", symmetric=False, array=hi, arrayminus=lo, color=COLOR[verdict], thickness=2),
            customdata=[[c.get("n"), c.get("p_value"), c.get("p_adjusted")] for _, c in pts],
            hovertemplate="%{y}<br>effect %{x:.3g}<br>n %{customdata[0]}<br>p %{customdata[1]:.3g}, Holm "
                          "%{customdata[2]:.3g}<extra>" + verdict + "</extra>"))
    rest = [(r.id, row["cells"][r.id]) for r in runs if row["cells"][r.id].get("effect") is None]
    if rest:
        fig.add_trace(go.Scatter(
            x=[0] * len(rest), y=[i for i, _ in rest], mode="text", name="no effect",
            text=[c.get("verdict", "") for _, c in rest], textposition="middle right",
            textfont=dict(color=[COLOR.get(c.get("verdict"), "#555") for _, c in rest]),
            hovertext=[c.get("message") or "" for _, c in rest], hoverinfo="text"))
    fig.add_vline(x=0, line_dash="dot", line_color="#888")
    fig.update_layout(title=f"{row['hypothesis']}: {row['id'].split('::')[-1]}", height=140 + 44 * len(labels),
                      xaxis_title="effect with 95% CI (0 = the claim's null or threshold)",
                      yaxis=dict(categoryorder="array", categoryarray=labels[::-1], type="category"),
                      margin=dict(l=10, r=10, t=50, b=50), legend=dict(orientation="h", y=-0.3))
    return fig


def depth_figure(rows: Sequence[dict[str, Any]]) -> go.Figure:
    """Layer / n_layers of the selected direction, the probe layer and the top heads (rows of
    :func:`~runner.replicate.depth.depth`), one line per run."""
    fig = go.Figure()
    ys = [d["run"] for d in rows]
    hx, hy, ht = [], [], []
    for d in rows:
        for h, x in zip(d["top_heads"], d["top_head_depths"], strict=False):
            if x is not None:
                hx.append(x)
                hy.append(d["run"])
                ht.append(f"{h} of {d['n_layers']} layers")
    fig.add_trace(go.Scatter(x=hx, y=hy, mode="markers", name="top-k heads (H1)", text=ht,
                             marker=dict(color="#0969da", size=8, opacity=0.6), hoverinfo="text+x"))
    for key, name, sym, color in (("direction", "refusal direction (H4)", "diamond", "#cf222e"),
                                  ("probe", "early probe layer (H2)", "square", "#9a6700")):
        pts = [d for d in rows if d[f"{key}_depth"] is not None]
        fig.add_trace(go.Scatter(x=[d[f"{key}_depth"] for d in pts], y=[d["run"] for d in pts], mode="markers",
                                 name=name, marker=dict(symbol=sym, size=15, color=color),
                                 text=[f"layer {d[f'{key}_layer']} of {d['n_layers']}" for d in pts],
                                 hoverinfo="text+x"))
    fig.update_layout(title="Where refusal lives: layer / n_layers per run", height=160 + 44 * len(ys),
                      xaxis=dict(range=[-0.02, 1.02], title="layer / n_layers"),
                      yaxis=dict(categoryorder="array", categoryarray=ys[::-1], type="category"),
                      margin=dict(l=10, r=10, t=50, b=50), legend=dict(orientation="h", y=-0.3))
    return fig
