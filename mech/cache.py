"""Content-addressed disk cache of expensive results (sweeps, generations, baselines).

A result is keyed by everything it depends on — the model's fingerprint, the data hash, the config and
the library's code version — so a change to any of them computes afresh and nothing stale is reused.
Writes are atomic (temp file + ``os.replace``): a killed run leaves either the whole entry or nothing,
so a re-run resumes from the entries already finished. Reading a finished entry takes no lock (an entry is
only ever replaced whole), so a warm cache works read-only (a shared or ``chmod -w`` directory). A per-key
file lock around computing and writing lets pytest-xdist workers share one computation instead of repeating
it. When the cache cannot be written (read-only), a missing entry is computed and returned, not stored, with
a warning.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock

T = TypeVar("T")
_MECH_DIR = Path(__file__).resolve().parent


def _module_files(name: str) -> list[Path]:
    """The source files of ``mech.<name>``: one file, or every file of a package (``patching``)."""
    path = _MECH_DIR.joinpath(*name.split("."))
    if path.is_dir():
        return sorted(path.rglob("*.py"))
    return [path.with_suffix(".py")] if path.with_suffix(".py").exists() else []


def _imported_modules(path: Path) -> set[str]:
    """The ``mech`` modules a source file imports, at the top or inside a function (``mech.x.y`` -> ``x.y``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mech":
                names.update(a.name for a in node.names)
            elif node.module.startswith("mech."):
                names.add(node.module[len("mech."):])
        elif isinstance(node, ast.Import):
            names.update(a.name[len("mech."):] for a in node.names if a.name.startswith("mech."))
    return names


def code_files(modules: tuple[str, ...] | None = None) -> list[Path]:
    """The library files a result computed by ``modules`` depends on: those modules (a package counts with
    all its files) and every ``mech`` module they import, transitively; all of mech/ for ``None``."""
    if modules is None:
        return sorted(_MECH_DIR.rglob("*.py"))
    seen: set[Path] = set()
    todo = [f for m in modules for f in _module_files(m)]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for dep in _imported_modules(f):
            todo += _module_files(dep) or _module_files(dep.rsplit(".", 1)[0])
    return sorted(seen)


def code_version(modules: tuple[str, ...] | None = None) -> str:
    """sha256 (16 hex) of the library's source files (all of mech/, or what ``modules`` such as
    ``("refusal", "models")`` depend on: see :func:`code_files`): a change to the code a result depends on
    invalidates it, also after a module is split (``models`` imports ``registry`` and ``chat``)."""
    h = hashlib.sha256()
    for p in code_files(modules):
        h.update(str(p.relative_to(_MECH_DIR)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def make_key(**parts: Any) -> str:
    """A stable sha256 over the canonical JSON of ``parts`` (dict order does not matter)."""
    blob = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class DiskCache:
    """``get_or_compute(namespace, parts, fn)``: compute once per key, atomically stored under ``root``.

    ``enabled=False`` (``--no-cache``) always computes and overwrites the stored entry.
    ``fmt="json"`` for plain data, ``"torch"`` for tensors or dicts of tensors.

    ``computed`` and ``loaded`` count this instance's entries by namespace: computed by ``fn`` (a miss, also when
    not stored) or read from disk (a hit). A caller compares them before and after a piece of work to tell
    whether it ran or came from the cache (the suite's plan does, per stage).
    """

    def __init__(self, root: str | Path, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled
        self.computed: Counter[str] = Counter()
        self.loaded: Counter[str] = Counter()
        self.unstored: Counter[str] = Counter()  # computed but not stored (read-only or full cache dir)
        self.unstored_reason: str = ""

    @property
    def hits(self) -> int:
        return sum(self.loaded.values())

    @property
    def misses(self) -> int:
        return sum(self.computed.values())

    def path(self, namespace: str, key: str, fmt: str = "json") -> Path:
        return self.root / namespace / f"{key[:32]}.{'json' if fmt == 'json' else 'pt'}"

    def load(self, path: Path, fmt: str) -> Any:
        if fmt == "json":
            return json.loads(path.read_text())
        return torch.load(path, map_location="cpu", weights_only=True)

    def store(self, path: Path, value: Any, fmt: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                if fmt == "json":
                    fh.write(json.dumps(value, indent=1, sort_keys=True, default=_json_default).encode())
                else:
                    torch.save(value, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get_or_compute(
        self,
        namespace: str,
        parts: dict[str, Any],
        fn: Callable[[], T],
        fmt: str = "json",
        modules: tuple[str, ...] | None = None,
    ) -> T:
        """The stored value for (namespace, parts, code version of ``modules`` — default all of mech/), or
        ``fn()`` computed, stored atomically and returned. A finished entry is read without any lock (nothing
        is created on disk); concurrent callers computing one key wait on a file lock."""
        key = make_key(namespace=namespace, code=code_version(modules), **parts)
        path = self.path(namespace, key, fmt)
        if self.enabled:
            found, value = self._try_load(namespace, path, fmt)
            if found:
                return value
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(path) + ".lock")
            lock.acquire()
        except OSError as e:  # read-only cache: compute, do not store
            return self._compute_unstored(namespace, path, fn, e)
        try:
            if self.enabled:  # another process may have finished it while we waited for the lock
                found, value = self._try_load(namespace, path, fmt, unlink_bad=True)
                if found:
                    return value
            self.computed[namespace] += 1
            value = fn()
            try:
                self.store(path, value, fmt)
            except OSError as e:  # a full disk: the result is not lost, only not kept
                self._warn_unstored(namespace, path, e)
            return value
        finally:
            lock.release()

    def _try_load(self, namespace: str, path: Path, fmt: str, unlink_bad: bool = False) -> tuple[bool, Any]:
        if not path.exists():
            return False, None
        try:
            value = self.load(path, fmt)
        except Exception as e:  # truncated JSON, a garbled torch pickle (UnpicklingError, EOFError, ...)
            if unlink_bad:  # unreadable entry (only under the lock): recompute it
                try:
                    path.unlink(missing_ok=True)
                    what = "deleted it and recomputing"
                except OSError:
                    what = f"could not delete it: delete {path} by hand"
                warnings.warn(f"cache entry {path} is corrupt ({type(e).__name__}); {what}", RuntimeWarning,
                              stacklevel=3)
            return False, None
        self.loaded[namespace] += 1
        return True, value

    def _warn_unstored(self, namespace: str, path: Path, err: OSError) -> None:
        self.unstored[namespace] += 1
        self.unstored_reason = (f"cache dir {self.root} could not be written ({err.strerror or type(err).__name__}) "
                                f"for {sum(self.unstored.values())} entr{'y' if sum(self.unstored.values()) == 1 else 'ies'}")
        warnings.warn(
            f"cache dir {self.root} is not writable ({err.strerror or type(err).__name__}): computing "
            f"{path.parent.name}/{path.name} without storing it; make the directory writable, free space or pass "
            "another --cache-dir to keep results",
            RuntimeWarning,
            stacklevel=4,
        )

    def _compute_unstored(self, namespace: str, path: Path, fn: Callable[[], T], err: OSError) -> T:
        self._warn_unstored(namespace, path, err)
        self.computed[namespace] += 1
        return fn()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + rename, mode 0644): readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} as JSON; give it a to_dict() or use fmt='torch'")
