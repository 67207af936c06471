"""Prompt sets: load, validate, subset, pair and split contrastive harmful/harmless prompts.

A prompt file is either

* JSON: ``{"schema": "mech.prompts/v1", "name": ..., "description": ..., "prompts": [row, ...]}``
  or a bare list of rows, where a row is an object with the keys ``prompt``, ``label``
  (``harmful`` | ``harmless``), ``category`` and optionally ``pair_id`` and ``id``; or
* CSV with a header naming the columns ``prompt,label,category[,pair_id][,id]`` (any order; extra
  columns are ignored).

A ``category`` is a lowercase identifier (``[a-z][a-z0-9_]*``, so ``pytest -k <category>`` selects it;
``all`` is reserved for the pooled test). Rows without an ``id`` get ``row-<n>`` (``n`` the 1-based data row). A ``pair_id`` joins exactly one
harmful and one harmless row (a matched contrastive pair); a pair_id with a single row is allowed
and simply not returned by :meth:`PromptSet.pairs`.

Every validation problem raises :class:`PromptFileError` whose message is one line:
``"<path>: row <n>: <what is wrong>; <how to fix>"`` (``row <n>`` is omitted for problems of the
file as a whole). The loader never writes to disk.

The shipped sets live in :data:`DATA_DIR` (``<repo>/data``, or the directory named by the
environment variable ``MECH_DATA_DIR``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CATEGORY_PATTERN",
    "DATA_DIR",
    "LABELS",
    "MARKERS_SCHEMA",
    "PROMPTS_SCHEMA",
    "Prompt",
    "PromptFileError",
    "PromptSet",
    "PromptSetCapabilities",
    "benign_alarming",
    "data_dir",
    "default_pairs",
    "file_error",
    "load_prompts",
    "read_data_file",
    "refusal_markers",
    "snippet",
]

PROMPTS_SCHEMA = "mech.prompts/v1"
MARKERS_SCHEMA = "mech.markers/v1"
LABELS: tuple[str, ...] = ("harmful", "harmless")
_REQUIRED = ("prompt", "label", "category")
_OPTIONAL = ("pair_id", "id")
CATEGORY_PATTERN = r"[a-z][a-z0-9_]*"
"""Category names are lowercase identifiers, so that ``pytest -k <category>`` selects exactly them."""
_RESERVED_CATEGORIES = ("all",)  # "all" is the id of the pooled (every-category) test


def _default_data_dir() -> Path:
    env = os.environ.get("MECH_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "data"


DATA_DIR: Path = _default_data_dir()
"""Directory of the shipped data files: ``<repo>/data``, or ``$MECH_DATA_DIR`` when set."""


def data_dir() -> Path:
    """The data directory now: ``$MECH_DATA_DIR`` if set at call time, else :data:`DATA_DIR`."""
    env = os.environ.get("MECH_DATA_DIR")
    return Path(env).expanduser() if env else DATA_DIR


# --------------------------------------------------------------------------------------------- errors


class PromptFileError(ValueError):
    """A prompt (or marker) file is missing or malformed.

    ``str(err)`` is a single line ``"<path>: row <n>: <what is wrong>; <how to fix>"``.
    The attributes ``path`` and ``row`` (``None`` for whole-file problems) are set when raised by
    this module.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, row: int | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.row = row


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def normalize_prompt(text: str) -> str:
    """A prompt's text for comparing prompts (leakage between splits and sets): Unicode NFKC, invisible format
    characters (zero-width space, BOM, ...) removed, case folded, whitespace collapsed. Empty for a prompt
    that shows nothing."""
    import unicodedata

    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return " ".join(text.casefold().split())


def snippet(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters, for one-line error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def file_error(
    path: str | Path, what: str, fix: str, row: int | None = None, where: str | None = None
) -> PromptFileError:
    """Build a one-line :class:`PromptFileError` for ``path`` (and ``row`` when given)."""
    location = f"row {row}: " if row is not None else (f"{where}: " if where else "")
    message = _one_line(f"{path}: {location}{what}; {fix}")
    return PromptFileError(message, path=path, row=row)


# --------------------------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class Prompt:
    """One prompt row.

    Attributes:
        id: unique, stable id within its set (e.g. ``"cybercrime-003-harmful"``).
        prompt: the user message text.
        label: ``"harmful"`` or ``"harmless"``.
        category: topic of the request (e.g. ``"cybercrime"``); used in test ids and ``-k`` selection.
        pair_id: id shared by the two members of a matched harmful/harmless pair, else ``None``.
    """

    id: str
    prompt: str
    label: str
    category: str
    pair_id: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        """The row as a plain dict with the keys ``id, prompt, label, category, pair_id``."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "label": self.label,
            "category": self.category,
            "pair_id": self.pair_id,
        }


@dataclass(frozen=True)
class PromptSetCapabilities:
    """What a prompt set can support, as counts (see :meth:`PromptSet.capabilities`).

    Attributes:
        n_prompts / n_harmful / n_harmless: rows in all / labelled harmful / labelled harmless.
        n_pairs: matched (harmful, harmless) pairs (:meth:`PromptSet.pairs`).
        harmful_by_category: harmful rows per category (categories with none are absent).
        pairs_by_category: matched pairs per category (a pair's category is its harmful member's).
    """

    n_prompts: int
    n_harmful: int
    n_harmless: int
    n_pairs: int
    harmful_by_category: dict[str, int] = field(default_factory=dict)
    pairs_by_category: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the counts."""
        return {
            "n_prompts": self.n_prompts,
            "n_harmful": self.n_harmful,
            "n_harmless": self.n_harmless,
            "n_pairs": self.n_pairs,
            "harmful_by_category": dict(self.harmful_by_category),
            "pairs_by_category": dict(self.pairs_by_category),
        }


def _rank(seed: int, key: str) -> str:
    """A deterministic pseudo-random sort key (stable across Python versions and processes)."""
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items into ``len(fractions)`` counts by the largest-remainder method.

    The first part gets at least one item whenever ``n >= 1`` and ``fractions[0] > 0``.
    """
    exact = [n * f for f in fractions]
    counts = [math.floor(x + 1e-9) for x in exact]
    order = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if n >= 1 and fractions[0] > 0 and counts[0] == 0:
        donor = max(range(1, len(counts)), key=lambda i: (counts[i], -i))
        counts[donor] -= 1
        counts[0] += 1
    return counts


@dataclass(frozen=True)
class PromptSet:
    """An immutable, ordered collection of :class:`Prompt` rows.

    Attributes:
        name: a short name (the file's ``name`` or stem; subsets append a ``[...]`` suffix).
        prompts: the rows, in file order.
        source: where the rows came from (a file path, or a description for subsets).
    """

    name: str
    prompts: tuple[Prompt, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.prompts, tuple):
            object.__setattr__(self, "prompts", tuple(self.prompts))

    # -- container protocol

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    # -- subsets

    def _subset(self, suffix: str, prompts: Sequence[Prompt]) -> PromptSet:
        return PromptSet(name=f"{self.name}[{suffix}]", prompts=tuple(prompts), source=self.source)

    def harmful(self) -> PromptSet:
        """The rows labelled ``harmful``, in order."""
        return self._subset("harmful", [p for p in self.prompts if p.label == "harmful"])

    def harmless(self) -> PromptSet:
        """The rows labelled ``harmless``, in order."""
        return self._subset("harmless", [p for p in self.prompts if p.label == "harmless"])

    def categories(self) -> list[str]:
        """Sorted unique category names."""
        return sorted({p.category for p in self.prompts})

    def by_category(self, category: str) -> PromptSet:
        """The rows of one category, in order.

        Raises:
            ValueError: (one line) if no row has that category; the message lists the known ones.
        """
        rows = [p for p in self.prompts if p.category == category]
        if not rows:
            known = ", ".join(self.categories()) or "(none)"
            raise ValueError(
                f"unknown category {category!r} in prompt set {self.name!r}; known categories: {known}"
            )
        return self._subset(f"category={category}", rows)

    def pairs(self) -> list[tuple[Prompt, Prompt]]:
        """Matched ``(harmful, harmless)`` pairs joined by ``pair_id``, sorted by ``pair_id``.

        Rows without a pair_id and pair_ids with only one member are left out.
        """
        groups: dict[str, dict[str, Prompt]] = {}
        for p in self.prompts:
            if p.pair_id is not None:
                groups.setdefault(p.pair_id, {})[p.label] = p
        return [
            (members["harmful"], members["harmless"])
            for pid, members in sorted(groups.items())
            if "harmful" in members and "harmless" in members
        ]

    def capabilities(self) -> PromptSetCapabilities:
        """Counts that say which analyses this set can support: harmful and harmless rows, matched pairs,
        harmful rows and pairs per category (sorted by category). E.g. a claim that patches pairs cannot
        run with ``n_pairs == 0``; a per-category claim needs enough ``pairs_by_category[c]``."""
        harmful: dict[str, int] = {}
        for p in self.prompts:
            if p.label == "harmful":
                harmful[p.category] = harmful.get(p.category, 0) + 1
        pairs: dict[str, int] = {}
        pair_list = self.pairs()
        for h, _ in pair_list:
            pairs[h.category] = pairs.get(h.category, 0) + 1
        n_harmful = sum(harmful.values())
        return PromptSetCapabilities(
            n_prompts=len(self.prompts),
            n_harmful=n_harmful,
            n_harmless=len(self.prompts) - n_harmful,
            n_pairs=len(pair_list),
            harmful_by_category=dict(sorted(harmful.items())),
            pairs_by_category=dict(sorted(pairs.items())),
        )

    def texts(self) -> list[str]:
        """The prompt strings, in order."""
        return [p.prompt for p in self.prompts]

    def content_hash(self) -> str:
        """SHA-256 hex digest of the canonical JSON of the rows (order, ids, text, labels, categories, pairs).

        Independent of ``name`` and ``source``: the same rows loaded from JSON or CSV hash the same.
        """
        payload = json.dumps(
            [p.to_dict() for p in self.prompts], sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def swap_pair_labels(self, seed: int) -> tuple[PromptSet, list[str]]:
        """The set with the labels of each matched pair swapped by a fair coin (seeded): a label-shuffle null.

        Each pair's coin is a seeded hash of its ``pair_id`` alone (stable across processes and independent of
        which split the pair is in), so a pair's harmful and harmless members trade labels with probability 1/2
        and every other field (id, text, category, pair_id, row order) is kept. Rows outside a complete pair have
        nothing to trade with and keep their label. Returns the new set and the sorted pair ids that were swapped.
        """
        swapped = sorted(s.pair_id for h, s in self.pairs()
                         if s.pair_id is not None and int(_rank(seed, f"swap-labels:{s.pair_id}"), 16) % 2)
        flip = {"harmful": "harmless", "harmless": "harmful"}
        todo = set(swapped)
        rows = [dataclasses.replace(p, label=flip[p.label]) if p.pair_id in todo else p for p in self.prompts]
        return self._subset(f"labels swapped seed={seed}", rows), swapped
    def duplicate_texts(self) -> list[list[str]]:
        """Ids of the rows that share a prompt text (:func:`normalize_prompt`), one list per repeated text."""
        groups: dict[str, list[str]] = {}
        for p in self.prompts:
            groups.setdefault(normalize_prompt(p.prompt), []).append(p.id)
        return [g for g in groups.values() if len(g) > 1]

    def same_texts(self, other: PromptSet) -> list[tuple[Prompt, Prompt]]:
        """(row of ``other``, row of this set) for every row of ``other`` whose text (:func:`normalize_prompt`) is
        also in this set: what an evaluation set must not share with the prompts that select."""
        mine = {normalize_prompt(p.prompt): p for p in self.prompts}
        return [(q, mine[t]) for q in other.prompts if (t := normalize_prompt(q.prompt)) in mine]

    def _unit_key(self, p: Prompt) -> str:
        """The split unit of a row: its pair (or itself), merged with every unit that repeats one of its texts,
        so a duplicated prompt text never lands in two splits (a unit's key is the least of its merged keys)."""
        cache = self.__dict__.get("_units")
        if cache is None:
            parent: dict[str, str] = {}

            def find(k: str) -> str:
                while parent.setdefault(k, k) != k:
                    k = parent[k]
                return k

            first: dict[str, str] = {}
            for q in self.prompts:
                key = f"pair:{q.pair_id}" if q.pair_id is not None else f"id:{q.id}"
                find(key)
                t = normalize_prompt(q.prompt)
                if t in first:
                    a, b = find(first[t]), find(key)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
                else:
                    first[t] = key
            cache = {k: find(k) for k in list(parent)}
            object.__setattr__(self, "_units", cache)
        return cache[f"pair:{p.pair_id}" if p.pair_id is not None else f"id:{p.id}"]

    def split(self, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> tuple[PromptSet, ...]:
        """Split into ``len(fractions)`` disjoint sets, by pair and stratified by category.

        Both members of a pair always land in the same part; a row without a pair_id is its own
        unit; units that repeat a prompt text (:meth:`duplicate_texts`) are one unit, so the same text is never
        selected on in one part and judged in another. Units are grouped by category (a pair's category is that of its harmful member), and
        each category's units are ordered by a seeded hash of their key and cut by the
        largest-remainder method, so every category with at least one unit appears in the first
        part (when ``fractions[0] > 0``). The result depends only on the rows and ``seed``; each
        part keeps the original row order.

        Raises:
            ValueError: if ``fractions`` is empty, has a negative entry, or does not sum to 1.
        """
        fracs = [float(f) for f in fractions]
        if not fracs or any(f < 0 or math.isnan(f) for f in fracs) or abs(sum(fracs) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be non-negative and sum to 1, got {tuple(fractions)!r}")
        units: dict[str, list[Prompt]] = {}
        for p in self.prompts:
            units.setdefault(self._unit_key(p), []).append(p)
        by_cat: dict[str, list[str]] = {}
        for key, members in units.items():
            lead = next((m for m in members if m.label == "harmful"), members[0])
            by_cat.setdefault(lead.category, []).append(key)
        part_of: dict[str, int] = {}
        for category in sorted(by_cat):
            keys = sorted(by_cat[category], key=lambda k: (_rank(seed, k), k))
            start = 0
            for part, count in enumerate(_allocate(len(keys), fracs)):
                for key in keys[start : start + count]:
                    part_of[key] = part
                start += count
        parts: list[list[Prompt]] = [[] for _ in fracs]
        for p in self.prompts:
            parts[part_of[self._unit_key(p)]].append(p)
        k = len(fracs)
        return tuple(self._subset(f"split {i + 1}/{k} seed={seed}", rows) for i, rows in enumerate(parts))


# --------------------------------------------------------------------------------------------- loading


def read_data_file(path: Path) -> str:
    """The text of a data file (BOM stripped); a missing or unreadable file is a one-line :class:`PromptFileError`."""
    if not path.exists():
        raise file_error(path, "file not found", "pass the path of an existing .json or .csv prompt file")
    if not path.is_file():
        raise file_error(path, "not a regular file", "pass the path of a .json or .csv prompt file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise file_error(
            path, f"not valid UTF-8 text (byte offset {exc.start})", "save the file as UTF-8"
        ) from exc
    except OSError as exc:
        raise file_error(
            path, f"cannot read the file ({exc.strerror or exc})", "check the path and permissions"
        ) from exc


def _parse_json(path: Path, text: str, empty_fix: str) -> Any:
    """The JSON value of a data file's text; an empty file or a syntax error is one line naming the place."""
    if not text.strip():
        raise file_error(path, "empty file", empty_fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise file_error(
            path,
            f"not valid JSON: {exc.msg}",
            "fix the JSON syntax there",
            where=f"line {exc.lineno} column {exc.colno}",
        ) from exc


def _json_rows(path: Path, text: str) -> tuple[str | None, list[Any]]:
    """Parse a JSON prompt file; return (name from the file or None, raw rows)."""
    data = _parse_json(path, text, f'write a JSON object {{"schema": "{PROMPTS_SCHEMA}", "prompts": [...]}}')
    if isinstance(data, list):
        return None, data
    if not isinstance(data, dict):
        raise file_error(
            path,
            f"top-level JSON value is a {type(data).__name__}",
            f'use an object {{"schema": "{PROMPTS_SCHEMA}", "prompts": [...]}} or a list of rows',
        )
    schema = data.get("schema")
    if schema != PROMPTS_SCHEMA:
        what = "missing key 'schema'" if "schema" not in data else f"wrong schema {snippet(schema)}"
        raise file_error(path, what, f'set "schema": "{PROMPTS_SCHEMA}"')
    if "prompts" not in data:
        raise file_error(path, "missing key 'prompts'", 'add a "prompts" list of rows')
    rows = data["prompts"]
    if not isinstance(rows, list):
        raise file_error(
            path, f"'prompts' is a {type(rows).__name__}, not a list", 'make "prompts" a list of row objects'
        )
    name = data.get("name")
    return (name if isinstance(name, str) and name.strip() else None), rows


def _csv_rows(path: Path, text: str) -> list[dict[str, Any]]:
    """Parse a CSV prompt file into dicts keyed by the lowercased header names."""
    if not text.strip():
        raise file_error(
            path, "empty file", "write a header line 'prompt,label,category,pair_id' and one row per prompt"
        )
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise file_error(
            path, f"not valid CSV: {exc}", "fix the quoting there", where=f"line {reader.line_num}"
        ) from exc
    columns = [h.strip().lower() for h in header]
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        fix = "the header must name prompt,label,category and optionally pair_id,id"
        other = [(d, name) for d, name in ((";", "semicolons (;)"), ("\t", "tabs"), ("|", "bars (|)"))
                 if any(d in c for c in columns)]
        if other:
            fix = (f"the file looks delimited by {other[0][1]}, but a prompt CSV is comma-separated: save it "
                   "with commas (e.g. export as 'CSV UTF-8 (comma delimited)') or as JSON")
        raise file_error(
            path,
            f"missing required column(s) {', '.join(missing)} (header has {', '.join(map(repr, columns))})",
            fix,
            where="header",
        )
    rows: list[dict[str, Any]] = []
    n = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                raise file_error(
                    path,
                    f"a field longer than {csv.field_size_limit()} characters (line {reader.line_num})",
                    "a prompt this long does not fit a model's context: shorten it (an unclosed quote also reads "
                    "the rest of the file as one field)",
                    row=n + 1,
                ) from exc
            raise file_error(
                path,
                f"not valid CSV at line {reader.line_num}: {exc}",
                "fix the quoting on that line",
                row=n + 1,
            ) from exc
        if not record:  # blank line
            continue
        n += 1
        if len(record) > len(columns):
            raise file_error(
                path,
                f"{len(record)} fields but the header has {len(columns)} (line {reader.line_num})",
                "quote fields that contain commas",
                row=n,
            )
        values = {col: (record[i] if i < len(record) else None) for i, col in enumerate(columns)}
        rows.append(values)
    return rows


def _row_string(path: Path, row: dict[str, Any], key: str, n: int, *, required: bool) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise file_error(
                path,
                f"missing required field '{key}'",
                f"give every row a value for {', '.join(_REQUIRED)}",
                row=n,
            )
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise file_error(
            path, f"'{key}' is a {type(value).__name__}: {snippet(value)}", f"make '{key}' a string", row=n
        )
    if isinstance(value, int) and key not in _OPTIONAL:
        raise file_error(path, f"'{key}' is a number: {value}", f"make '{key}' a string", row=n)
    return str(value)


def _category_suggestion(category: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", category.lower()).strip("_")
    if not slug or not slug[0].isalpha():
        slug = f"c_{slug}".rstrip("_")
    return slug if slug not in _RESERVED_CATEGORIES else f"{slug}_prompts"


def _check_category(path: Path, category: str, n: int) -> None:
    """Categories are test ids (``pytest -k <category>``): lowercase identifiers, never a reserved name."""
    if category in _RESERVED_CATEGORIES:
        raise file_error(
            path,
            f"category {category!r} is reserved (it is the id of the pooled test over every category)",
            f"rename the category, e.g. to {_category_suggestion(category)!r}",
            row=n,
        )
    if not re.fullmatch(CATEGORY_PATTERN, category):
        raise file_error(
            path,
            f"category {snippet(category)} cannot be selected with pytest -k",
            f"use a lowercase identifier (letters, digits, _; starting with a letter) such as "
            f"{_category_suggestion(category)!r}",
            row=n,
        )


def build_prompt_set(path: Path, name: str, raw_rows: list[Any]) -> PromptSet:
    if not raw_rows:
        raise file_error(path, "no prompts in the file", "add at least one row with prompt,label,category")
    prompts: list[Prompt] = []
    seen_ids: dict[str, int] = {}
    pair_rows: dict[str, list[tuple[int, str]]] = {}
    for n, row in enumerate(raw_rows, start=1):
        if not isinstance(row, dict):
            raise file_error(
                path,
                f"row is a {type(row).__name__}, not an object",
                'write each row as {"prompt": ..., "label": ..., "category": ...}',
                row=n,
            )
        text = _row_string(path, row, "prompt", n, required=True)
        if not text or not text.strip():
            raise file_error(path, "empty prompt", "write the prompt text or delete the row", row=n)
        if not normalize_prompt(text):
            raise file_error(path, "empty prompt (only whitespace and invisible characters such as zero-width spaces)",
                         "write the prompt text or delete the row", row=n)
        label = (_row_string(path, row, "label", n, required=True) or "").strip().lower()
        if label not in LABELS:
            raise file_error(
                path,
                f"label {snippet(row.get('label'))} is not allowed",
                f"use one of: {', '.join(LABELS)}",
                row=n,
            )
        category = (_row_string(path, row, "category", n, required=True) or "").strip()
        if not category:
            raise file_error(path, "empty category", "give the row a category such as 'cybercrime'", row=n)
        _check_category(path, category, n)
        pair_id = (_row_string(path, row, "pair_id", n, required=False) or "").strip() or None
        pid = (_row_string(path, row, "id", n, required=False) or "").strip() or f"row-{n}"
        if pid in seen_ids:
            raise file_error(
                path,
                f"duplicate id {snippet(pid)} (first used in row {seen_ids[pid]})",
                "give every row a unique id, or omit ids to get row-<n>",
                row=n,
            )
        seen_ids[pid] = n
        if pair_id is not None:
            members = pair_rows.setdefault(pair_id, [])
            if len(members) >= 2:
                raise file_error(
                    path,
                    f"pair_id {snippet(pair_id)} has more than two rows (also rows {members[0][0]} and {members[1][0]})",
                    "a pair is exactly one harmful and one harmless row; use a new pair_id",
                    row=n,
                )
            for other_row, other_label in members:
                if other_label == label:
                    raise file_error(
                        path,
                        f"pair_id {snippet(pair_id)} has two {label} rows (also row {other_row})",
                        "a pair is one harmful and one harmless row; fix the label or the pair_id",
                        row=n,
                    )
            members.append((n, label))
        prompts.append(Prompt(id=pid, prompt=text, label=label, category=category, pair_id=pair_id))
    return PromptSet(name=name, prompts=tuple(prompts), source=str(path))


def load_prompts(path: str | Path) -> PromptSet:
    """Load and validate a prompt set from a ``.json`` or ``.csv`` file.

    Args:
        path: the file. JSON: the ``mech.prompts/v1`` object or a bare list of rows. CSV: a header
            with ``prompt,label,category`` and optionally ``pair_id``, ``id``.

    Returns:
        The :class:`PromptSet`, rows in file order; ``name`` is the file's ``name`` (JSON) or its stem.

    Raises:
        PromptFileError: one line naming the file (and the 1-based data row) and the fix.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.exists():
        raise file_error(p, "file not found", "pass the path of an existing .json or .csv prompt file")
    if suffix not in (".json", ".csv"):
        raise file_error(
            p, f"unsupported file type {suffix or '(no extension)'!r}", "use a .json or .csv prompt file"
        )
    text = read_data_file(p)
    if suffix == ".json":
        name, raw_rows = _json_rows(p, text)
    else:
        name, raw_rows = None, _csv_rows(p, text)
    return build_prompt_set(p, name or p.stem, raw_rows)


def default_pairs() -> PromptSet:
    """The shipped matched harmful/harmless pairs (``data/refusal_pairs.json``)."""
    return load_prompts(data_dir() / "refusal_pairs.json")


def benign_alarming() -> PromptSet:
    """The shipped harmless prompts with alarming words (``data/benign_alarming.json``), for over-refusal."""
    return load_prompts(data_dir() / "benign_alarming.json")


def refusal_markers(path: str | Path | None = None) -> tuple[str, ...]:
    """The refusal substrings of the substring detector (``data/refusal_markers.json`` by default).

    Markers are lowercase with straight quotes (responses are normalized the same way before
    matching), non-empty, and unique.

    Raises:
        PromptFileError: one line naming the file (and the 1-based marker row) and the fix.
    """
    p = Path(path) if path is not None else data_dir() / "refusal_markers.json"
    text = read_data_file(p)
    data = _parse_json(p, text, f'write {{"schema": "{MARKERS_SCHEMA}", "markers": [...]}}')
    if not isinstance(data, dict) or data.get("schema") != MARKERS_SCHEMA:
        got = snippet(data.get("schema")) if isinstance(data, dict) else f"a {type(data).__name__}"
        raise file_error(p, f"wrong schema {got}", f'use an object with "schema": "{MARKERS_SCHEMA}"')
    markers = data.get("markers")
    if not isinstance(markers, list) or not markers:
        raise file_error(
            p, "'markers' is missing, empty or not a list", "give a non-empty list of refusal substrings"
        )
    seen: dict[str, int] = {}
    for n, marker in enumerate(markers, start=1):
        if not isinstance(marker, str) or not marker.strip():
            raise file_error(
                p, f"marker {snippet(marker)} is not a non-empty string", "remove it or fix it", row=n
            )
        normalized = (
            marker.lower()
            .replace("\u2018", "'")
            .replace("\u2019", "'")
            .replace("\u201c", '"')
            .replace("\u201d", '"')
        )
        if marker != normalized:
            raise file_error(
                p,
                f"marker {snippet(marker)} is not normalized",
                f"write it as {snippet(normalized)} (lowercase, straight quotes)",
                row=n,
            )
        if marker in seen:
            raise file_error(
                p,
                f"duplicate marker {snippet(marker)} (first in row {seen[marker]})",
                "remove the duplicate",
                row=n,
            )
        seen[marker] = n
    return tuple(markers)
