"""mech.cache: content-addressed keys, compute-once entries (JSON and torch), --no-cache, atomic writes, and a
code version that follows the library's imports (locking and read-only caches: tests/test_bad_input.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mech.cache as cache
from mech.cache import DiskCache, atomic_write_text, code_files, code_version, make_key

MECH = Path(cache.__file__).resolve().parent


def _rel(files: list[Path]) -> set[str]:
    return {str(p.relative_to(MECH)) for p in files}


def test_keys_are_canonical_and_change_with_any_part():
    a = make_key(model="m", config={"x": 1, "y": [1, 2]}, path=Path("/p"))
    assert a == make_key(path="/p", config={"y": (1, 2), "x": 1}, model="m")  # order, tuples, paths
    assert a != make_key(model="m", config={"x": 2, "y": [1, 2]}, path=Path("/p"))
    assert len(a) == 64 and int(a, 16) >= 0


def test_get_or_compute_computes_once_per_key(tmp_path: Path):
    dc = DiskCache(tmp_path)
    calls = []

    def fn():
        calls.append(1)
        return {"score": 1.5, "ids": [1, 2]}

    first = dc.get_or_compute("ns", {"k": 1}, fn, modules=("stats",))
    again = dc.get_or_compute("ns", {"k": 1}, fn, modules=("stats",))
    assert first == again == {"score": 1.5, "ids": [1, 2]} and len(calls) == 1
    assert (dc.hits, dc.misses) == (1, 1)
    dc.get_or_compute("ns", {"k": 2}, fn, modules=("stats",))
    assert len(calls) == 2
    stored = list((tmp_path / "ns").glob("*.json"))
    assert len(stored) == 2 and not list((tmp_path / "ns").glob(".*"))  # no temporary file left behind


def test_computed_and_loaded_are_counted_by_namespace(tmp_path: Path):
    """The record the suite's plan reads: which namespaces an instance computed and which it read, including
    --no-cache (always computed), an unreadable entry (recomputed) and a read-only cache (computed, unstored)."""
    dc = DiskCache(tmp_path)
    dc.get_or_compute("a", {"k": 1}, lambda: 1, modules=("stats",))
    dc.get_or_compute("a", {"k": 2}, lambda: 2, modules=("stats",))
    dc.get_or_compute("b", {"k": 1}, lambda: 3, modules=("stats",))
    assert (dc.computed, dc.loaded) == ({"a": 2, "b": 1}, {})
    warm = DiskCache(tmp_path)
    for k in (1, 2):
        warm.get_or_compute("a", {"k": k}, lambda: pytest.fail("must be read"), modules=("stats",))
    assert (warm.computed, warm.loaded, warm.hits, warm.misses) == ({}, {"a": 2}, 2, 0)
    off = DiskCache(tmp_path, enabled=False)
    off.get_or_compute("a", {"k": 1}, lambda: 1, modules=("stats",))
    assert (off.computed, off.loaded) == ({"a": 1}, {})
    next((tmp_path / "b").glob("*.json")).write_text("{half")  # an entry a killed writer could not have left
    again = DiskCache(tmp_path)
    assert again.get_or_compute("b", {"k": 1}, lambda: 4, modules=("stats",)) == 4
    assert (again.computed, again.loaded) == ({"b": 1}, {})
    blocked = DiskCache(tmp_path / "file")
    (tmp_path / "file").write_text("")  # a file where the cache dir should be: nothing can be stored
    with pytest.warns(RuntimeWarning, match="not writable"):
        assert blocked.get_or_compute("c", {}, lambda: 5, modules=("stats",)) == 5
    assert (blocked.computed, blocked.loaded) == ({"c": 1}, {})


def test_torch_entries_and_disabled_cache(tmp_path: Path):
    dc = DiskCache(tmp_path)
    t = dc.get_or_compute("t", {}, lambda: {"x": torch.arange(3.0)}, fmt="torch", modules=("stats",))
    back = dc.get_or_compute("t", {}, lambda: pytest.fail("must be read"), fmt="torch", modules=("stats",))
    assert torch.equal(back["x"], t["x"])
    off = DiskCache(tmp_path, enabled=False)  # --no-cache: computes and overwrites
    assert off.get_or_compute("t", {}, lambda: {"x": torch.ones(1)}, fmt="torch", modules=("stats",))["x"].item() == 1
    assert torch.equal(dc.get_or_compute("t", {}, lambda: None, fmt="torch", modules=("stats",))["x"], torch.ones(1))


def test_json_entries_take_objects_with_to_dict_and_tensors(tmp_path: Path):
    class R:
        def to_dict(self):
            return {"a": 1}

    dc = DiskCache(tmp_path)
    got = dc.get_or_compute("j", {}, lambda: {"r": R(), "t": torch.tensor([1.0, 2.0]), "p": Path("/x")})
    assert got["r"].to_dict() == {"a": 1}  # the computed value is returned as is ...
    assert dc.get_or_compute("j", {}, lambda: None) == {"r": {"a": 1}, "t": [1.0, 2.0], "p": "/x"}  # ... stored as JSON


def test_atomic_write_text(tmp_path: Path):
    target = tmp_path / "sub" / "findings.json"
    atomic_write_text(target, json.dumps({"a": 1}))
    atomic_write_text(target, json.dumps({"a": 2}))
    assert json.loads(target.read_text()) == {"a": 2} and [p.name for p in target.parent.iterdir()] == ["findings.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_code_files_follow_imports_and_packages():
    models = _rel(code_files(("models",)))
    assert {"models.py", "registry.py", "chat.py"} <= models  # split modules still count for "models"
    patching = _rel(code_files(("patching",)))
    assert {"patching/__init__.py", "patching/reference.py", "patching/exact.py", "patching/attribution.py"} <= patching
    assert "engine.py" in patching  # the engine moved below patching: still a dependency
    assert {"hooks.py", "refusal.py"} <= patching and "distributed.py" not in patching
    assert "evaluation.py" in _rel(code_files(("directions",)))  # directions measures through mech.evaluation
    assert _rel(code_files(("stats",))) == {"stats.py"}
    assert _rel(code_files()) == _rel(list(MECH.rglob("*.py")))


def test_code_version_changes_with_a_dependency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    lib = tmp_path / "mech"
    (lib / "pkg").mkdir(parents=True)
    (lib / "a.py").write_text("from mech.b import x\n")
    (lib / "b.py").write_text("x = 1\n")
    (lib / "c.py").write_text("y = 1\n")
    (lib / "pkg" / "__init__.py").write_text("")
    (lib / "pkg" / "inner.py").write_text("def f():\n    from mech import c\n")
    monkeypatch.setattr(cache, "_MECH_DIR", lib)
    a, pkg = code_version(("a",)), code_version(("pkg",))
    (lib / "b.py").write_text("x = 2\n")
    assert code_version(("a",)) != a and code_version(("pkg",)) == pkg  # a imports b; pkg does not
    (lib / "c.py").write_text("y = 2\n")
    assert code_version(("pkg",)) != pkg  # a lazy import inside a function of a package file counts too
