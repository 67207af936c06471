"""plotly figures for the report. Each function takes plain data and returns a ``plotly.graph_objects.Figure``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go


def rate_bars(rates: Mapping[str, Mapping[str, Mapping[str, float]]], title: str = "Refusal rate by category") -> go.Figure:
    """Grouped bars with 95% CI error bars. ``rates[series][category] = {"rate", "low", "high"}``."""
    fig = go.Figure()
    for series, by_cat in rates.items():
        cats = [c for c in by_cat if by_cat[c].get("rate") is not None]  # a category without prompts has no rate
        r = [by_cat[c]["rate"] for c in cats]
        fig.add_bar(
            name=series,
            x=cats,
            y=r,
            error_y=dict(
                type="data",
                symmetric=False,
                array=[by_cat[c]["high"] - by_cat[c]["rate"] for c in cats],
                arrayminus=[by_cat[c]["rate"] - by_cat[c]["low"] for c in cats],
            ),
        )
    fig.update_layout(barmode="group", title=title, xaxis_title="harm category",
                      yaxis=dict(title="refusal rate (share of prompts)", range=[0, 1.05]))
    return fig


def score_histogram(groups: Mapping[str, Sequence[float]], title: str = "Logit refusal score") -> go.Figure:
    """Overlaid histograms of refusal log-odds per group (harmful, harmless, benign-but-alarming)."""
    fig = go.Figure()
    for name, xs in groups.items():
        fig.add_histogram(x=list(xs), name=name, opacity=0.6, nbinsx=40)
    fig.update_layout(barmode="overlay", title=title, xaxis_title="refusal score (log-odds of a refusal first token)",
                      yaxis_title="prompts (count)")
    return fig


def heatmap(
    z: Sequence[Sequence[float]],
    x: Sequence[str | int],
    y: Sequence[str | int],
    title: str,
    x_title: str = "",
    y_title: str = "",
    colorscale: str = "RdBu",
    zmid: float | None = 0.0,
    z_title: str = "",
) -> go.Figure:
    """A labelled heatmap (layer × component, layer × head, category × category); ``z_title`` names the colour
    scale's quantity and unit."""
    fig = go.Figure(go.Heatmap(z=[list(r) for r in z], x=list(x), y=list(y), colorscale=colorscale, zmid=zmid,
                               colorbar=dict(title=dict(text=z_title, side="right")) if z_title else None))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title)
    return fig


def curve(
    x: Sequence[float],
    ys: Mapping[str, Sequence[float]],
    title: str,
    x_title: str = "",
    y_title: str = "",
    band: tuple[Sequence[float], Sequence[float]] | None = None,
    band_name: str = "random control (5–95%)",
) -> go.Figure:
    """Line curves with an optional shaded band (e.g. a random-component control)."""
    fig = go.Figure()
    if band is not None:
        lo, hi = band
        fig.add_scatter(x=list(x), y=list(hi), mode="lines", line=dict(width=0), showlegend=False, hoverinfo="skip")
        fig.add_scatter(
            x=list(x), y=list(lo), mode="lines", line=dict(width=0), fill="tonexty",
            fillcolor="rgba(120,120,120,0.25)", name=band_name,
        )
    for name, y in ys.items():
        fig.add_scatter(x=list(x), y=list(y), mode="lines+markers", name=name)
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title)
    return fig


def circuit(component_ids: Sequence[str], title: str = "Top components by layer") -> go.Figure:
    """A circuit diagram: each component (``L12.H3``, ``L5.mlp``…) as a node at (layer, index), edges
    from every node to the nodes of the next populated layer, in rank order."""
    import re

    pts = []
    for rank, cid in enumerate(component_ids):
        m = re.match(r"L(\d+)\.(?:H|N)?(\d+|attn|mlp)", cid)
        if not m:
            continue
        idx = m.group(2)
        y = int(idx) if idx.isdigit() else (0 if idx == "attn" else 1)
        pts.append((int(m.group(1)), y, cid, rank))
    fig = go.Figure()
    layers = sorted({p[0] for p in pts})
    for a, b in zip(layers, layers[1:], strict=False):
        for pa in (p for p in pts if p[0] == a):
            for pb in (p for p in pts if p[0] == b):
                fig.add_scatter(x=[pa[0], pb[0]], y=[pa[1], pb[1]], mode="lines", line=dict(color="#bbb", width=1),
                                showlegend=False, hoverinfo="skip")
    fig.add_scatter(
        x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers+text", text=[p[2] for p in pts],
        textposition="top center", marker=dict(size=[max(8, 22 - p[3]) for p in pts], color=[p[3] for p in pts],
                                               colorscale="Viridis", showscale=True, colorbar=dict(title="rank")),
        showlegend=False,
    )
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="head index")
    return fig


def attention_grid(data: Mapping, labels: Sequence[str] | None = None,
                   title: str = "Attention of the top heads (query rows, key columns)") -> go.Figure:
    """One heatmap per (head, prompt) from :func:`mech.attention.attention_patterns`: rows are heads,
    columns prompts (e.g. a harmful prompt and its harmless twin)."""
    from plotly.subplots import make_subplots

    heads, n_p = list(data["heads"]), len(data["prompts"])
    labels = list(labels) if labels is not None else [f"prompt {j}" for j in range(n_p)]
    fig = make_subplots(rows=len(heads), cols=n_p, subplot_titles=[f"{h} · {labels[j]}" for h in heads for j in range(n_p)],
                        vertical_spacing=0.08, horizontal_spacing=0.12)
    for i, h in enumerate(heads):
        for j in range(n_p):
            toks = [f"{k}:{t!r}"[:14] for k, t in enumerate(data["tokens"][j])]
            fig.add_trace(go.Heatmap(z=data["patterns"][h][j], x=toks, y=toks, colorscale="Blues", zmin=0, zmax=1,
                                     showscale=(i == 0 and j == 0)), row=i + 1, col=j + 1)
            fig.update_yaxes(autorange="reversed", row=i + 1, col=j + 1)
    fig.update_layout(title=title, height=320 * len(heads) + 80)
    return fig
