"""Root pytest configuration: the suite's options, markers and plugins.

Options (each also read from an env var, the option winning): ``--model`` (MECH_MODEL), ``--device``
(MECH_DEVICE), ``--dtype`` (MECH_DTYPE), ``--quantize`` (MECH_QUANTIZE), ``--prompts`` (MECH_PROMPTS),
``--cache-dir`` (MECH_CACHE_DIR), ``--no-cache`` (MECH_NO_CACHE=1), ``--max-new-tokens``
(MECH_MAX_NEW_TOKENS).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.families import FAMILIES

pytest_plugins = [
    "fixtures.options", "fixtures.config", "fixtures.model", "fixtures.tiny_models", "fixtures.report",
    "fixtures.grading", "fixtures.common", "fixtures.references", "fixtures.h1_circuit", "fixtures.h2_hierarchy",
    "fixtures.h3_substrate", "fixtures.h4_direction", "fixtures.stability", "fixtures.plan", "pytester",
]

ROOT = Path(__file__).resolve().parent

MARKERS = {
    "slow": "takes more than a few seconds on 2 CPU cores",
    "gpu": "needs a CUDA device (skipped without one)",
    "realmodel": "runs the real embedded default model (Qwen2.5-Coder-0.5B-Instruct)",
    **{f.marker: f.doc for f in FAMILIES},  # the hypothesis families, declared once in fixtures/families.py
    "primary": "the pre-specified primary claim of its hypothesis (Holm-corrected across hypotheses)",
}


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
    # `pytest hypotheses/` writes the self-contained HTML report unless --html says otherwise.
    args = [str(a) for a in config.args]
    if config.getoption("mech_plan", False):  # --plan runs nothing: no report
        return
    if any(Path(a.split("::")[0]).resolve().is_relative_to(ROOT / "hypotheses") for a in args if a):
        if hasattr(config.option, "htmlpath") and not config.option.htmlpath:
            # pytest-html's test log, written under a temporary name, then moved to pytest-log.html (a complete
            # run) or pytest-log.partial.html (anything less) by fixtures/report.py, which writes the report
            # itself (hypotheses.html / hypotheses.partial.html, fixtures/report_html.py), so a partial run never
            # overwrites the last complete report
            config.option.htmlpath = str(Path(os.environ.get("MECH_REPORTS_DIR", ROOT / "reports")) / ".hypotheses.inprogress.html")
            config.option.self_contained_html = True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
