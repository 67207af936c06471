"""The runs of a replication and the checks of its inputs, each failure one line naming the fix, before any
expensive work (see :mod:`runner.replicate`, step 1)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fixtures.config import ConfigError, check_set_args
from mech.heldout import is_heldout, load_heldout
from mech.models import check_model_source
from mech.prompts import PromptFileError, load_prompts
from mech.registry import REGISTRY, ModelError

ROOT = Path(__file__).resolve().parents[2]  # the checkout: mech/, fixtures/, hypotheses/, data/, runner/
DEFAULT_PROMPTS = "pairs"  # the project's matched pairs (data/refusal_pairs.json)
EVAL_PREFIX = "eval:"  # eval:FILE = train and select on the project's pairs, judge on FILE (the suite's --eval-prompts)
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


class ReplicationError(RuntimeError):
    """Bad input to a replication, found before any expensive work. ``str(err)`` is one line with the fix."""


@dataclass(frozen=True)
class RunSpec:
    """One (model, prompt set, dtype) suite run of the primary claims."""

    id: str  # <model>__<prompts>[__<dtype>], also the name of its reports dir
    model: str
    prompts: str  # "pairs", a file path, or eval:FILE
    model_label: str
    prompts_label: str
    dtype: str = "auto"  # the suite's --dtype for this run (the precision axis: --dtypes float32,bfloat16)
    extra: tuple[str, ...] = ()  # further suite options of this run only (e.g. a calibration's --shuffle-labels 3)

    @property
    def prompts_path(self) -> str | None:
        """The file the suite trains, selects and judges on (``--prompts``); None for the project's pairs."""
        return None if self.prompts == DEFAULT_PROMPTS or self.eval_path else self.prompts

    @property
    def eval_path(self) -> str | None:
        """The benchmark file the claims are judged on (``--eval-prompts``), for an ``eval:FILE`` prompt set."""
        return self.prompts.removeprefix(EVAL_PREFIX) if self.prompts.startswith(EVAL_PREFIX) else None


def slug(text: str) -> str:
    """``text`` as a file-name-safe id (letters, digits, ``._-``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def model_label(model: str) -> str:
    """A short name of a model: the registry name, a model dir's name, a ``.gguf`` file's stem, or the hub id."""
    if model in REGISTRY or "/" not in model and not Path(model).exists():
        return model
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else (p.name if p.exists() else model)


def parse_dtypes(text: str) -> list[str]:
    """``--dtypes`` of a replication: one dtype or a comma-separated precision axis (``float32,bfloat16``)."""
    dts = list(dict.fromkeys(d.strip() for d in text.split(",") if d.strip()))
    bad = [d for d in dts if d not in DTYPE_CHOICES]
    if not dts or bad:
        raise ReplicationError(f"--dtype {text!r}: give one or more of {', '.join(DTYPE_CHOICES)}, comma-separated "
                               "(e.g. --dtypes float32,bfloat16 for the precision axis)")
    return dts


def plan_runs(models: Sequence[str], prompts: Sequence[str], dtypes: Sequence[str] = ("auto",)) -> list[RunSpec]:
    """Every (model, prompt set, dtype) combination, models outermost; each run id is unique and file-name safe
    (``<model>__<prompts>``, with ``__<dtype>`` when more than one dtype is asked)."""
    if not models:
        raise ReplicationError("no models given; pass --models A,B (registry names: python -m mech models)")
    if not prompts:
        raise ReplicationError(f"no prompt sets given; pass --prompts {DEFAULT_PROMPTS} or --prompts FILE.csv")
    runs, seen = [], set()
    for m in models:
        for p in prompts:
            for dt in dtypes:
                pl = ("pairs" if p == DEFAULT_PROMPTS
                      else f"eval-{Path(p.removeprefix(EVAL_PREFIX)).stem}" if p.startswith(EVAL_PREFIX)
                      else Path(p).stem)
                rid = f"{slug(model_label(m))}__{slug(pl)}" + (f"__{dt}" if len(dtypes) > 1 else "")
                base, i = rid, 2
                while rid in seen:
                    rid, i = f"{base}-{i}", i + 1
                seen.add(rid)
                runs.append(RunSpec(rid, m, p, model_label(m), pl, dt))
    return runs


def check_inputs(models: Sequence[str], prompts: Sequence[str], cache_dir: Path) -> None:
    """Each model resolvable without loading it (a registry model's wheels installed or it is prepared), each
    prompt file present and valid: a :class:`ReplicationError` line naming the fix, before anything runs."""
    if not (ROOT / "hypotheses").is_dir():
        raise ReplicationError(f"the hypothesis suite is not next to this runner ({ROOT / 'hypotheses'} is "
                               "missing); run replicate from a checkout of the repository")
    for flag, given in (("--models", models), ("--prompts", prompts)):
        dup = next((x for i, x in enumerate(given) if x in given[:i]), None)
        if dup is not None:
            raise ReplicationError(f"{flag} names {dup} twice: each run would repeat the other; list it once")
    for m in models:
        try:
            check_model_source(m, cache_dir)
        except ModelError as e:
            raise ReplicationError(f"--models {m}: {e}") from None
    for item in prompts:
        if item == DEFAULT_PROMPTS:
            continue
        p = item.removeprefix(EVAL_PREFIX)
        if item.startswith(EVAL_PREFIX) and is_heldout(p):  # registered held-out benchmarks (mech/heldout.py)
            try:
                load_heldout(p)
            except PromptFileError as e:
                raise ReplicationError(f"--prompts {item}: {e}") from None
            continue
        if not Path(p).is_file():
            raise ReplicationError(f"--prompts {item}: no such file; pass a JSON or CSV prompt file (prompt,label,"
                                   f"category[,pair_id]), {EVAL_PREFIX}FILE to judge on FILE what the project's "
                                   f"pairs select, or '{DEFAULT_PROMPTS}' for the project's pairs")
        try:
            load_prompts(p)
        except PromptFileError as e:
            raise ReplicationError(f"--prompts {item}: {e}") from None


def check_set_items(items: Sequence[str]) -> None:
    """Each ``--set`` item (and ``MECH_SET``) checked by the suite's own validator
    (:func:`fixtures.config.check_set_args`: form, field, type, range, consistency): the same one line the suite
    and ``--plan`` give, before anything runs."""
    try:
        check_set_args(list(items))
    except ConfigError as e:
        raise ReplicationError(str(e)) from None
