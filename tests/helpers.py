"""Plain helpers the tests import (fixtures live in ``tests/conftest.py``)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from mech.prompts import default_pairs


def small_prompt_file(path: Path, harmless: bool = True, per_category: int = 8) -> Path:
    """A CSV of the project's cybercrime and fraud pairs (``per_category`` each): both members of each pair, or
    the harmful member only (a harmful-only benchmark) when ``harmless`` is false."""
    rows = []
    for cat in ("cybercrime", "fraud"):
        for h, s in default_pairs().by_category(cat).pairs()[:per_category]:
            rows += [h, s] if harmless else [h]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "prompt", "label", "category", "pair_id"])
        for p in rows:
            w.writerow([p.id, p.prompt, p.label, p.category, p.pair_id])
    return path


README = Path(__file__).resolve().parents[1] / "hypotheses" / "README.md"


def readme_blocks(section: str) -> list[str]:
    """The ```python blocks of one ``## section`` of hypotheses/README.md (the heading's start), dedented out of
    their list item: what the tests that build a page run."""
    text = README.read_text()
    m = re.search(rf"^## {re.escape(section)}.*?$(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    if m is None:
        raise ValueError(f"hypotheses/README.md has no section '## {section}'")
    blocks = re.findall(r"```python\n(.*?)```", m.group(1), flags=re.S)
    return [re.sub(r"^   ", "", b, flags=re.M) for b in blocks]  # the blocks are indented inside a list
