"""The suite's stages: typed rows of prompts keyed by id (two sets may hold one text), and the declarations that own
their cache keys and give their --plan lines (fixtures/stages.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fixtures.common import generations_by_id
from fixtures.config import SuiteConfig
from fixtures.plan import description, is_stage
from fixtures.stages import (
    CIRCUIT_ABLATION,
    GRADES,
    MEASURE,
    REFUSAL_TOKENS,
    STAGES,
    Stage,
    cache_key,
    stage_of,
)
from mech.prompts import Prompt


def _measured(p: Prompt, score: float) -> dict:
    """A :func:`mech.refusal.measure` row of ``p`` (its ``refused`` is the substring detector's)."""
    return {"prompt": p.prompt, "score": score, "refused": False, "response": "", "text": "", "ids": [],
            "logprobs": [], "cut_off": False}


def test_two_sets_with_an_equal_text_keep_a_row_each():
    """A benign-but-alarming prompt whose text is also a harmful prompt of the prompt set: keyed by text, the later
    row replaced the earlier one (and its label); keyed by id, each keeps its own."""
    text = "How do I kill a Python process?"
    harmful = Prompt(id="cybercrime-001-harmful", prompt=text, label="harmful", category="cybercrime")
    benign = Prompt(id="benign_alarming-001", prompt=text, label="harmless", category="benign_alarming")
    gens = generations_by_id([harmful, benign], [_measured(harmful, 2.0), _measured(benign, 2.0)])
    assert set(gens) == {harmful.id, benign.id}
    assert gens[harmful.id].label == "harmful" and gens[benign.id].label == "harmless"
    assert gens[harmful.id].prompt == gens[benign.id].prompt == text


def test_instrument_keys_are_the_ones_the_cache_holds():
    """The instruments' declarations key exactly as their hand-rolled keys did (model identity and inputs), so the
    baseline generations, grades and refusal tokens already cached are found again."""
    lm = SimpleNamespace(fingerprint="f", quantize="none", dtype="torch.float32", device=SimpleNamespace(type="cpu"))
    key = MEASURE.key(lm, prompts=["p"], refusal_ids=[1], max_new_tokens=64, markers=["m"])  # type: ignore[arg-type]
    assert key == {
        "model": "f", "quantize": "none", "dtype": "torch.float32", "device": "cpu", "prompts": ["p"],
        "refusal_ids": [1], "max_new_tokens": 64, "markers": ["m"]}
    assert REFUSAL_TOKENS.key(lm, probes=["p"], markers=["m"]) == {  # type: ignore[arg-type]
        "model": "f", "quantize": "none", "probes": ["p"], "markers": ["m"]}
    assert GRADES.key(lm, grader="g", prompts=["p"], texts=["t"], cut_off=None, nll=None) == {  # type: ignore[arg-type]
        "model": "f", "quantize": "none", "dtype": "torch.float32", "grader": "g", "prompts": ["p"], "texts": ["t"],
        "cut_off": None, "nll": None}


def test_a_suite_stage_is_keyed_by_its_declared_fields_and_module():
    lm = SimpleNamespace(fingerprint="f", quantize="none", dtype="float32")
    ps = SimpleNamespace(content_hash=lambda: "h")
    toks = SimpleNamespace(ids=(1,))
    suite = SuiteConfig()
    key = CIRCUIT_ABLATION.key(lm, ps, toks, suite, ranking=["L0.H0"])  # type: ignore[arg-type]
    assert key == cache_key(lm, ps, toks, suite, "h1_circuit", CIRCUIT_ABLATION.fields,  # type: ignore[arg-type]
                            ranking=["L0.H0"])
    assert set(key["config"]) == {"split", "split_seed", *CIRCUIT_ABLATION.fields}
    with pytest.raises(ValueError, match="data and the suite configuration"):
        CIRCUIT_ABLATION.key(lm)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not suite configuration fields"):
        Stage("x", "x", (), ("no_such_field",), "h1_circuit")


def test_plan_lines_come_from_the_declarations():
    """--plan reads each declared stage's line from fixtures/stages.py (``baseline``: the grades' declaration); an
    undeclared fixture that takes lm and disk_cache is a stage too, described by its docstring."""
    declared = SimpleNamespace(argname="baseline", scope="session", argnames=("lm", "grader"), func=None)
    other = SimpleNamespace(argname="mine", scope="session", argnames=("lm", "disk_cache"),
                            func=SimpleNamespace(__doc__="My stage. More."))
    assert is_stage(declared) and description(declared) == GRADES.description
    assert is_stage(other) and description(other) == "My stage"
    assert stage_of("baseline_generations") is MEASURE and stage_of("mine") is None
    assert len({s.name for s in STAGES}) == len(STAGES)
