"""Helpers shared by the library's tests (the suite's fixtures are registered by the root conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def _count_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.fixture
def hook_count() -> Callable[[torch.nn.Module], int]:
    """``hook_count(model)``: forward, forward-pre and backward hooks attached anywhere in ``model`` (a test
    asserts it is back where it was after a context manager that adds hooks)."""
    return _count_hooks
