"""The page in hypotheses/README.md ("Adding a refusal measure") run as written on a tiny model: its registration and
its grading block are taken from the README and executed; the measured disagreement is then asserted here."""

from __future__ import annotations

import pytest

from mech.coherence import CoherenceCheck
from mech.grading import Grade, Grader, removal_by_measure
from mech.measures import BUILTIN_MEASURES, MeasureError, measure, measure_names, unregister_measure
from tests.helpers import readme_blocks

NAME = "opens_with_apology"


@pytest.fixture
def page_blocks():
    register, grade = readme_blocks("Adding a refusal measure")
    assert NAME not in measure_names()
    yield register, grade
    if NAME in measure_names():
        unregister_measure(NAME)  # the registry is process-wide: leave it as it was


def test_the_refusal_measure_page_runs(tiny_qwen2, page_blocks):
    register, grade = page_blocks
    lenient = CoherenceCheck(nll_threshold=1e9, repetition_threshold=0.5)
    before = Grader(lenient).identity()
    ns: dict = {}
    exec(compile(register, "README.md:register", "exec"), ns)  # step 1
    assert measure_names() == (*BUILTIN_MEASURES, NAME) and measure(NAME).needs == ("text", "coherence")
    assert Grader(lenient).identity() == {**before, "measures": [NAME]}  # the grades' cache key names it
    ns["lm"] = tiny_qwen2
    exec(compile(grade, "README.md:grade", "exec"), ns)  # step 2, on the tiny model's own completions
    grades: list[Grade] = ns["grades"]
    table = ns["table"]
    assert len(grades) == 4 and all(dict(g.extra).keys() == {NAME} for g in grades)
    # the written ones: an apology is a refusal by both; a refusal without one is a refusal by the detector only
    assert table[2] == ("refusal", "refusal") and table[3] == ("refusal", "compliance"), table
    assert sum(a != b for a, b in table) >= 1  # the measured disagreement of the two measures
    assert all(g.outcome == g.substring_outcome for g in grades)  # the decision measure is unchanged
    # a grade round-trips with its extra measure (the grades cache), and the removal table lists it
    assert [Grade.from_dict(g.to_dict()).to_dict() for g in grades] == [g.to_dict() for g in grades]
    assert [Grade.from_dict(g.to_dict()).by(NAME) for g in grades] == [b for _, b in table]
    side = removal_by_measure(grades[2:], grades[:2])
    assert list(side) == [*BUILTIN_MEASURES, NAME] and side["judge"] is None
    assert side[NAME]["held_before"] == 1 and side["substring"]["held_before"] == 2


def test_measures_without_a_registration_keep_their_old_form(tiny_qwen2):
    g = Grader(CoherenceCheck(nll_threshold=1e9, repetition_threshold=0.5)).grade(
        tiny_qwen2, ["Tell me a joke."], ["I'm sorry, but I can't help with that."])[0]
    assert "extra" not in g.to_dict() and g.extra == () and "measures" not in Grader(
        CoherenceCheck(nll_threshold=1e9, repetition_threshold=0.5)).identity()
    with pytest.raises(MeasureError, match="unknown refusal measure 'nope'; registered: substring, "):
        g.by("nope")
    with pytest.raises(MeasureError, match="built-in"):
        unregister_measure("judge")
