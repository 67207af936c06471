"""Where each run located refusal, as depth = layer / n_layers, so models of different depths compare (see
:mod:`runner.replicate`, step 5)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.replicate.memory import language_config, model_config
from runner.replicate.run import RunResult


def primary_claim(r: RunResult, hypothesis: str) -> dict[str, Any] | None:
    """The primary claim of ``hypothesis`` in one run's findings, or None."""
    return next((c for c in r.findings.get("claims", []) if c.get("primary") and c.get("hypothesis") == hypothesis),
                None)


def _norm(layer: int | None, n: int | None) -> float | None:
    return None if layer is None or not n else layer / n


def depth(results: Sequence[RunResult], cache_dir: Path) -> list[dict[str, Any]]:
    """Per run: where the claims located refusal, as layer index / n_layers (0 = the first layer, (n-1)/n the
    last): the selected direction's layer (H4), the early probe layer (H2), the top-k heads (H1). Each is None
    when that claim did not get that far (e.g. ``not tested``). n_layers comes from the run's findings.json
    (``model.n_layers``), or from the model's config for a run that recorded none."""
    out = []
    for r in results:
        n = (r.findings.get("model") or {}).get("n_layers")  # the run's own record; else the model's config
        if n is None:
            cfg, _ = model_config(r.spec.model, cache_dir)
            n = int(language_config(cfg)["num_hidden_layers"]) if cfg else None
        h4, h2, h1 = (primary_claim(r, h) for h in ("H4", "H2", "H1"))
        d_layer = (h4 or {}).get("numbers", {}).get("layer")
        p_layer = (h2 or {}).get("numbers", {}).get("layer")
        heads = (h1 or {}).get("numbers", {}).get("heads") or []
        head_layers = [int(m.group(1)) for h in heads if (m := re.match(r"L(\d+)\.H\d+", str(h)))]
        out.append({"run": r.spec.id, "model": r.spec.model, "n_layers": n,
                    "direction_layer": d_layer, "direction_depth": _norm(d_layer, n),
                    "direction_verdict": (h4 or {}).get("verdict"),
                    "probe_layer": p_layer, "probe_depth": _norm(p_layer, n),
                    "top_heads": list(heads), "top_head_depths": [_norm(L, n) for L in head_layers],
                    "mean_head_depth": (sum(head_layers) / len(head_layers) / n) if head_layers and n else None})
    return out
