"""The replication table as markdown (``<out>/replication.md``), to paste into the README: one column per run
(model x prompt set x dtype: the run ids tell the dtypes apart), one row per primary claim with its verdict,
effect [95% CI], n, p (a composite primary's one p: the max of its parts) and Holm p, then the depths (the
selected direction's layer, the probe layer, the top heads, each with layer / n_layers) and, where the runs
recorded it, the recurrence of every selection over bootstrap resamples."""

from __future__ import annotations

from typing import Any

from runner.replicate.page import fmt


def _md(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def primary_cell(c: dict[str, Any]) -> str:
    """verdict, effect [CI], n, p, Holm p of one primary in one run."""
    v = c.get("verdict", "error")
    out = f"**{v}**"
    if c.get("effect") is not None:
        ci = c.get("ci") or []
        out += f" {fmt(c['effect'])}" + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if len(ci) == 2 and ci[0] is not None
                                         else "")
    if c.get("n") is not None:
        out += f", n {fmt(c['n'])}"
    if c.get("p_value") is not None:
        out += f", p {fmt(c['p_value'])}"
    if c.get("p_adjusted") is not None:
        out += f", Holm p {fmt(c['p_adjusted'])}"
    return _md(out)


def _layer(layer: Any, dep: Any, n: Any) -> str:
    return "—" if layer is None else f"{layer} of {fmt(n)} ({fmt(dep)})"


def markdown_table(report: dict[str, Any]) -> str:
    """The table (module docstring) from what ``replication.json`` holds."""
    runs = report["runs"]
    ids = [r["id"] for r in runs]
    depth = {d["run"]: d for d in report["depth"]}

    def line(head: str, cells: list[str]) -> str:
        return "| " + " | ".join([head, *cells]) + " |"

    out = ["| primary claim | " + " | ".join(_md(i) for i in ids) + " |", "|---|" + "---|" * len(ids),
           line("model", [_md(r["model"]) for r in runs]),
           line("prompts", [_md(r["prompts"]) for r in runs]),
           line("dtype", [_md(r.get("dtype") or "auto") for r in runs]),
           line("wall time", ["—" if r.get("wall_s") is None else f"{r['wall_s']:.0f} s"
                              + (" (reused)" if r.get("reused") else "") for r in runs])]
    for row in report["claims"]:
        out.append(line(f"{_md(row['hypothesis'])}: {_md(row['id'].split('::')[-1])}",
                        [primary_cell(row["cells"][i]) for i in ids]))
    d = [depth.get(i, {}) for i in ids]
    out.append(line("H4: direction layer (depth)", [_layer(x.get("direction_layer"), x.get("direction_depth"),
                                                            x.get("n_layers")) for x in d]))
    out.append(line("H2: probe layer (depth)", [_layer(x.get("probe_layer"), x.get("probe_depth"), x.get("n_layers"))
                                                 for x in d]))
    out.append(line("H1: top heads (mean depth)", [
        _md(", ".join(map(str, x["top_heads"])) + f" ({fmt(x.get('mean_head_depth'))})") if x.get("top_heads")
        else "—" for x in d]))
    for row in report.get("stability") or []:
        cells = []
        for i in ids:
            s = row["cells"].get(i)
            cells.append("—" if s is None else f"{fmt(s['recurrence'])} of B = {fmt(s['B'])}"
                         + (" **flagged**" if s["flagged"] else ""))
        out.append(line(f"{_md(row['hypothesis'])} stability: {_md(row['selection'])}", cells))
    return "\n".join(out) + "\n"
