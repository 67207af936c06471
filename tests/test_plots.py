"""mech.plots: each figure builder turns plain data into the traces the report shows (no rendering)."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest

from mech import plots


def test_rate_bars_draw_the_ci_and_skip_categories_without_a_rate():
    rates = {
        "substring": {"cyber": {"rate": 0.8, "low": 0.6, "high": 0.9}, "empty": {"rate": None}},
        "judge": {"cyber": {"rate": 0.5, "low": 0.3, "high": 0.7}},
    }
    fig = plots.rate_bars(rates)
    assert isinstance(fig, go.Figure) and [t.name for t in fig.data] == ["substring", "judge"]
    bar = fig.data[0]
    assert list(bar.x) == ["cyber"] and list(bar.y) == [0.8]
    assert bar.error_y.array[0] == pytest.approx(0.1) and bar.error_y.arrayminus[0] == pytest.approx(0.2)
    assert fig.layout.barmode == "group" and tuple(fig.layout.yaxis.range) == (0, 1.05)


def test_score_histogram_overlays_one_histogram_per_group():
    fig = plots.score_histogram({"harmful": (1.0, 2.0), "harmless": [-1.0]})
    assert [t.type for t in fig.data] == ["histogram", "histogram"]
    assert [list(t.x) for t in fig.data] == [[1.0, 2.0], [-1.0]] and fig.layout.barmode == "overlay"


def test_heatmap_keeps_axes_and_centre():
    fig = plots.heatmap([[1, 2], [3, 4]], x=["a", "b"], y=[0, 1], title="t", x_title="X", y_title="Y", zmid=None)
    hm = fig.data[0]
    assert hm.type == "heatmap" and [list(r) for r in hm.z] == [[1, 2], [3, 4]]
    assert list(hm.x) == ["a", "b"] and list(hm.y) == [0, 1] and hm.zmid is None
    assert fig.layout.title.text == "t" and fig.layout.xaxis.title.text == "X"


def test_curve_band_comes_first_and_fills_between_its_bounds():
    fig = plots.curve([1, 2, 3], {"ranked": [0, -1, -2]}, "c", band=([0, 0, 0], [1, 1, 1]))
    assert len(fig.data) == 3
    hi, lo, ranked = fig.data
    assert list(hi.y) == [1, 1, 1] and not hi.showlegend
    assert list(lo.y) == [0, 0, 0] and lo.fill == "tonexty"
    assert ranked.name == "ranked" and ranked.mode == "lines+markers"
    assert len(plots.curve([1], {"a": [1], "b": [2]}, "no band").data) == 2


def test_circuit_places_components_by_layer_and_links_consecutive_layers():
    fig = plots.circuit(["L12.H3", "L5.mlp", "L5.N7", "bogus"])
    nodes = fig.data[-1]
    assert list(nodes.text) == ["L12.H3", "L5.mlp", "L5.N7"]  # an unparsable id is left out
    assert list(nodes.x) == [12, 5, 5] and list(nodes.y) == [3, 1, 7]
    edges = fig.data[:-1]
    assert len(edges) == 2 and all(list(e.x) == [5, 12] for e in edges)  # both layer-5 nodes to the layer-12 node
    assert list(nodes.marker.size) == [22, 21, 20]  # larger for higher ranks


def test_attention_grid_has_one_heatmap_per_head_and_prompt():
    data = {
        "heads": ["L1.H0", "L2.H1"],
        "prompts": ["p", "q"],
        "tokens": [["a", "b"], ["c", "d"]],
        "patterns": {"L1.H0": [[[1, 0], [0.5, 0.5]]] * 2, "L2.H1": [[[1, 0], [0, 1]]] * 2},
    }
    fig = plots.attention_grid(data, labels=["harmful", "harmless"])
    assert len(fig.data) == 4 and all(t.type == "heatmap" for t in fig.data)
    assert [a.text for a in fig.layout.annotations][:2] == ["L1.H0 · harmful", "L1.H0 · harmless"]
    assert sum(bool(t.showscale) for t in fig.data) == 1 and not math.isnan(fig.layout.height)
