"""The replication page (``<out>/replication.html``), read top-down: the verdict grid (claims x runs, coloured by
verdict, every cell a link to the claim on its run's own report), the forest plots of the primaries, the depths,
the stability of the selections, then the run details (runs, memory). Self-contained: plotly.js is inlined once
and every figure is drawn from inline JSON, so the page opens offline."""

from __future__ import annotations

import html
from typing import Any

import plotly.offline

from fixtures.report_html import COLOR

CSS = """
body{font-family:system-ui,sans-serif;margin:20px;color:#1f2328}
table{border-collapse:collapse;margin:8px 0 18px}
td,th{border:1px solid #d0d7de;padding:5px 8px;vertical-align:top;font-size:90%}
th{background:#f6f8fa}
td.cell b{display:block}
td.cell a{color:inherit;text-decoration:none;display:block}
td.cell a:hover{text-decoration:underline}
tr.part th{text-align:left;background:#eaeef2}
td.flagged{background:#fff1e5;border-left:4px solid #bc4c00}
.muted{color:#57606a;font-size:85%}
"""


def fmt(v: Any) -> str:
    """A number as shown in a table: 3 significant digits, ``—`` for none."""
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _effect_lines(c: dict[str, Any]) -> str:
    ci = c.get("ci") or []
    ci_s = f" [{fmt(ci[0])}, {fmt(ci[1])}]" if len(ci) == 2 and ci[0] is not None else ""
    body = (f"effect {fmt(c.get('effect'))}{ci_s}<br>n {fmt(c.get('n'))}"
            if c.get("effect") is not None or c.get("n") is not None else "")
    if c.get("p_adjusted") is not None:
        body += f"<br>Holm p {fmt(c['p_adjusted'])}"
    return body


def _run_href(run: dict[str, Any]) -> str:
    """A run's report, relative to the page; its pytest log when it ended without findings."""
    return (run.get("report") if run["status"] == "complete" else run.get("log") or run.get("report")) or ""


def grid_cell(run: dict[str, Any], row: dict[str, Any]) -> str:
    """One cell of the verdict grid: the verdict on its colour, effect [CI], n and Holm p, linked to the claim on
    the run's report (``run["report"]``, relative to the page, and the claim's anchor there)."""
    c = row["cells"][run["id"]]
    v = c.get("verdict", "error")
    color = COLOR.get(v, "#555")
    msg = c.get("message") or ""
    href = f"{run['report']}#{row['anchor']}" if run.get("report") and run["status"] == "complete" else _run_href(run)
    return (f'<td class="cell" data-run="{_esc(run["id"])}" data-claim="{_esc(row["id"])}" data-verdict="{_esc(v)}" '
            f'style="background:{color}1f;border-left:4px solid {color}" title="{_esc(msg)}">'
            f'<a href="{_esc(href)}"><b style="color:{color}">{html.escape(v)}</b>{_effect_lines(c)}'
            + (f'<div class="muted">{html.escape(msg[:160])}</div>' if msg and v != "supported" else "")
            + "</a></td>")


def _grid(report: dict[str, Any]) -> list[str]:
    runs = report["runs"]
    head = "".join(
        f"<th><a href='{_esc(_run_href(r))}'>{html.escape(r['id'])}</a><div class='muted'>"
        f"{html.escape(r['model'])} · {html.escape(r['prompts'])} · {html.escape(r.get('dtype') or 'auto')}</div></th>"
        for r in runs)
    parts = ["<h2 id='grid'>Verdicts: every claim in every run</h2><p class='muted'>One row per claim (the "
             "primaries first, in the order of the hypotheses), one column per run; each cell opens the claim on "
             "that run's own report.</p><table id='verdict-grid'>"
             f"<tr><th>hypothesis</th><th>claim</th>{head}<th>supported in</th></tr>"]
    part = None
    for row in report["grid"]:
        kind = "primary" if row["primary"] else "exploratory"
        if kind != part:
            part = kind
            title = ("Primary claims (Holm-corrected across the primaries of each run)" if row["primary"] else
                     "Exploratory claims (corrected within their family)")
            parts.append(f"<tr class='part'><th colspan='{len(runs) + 3}'>{title}</th></tr>")
        parts.append(f"<tr data-hypothesis='{_esc(row['hypothesis'])}' data-primary='{str(row['primary']).lower()}'>"
                     f"<td>{html.escape(row['hypothesis'])}</td><td><b>{html.escape(row['id'].split('::')[-1])}</b>"
                     f"<div class='muted'>{html.escape(row['claim'][:400])}</div></td>"
                     + "".join(grid_cell(r, row) for r in runs)
                     + f"<td>{row['replicates']} of {len(runs)}</td></tr>")
    parts.append("</table>")
    return parts


def _layer_depth(layer: Any, dep: Any) -> str:
    return "—" if layer is None else f"{layer} ({fmt(dep)})"


def _depths(report: dict[str, Any], figures: dict[str, Any]) -> list[str]:
    parts = ["<h2 id='depth'>Depth: where refusal is located, layer / n_layers</h2><div class='mech-depth'>"
             + figures["__depth__"].to_html(full_html=False, include_plotlyjs=False) + "</div>",
             "<table id='depth-table'><tr><th>run</th><th>n_layers</th><th>direction layer (H4)</th><th>probe layer "
             "(H2)</th><th>top heads (H1)</th><th>mean head depth</th></tr>"]
    for d in report["depth"]:
        parts.append(f"<tr><td>{html.escape(d['run'])}</td><td>{fmt(d['n_layers'])}</td>"
                     f"<td>{_layer_depth(d['direction_layer'], d['direction_depth'])}</td>"
                     f"<td>{_layer_depth(d['probe_layer'], d['probe_depth'])}</td>"
                     f"<td>{html.escape(', '.join(map(str, d['top_heads']))) or '—'}</td>"
                     f"<td>{fmt(d['mean_head_depth'])}</td></tr>")
    parts.append("</table>")
    return parts


def stability_cell(rid: str, row: dict[str, Any]) -> str:
    """One run's recurrence of one selection (flagged below one half), its selection and distribution on hover."""
    s = row["cells"].get(rid)
    if s is None:
        return f'<td class="stab none" data-run="{_esc(rid)}">—</td>'
    dist = ", ".join(f"{k}: {n}" for k, n in sorted(s["distribution"].items(), key=lambda kv: -kv[1]))
    flag = " flagged" if s["flagged"] else ""
    hover = f"selected {s['selected']}; over the resamples: {dist}"
    return (f'<td class="stab{flag}" data-run="{_esc(rid)}" data-recurrence="{_esc(s["recurrence"])}" '
            f'data-flagged="{str(s["flagged"]).lower()}" title="{_esc(hover)}">'
            f"<b>{fmt(s['recurrence'])}</b> of B = {fmt(s['B'])}"
            + ("<div class='muted'>flagged: recurs in fewer than half</div>" if s["flagged"] else "")
            + f"<div class='muted'>selected {html.escape(str(s['selected'])[:80])}</div></td>")


def _stability(report: dict[str, Any]) -> list[str]:
    runs = report["runs"]
    rows = report["stability"]
    parts = ["<h2 id='stability'>Stability: how often each selection recurs over bootstrap resamples</h2>"]
    if not rows:
        return parts + ["<p id='no-stability' class='muted'>No run recorded the stability of its selections (its "
                        "findings have no <code>numbers.stability</code> for any primary claim).</p>"]
    parts.append("<p class='muted'>The share of B bootstrap resamples of the selecting pairs in which the run's "
                 "selection recurs; a selection that recurs in fewer than half of them is flagged.</p>"
                 "<table id='stability-table'><tr><th>hypothesis</th><th>claim</th><th>selection</th>"
                 + "".join(f"<th>{html.escape(r['id'])}</th>" for r in runs) + "</tr>")
    for row in rows:
        parts.append(f"<tr><td>{html.escape(row['hypothesis'])}</td><td>{html.escape(row['claim'].split('::')[-1])}"
                     f"</td><td>{html.escape(row['selection'])}</td>"
                     + "".join(stability_cell(r["id"], row) for r in runs) + "</tr>")
    parts.append("</table>")
    return parts


def _details(report: dict[str, Any]) -> list[str]:
    parts = ["<h2 id='runs'>Runs</h2><table id='runs-table'><tr><th>run</th><th>model</th><th>prompts</th>"
             "<th>dtype</th><th>status</th><th>wall time</th><th>peak RSS</th><th>summary</th><th>report</th></tr>"]
    for r in report["runs"]:
        s = r.get("summary") or {}
        summ = (f"{s.get('supported', 0)} supported, {s.get('not_supported', 0)} NOT supported, "
                f"{s.get('not_tested', 0)} not tested, {s.get('error', 0)} error") if s else html.escape(r["message"])
        wall = "—" if r["wall_s"] is None else f"{r['wall_s']:.0f} s"
        status = r["status"] + (" (reused: finished earlier with the same inputs and code)" if r["reused"] else "")
        parts.append(f"<tr><td>{html.escape(r['id'])}</td><td>{html.escape(r['model'])}</td>"
                     f"<td>{html.escape(r['prompts'])}</td><td>{html.escape(r.get('dtype') or 'auto')}</td>"
                     f"<td>{html.escape(status)}</td><td>{wall}</td><td>{fmt(r['peak_rss_gb'])} GB</td><td>{summ}</td>"
                     f"<td><a href='{_esc(r.get('report') or '')}'>suite report</a>"
                     + (f" · <a href='{_esc(r['log'])}'>log</a>" if r.get("log") else "") + "</td></tr>")
    parts.append("</table><h2 id='memory'>Memory</h2><table id='memory-table'><tr><th>model</th><th>device</th>"
                 "<th>weights</th><th>parameters</th><th>estimate</th><th>budget</th><th>fits</th></tr>")
    for m in report["memory"]:
        parts.append(f"<tr><td>{html.escape(m['model'])}</td><td>{m['device']}</td><td>"
                     f"{m['quantize'] if m['quantize'] != 'none' else m['dtype']}</td><td>{fmt(m['params_b'])} B</td>"
                     f"<td>{fmt(m['estimate_gb'])} GB ({html.escape(m['source'])})</td><td>{fmt(m['budget_gb'])} GB "
                     f"{html.escape(m['budget'])}</td><td>{fmt(m['fits'])}</td></tr>")
    parts.append("</table>")
    return parts


def render_html(report: dict[str, Any], figures: dict[str, Any]) -> str:
    """The page from what ``replication.json`` holds (``runs``, ``grid``, ``claims``, ``depth``, ``stability``,
    ``memory``) and the figures (one per primary claim id, ``__depth__``)."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Replication of the primary claims</title>"
             f"<style>{CSS}</style><script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head>"
             "<body><h1>Does it replicate? The claims across models, prompt sets and precisions</h1>"
             f"<p class='muted'>Generated {html.escape(report['created'])} by <code>"
             f"{html.escape(' '.join(report['command']))}</code> in {report['wall_s']:.0f} s. Each run is "
             "<code>pytest hypotheses/ -m primary</code> on one model, one prompt set and one dtype; verdicts are "
             "the suite's (Holm-corrected across the primaries of that run). An <b>error</b> cell is a run or claim "
             "that crashed, never a finding. Sections: <a href='#grid'>verdicts</a> · <a href='#forest'>forest "
             "plots</a> · <a href='#depth'>depth</a> · <a href='#stability'>stability</a> · <a href='#runs'>runs</a>"
             " · <a href='#memory'>memory</a>.</p>"]
    parts += _grid(report)
    parts.append("<h2 id='forest'>Forest plots: effect and 95% CI of each primary claim per run</h2>")
    for row in report["claims"]:
        parts.append(f"<div class='mech-forest' data-claim='{_esc(row['id'])}'>"
                     + figures[row["id"]].to_html(full_html=False, include_plotlyjs=False) + "</div>")
    parts += _depths(report, figures)
    parts += _stability(report)
    parts += _details(report)
    parts.append("</body></html>")
    return "\n".join(parts)
