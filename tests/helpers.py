"""Plain helpers the tests import (fixtures live in ``tests/conftest.py``)."""

from __future__ import annotations

import csv
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
