"""Parametrize claims by the categories of the prompt set in use (``-k cybercrime``) and by the model's
layers (``-k layer12``)."""

from __future__ import annotations

import pytest

from fixtures.options import resolve_config
from mech.models import ModelError, n_layers_of
from mech.prompts import PromptFileError, default_pairs, load_prompts


def _categories(config: pytest.Config) -> list[str]:
    cfg = resolve_config(config)
    try:
        ps = load_prompts(cfg.prompts) if cfg.prompts else default_pairs()
    except PromptFileError as e:
        raise pytest.UsageError(f"prompts: {e}") from None
    return ps.categories()


def _n_layers(config: pytest.Config) -> int:
    cfg = resolve_config(config)
    try:
        return n_layers_of(cfg.model, cfg.cache_dir)
    except ModelError as e:
        raise pytest.UsageError(f"model: {e}") from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "category" in metafunc.fixturenames:
        cats = _categories(metafunc.config)
        if metafunc.module.__name__.endswith("test_baseline"):  # baseline claims also pool all categories
            cats = ["all", *cats]
        metafunc.parametrize("category", cats, ids=cats)
    if "late_layer" in metafunc.fixturenames:
        n = _n_layers(metafunc.config)
        layers = list(range(n // 3, n))
        metafunc.parametrize("late_layer", layers, ids=[f"layer{L}" for L in layers])
