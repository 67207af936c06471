"""The suite configuration: one frozen object, overridable with --set, in every cache key exactly where a
fixture reads it, and the fixtures' own code in the key too."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from fixtures import stages
from fixtures.config import SuiteConfig, suite_config

ROOT = Path(__file__).resolve().parents[1]


class _Cfg:
    def __init__(self, items):
        self.items = items

    def getoption(self, name, default=None):
        return self.items


def _run():
    return SimpleNamespace(max_new_tokens=64)


def test_defaults_are_frozen_and_overridable():
    cfg = suite_config(_Cfg(["n_random_primary=200", "gate_open=true", "split=0.6,0.2,0.2"]), _run())
    assert cfg.n_random_primary == 200 and cfg.gate_open is True and cfg.split == (0.6, 0.2, 0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.alpha = 0.1  # type: ignore[misc]
    assert SuiteConfig().n_random_primary >= 100 and SuiteConfig().n_random_directions >= 20


@pytest.mark.parametrize("item, msg", [
    ("n_random=5", "NAME one of the suite configuration's fields"),
    ("alpha", "expected NAME=VALUE"),
    ("alpha=2", "alpha must lie in (0, 1)"),
    ("n_random_primary=lots", "expected an integer, got 'lots'"),
    ("split=0.5,0.5,0.5", "three positive fractions summing to 1"),
    ("gate_open=maybe", "expected true or false"),
    ("gate_separation=false", "was replaced by gate_auroc_min"),
    ("exploratory_correction=bonferroni", "must be holm or bh"),
    ("gate_auroc_min=1.5", "gate_auroc_min must lie in [0, 1]"),
    ("n_bootstrap=0", "n_bootstrap must be at least 1"),
])
def test_bad_set_is_a_one_line_usage_error(item, msg):
    with pytest.raises(pytest.UsageError) as e:
        suite_config(_Cfg([item]), _run())
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_cache_key_holds_exactly_the_fields_a_fixture_reads():
    lm = SimpleNamespace(fingerprint="f", quantize="none", dtype="float32")
    ps = SimpleNamespace(content_hash=lambda: "h")
    toks = SimpleNamespace(ids=(1,))
    a = SuiteConfig()
    key = lambda cfg: stages.cache_key(lm, ps, toks, cfg, "h1_circuit", ("n_random_primary",))  # noqa: E731
    assert key(a) != key(dataclasses.replace(a, n_random_primary=101))  # read: recomputed
    assert key(a) != key(dataclasses.replace(a, split_seed=1))  # the splits shape every fixture
    assert key(a) == key(dataclasses.replace(a, kl_max=0.2))  # a threshold no fixture reads: reused
    # keyed by the splits: an --eval-prompts test split keys differently from the prompt set's own
    other = SimpleNamespace(content_hash=lambda: "e")
    split_key = lambda test: stages.cache_key(lm, {"train": ps, "val": ps, "test": test}, toks, a,  # noqa: E731
                                              "h1_circuit", ("n_random_primary",))
    assert split_key(ps) != split_key(other) and split_key(ps) == split_key(ps)


def test_fixture_code_is_in_the_key(tmp_path, monkeypatch):
    for name in ("common", "h1_circuit"):
        (tmp_path / f"{name}.py").write_text((ROOT / "fixtures" / f"{name}.py").read_text())
    monkeypatch.setattr(stages, "_HERE", tmp_path)
    before = stages.fixture_code("h1_circuit")
    (tmp_path / "h1_circuit.py").write_text((tmp_path / "h1_circuit.py").read_text() + "\n# edited\n")
    assert stages.fixture_code("h1_circuit") != before
