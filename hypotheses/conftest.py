"""Parametrize claims by the categories of the prompt set in use (``-k cybercrime``) and by the model's
layers (``-k layer12``)."""

from __future__ import annotations

import pytest

from fixtures.options import resolve_config
from mech.models import ModelError, n_layers_of
from mech.prompts import PromptFileError, default_pairs, load_prompts


def _categories(config: pytest.Config) -> list[str]:
    """The categories of --prompts and --eval-prompts (both checked here: a bad file is a usage error)."""
    from fixtures.model import load_eval_set

    cfg = resolve_config(config)
    try:
        ps = load_prompts(cfg.prompts) if cfg.prompts else default_pairs()
    except PromptFileError as e:
        raise pytest.UsageError(f"prompts: {e}") from None
    cats = set(ps.categories())
    if cfg.eval_prompts:
        try:
            cats |= set(load_eval_set(cfg.eval_prompts).categories())
        except PromptFileError as e:
            raise pytest.UsageError(f"--eval-prompts: {e}") from None
    return sorted(cats)


def _n_layers(config: pytest.Config) -> int:
    cfg = resolve_config(config)
    try:
        return n_layers_of(cfg.model, cfg.cache_dir)
    except ModelError as e:
        raise pytest.UsageError(f"model: {e}") from None


_CATS = pytest.StashKey[list]()
_LAYERS = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    """Check every option, ``--set`` item, --prompts and --model once, before collection and before the model
    loads: a bad one is a one-line usage error (exit 4) and nothing is written."""
    from fixtures.config import get_suite_config
    from fixtures.options import check_reports_dir
    from fixtures.report import reports_path

    resolve_config(config)
    get_suite_config(config)
    if not config.getoption("mech_plan", False):  # --plan writes nothing
        check_reports_dir(reports_path(config))
    config.stash[_CATS] = _categories(config)
    config.stash[_LAYERS] = _n_layers(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "category" in metafunc.fixturenames:
        cats = list(metafunc.config.stash[_CATS])
        metafunc.parametrize("category", cats, ids=cats)
    if "late_layer" in metafunc.fixturenames:
        n = metafunc.config.stash[_LAYERS]
        layers = list(range(n // 3, n))
        metafunc.parametrize("late_layer", layers, ids=[f"layer{L}" for L in layers])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Report order: baseline, H1, H2, H3, H4; each hypothesis's primary claim first."""
    from fixtures.report import HYPOTHESES

    order = list(HYPOTHESES)

    def key(ix: tuple[int, pytest.Item]) -> tuple:
        i, item = ix
        fam = next((k for k, m in enumerate(order) if item.get_closest_marker(m)), len(order))
        return (fam, item.get_closest_marker("primary") is None, i)

    items[:] = [it for _, it in sorted(enumerate(items), key=key)]
