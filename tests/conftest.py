"""Helpers shared by the library's tests (the suite's fixtures are registered by the root conftest.py)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

# The suite's --judge defaults to `auto` (the default judge model decides whenever it is installed). The library's
# tests run the suite on tiny models, where loading the 1.5B judge would only add minutes: no judge unless a test
# asks for one (the subprocess runs of pytester inherit this).
os.environ.setdefault("MECH_JUDGE", "none")
# `--dtype auto` is bfloat16 on a CPU with bfloat16 matrix units; the tests' numeric tolerances are for the exact
# float32 reference, so the suite runs of the tests (and the session model) use float32 unless a test asks.
os.environ.setdefault("MECH_DTYPE", "float32")


def _count_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.fixture
def hook_count() -> Callable[[torch.nn.Module], int]:
    """``hook_count(model)``: forward, forward-pre and backward hooks attached anywhere in ``model`` (a test
    asserts it is back where it was after a context manager that adds hooks)."""
    return _count_hooks


@contextmanager
def _open_offline(uri: str, ready: str) -> Iterator[tuple[Any, list[str]]]:
    browser = next((p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None)
    assert browser, "Chromium is missing: `make setup` installs Debian's chromium package"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = b.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(uri)
            page.wait_for_function(ready, timeout=30_000)
            yield page, requests
        finally:
            b.close()


@pytest.fixture
def browser_page() -> Callable[[str, str], Any]:
    """``with browser_page(uri, ready_js) as (page, requests):`` opens ``uri`` in Debian's headless Chromium
    (Playwright), waits until the JavaScript expression ``ready_js`` is true and records every request the page
    makes (a self-contained report makes none over http)."""
    return _open_offline
