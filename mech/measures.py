"""Refusal measures as registered values: a name, how it labels one graded completion, what it needs.

A :class:`RefusalMeasure` labels one completion ``refusal``, ``compliance`` or ``incoherent`` (or ``None``: not
graded) from its :class:`Evidence`, the per-completion inputs that :meth:`mech.grading.Grader.grade` gathers once:

1. the prompt and the completion text;
2. the substring detector's hit (:class:`~mech.refusal.SubstringDetector`);
3. the coherence check's verdict (:class:`~mech.coherence.CoherenceCheck`, under the unmodified model);
4. the judge's three-way label and probabilities when a judge is given (``None`` otherwise).

``needs`` names what a measure reads (``text``, ``detector``, ``coherence``, ``judge``); a measure that needs the
judge is ``None`` (not graded) in a run without one. Three measures are built in: ``substring``,
``substring+coherence`` and ``judge`` (their outcomes are kept in :class:`~mech.grading.Grade`'s own fields);
every other registered measure's outcome travels in ``Grade.extra``, and every place that reports measures side
by side (:func:`mech.grading.removal_by_measure`, the baseline's ``by_measure``) iterates
:func:`measure_names`. Adding one is one :func:`register_measure` call (hypotheses/README.md, "Adding a refusal
measure", built by tests/test_adding_a_refusal_measure.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mech.coherence import Outcome, classify

__all__ = ["BUILTIN_MEASURES", "NEEDS", "Evidence", "MeasureError", "RefusalMeasure", "measure", "measure_names",
           "register_measure", "unregister_measure"]

NEEDS: tuple[str, ...] = ("text", "detector", "coherence", "judge")


class MeasureError(ValueError):
    """An unknown or badly declared refusal measure; the message is one line."""


@dataclass(frozen=True)
class Evidence:
    """What the grader knows about one completion when the measures label it."""

    prompt: str
    completion: str
    substring: bool  # a refusal marker of the detector appears
    coherent: bool  # the coherence check passed (NLL and repetition under the unmodified model)
    judge: Outcome | None  # the judge's three-way label (a refused/not-refused judge combined with coherence)
    judge_p: tuple[float, float, float] | None  # the judge's probabilities of refusal, compliance, incoherent


@dataclass(frozen=True)
class RefusalMeasure:
    """One way of counting refusals: ``label(evidence)`` is the outcome of one completion."""

    name: str
    label: Callable[[Evidence], Outcome | None]
    needs: tuple[str, ...]
    description: str

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise MeasureError(f"a refusal measure needs a name, got {self.name!r}")
        bad = [n for n in self.needs if n not in NEEDS]
        if bad:
            raise MeasureError(f"measure {self.name!r} needs unknown inputs {bad}; use some of {', '.join(NEEDS)}")

    def outcome(self, evidence: Evidence, has_judge: bool) -> Outcome | None:
        """The label, or ``None`` when the measure needs a judge and the run has none."""
        if "judge" in self.needs and not has_judge:
            return None
        return self.label(evidence)


_REGISTRY: dict[str, RefusalMeasure] = {}
BUILTIN_MEASURES: tuple[str, ...] = ("substring", "substring+coherence", "judge")


def register_measure(m: RefusalMeasure, replace: bool = False) -> RefusalMeasure:
    """Register ``m`` (``replace=True`` to overwrite a non-built-in one); measures report in registration order."""
    if not isinstance(m, RefusalMeasure):
        raise TypeError(f"register a RefusalMeasure, got {type(m).__name__}")
    if m.name in _REGISTRY and (not replace or m.name in BUILTIN_MEASURES):
        raise MeasureError(f"refusal measure {m.name!r} is already registered"
                           + ("" if m.name in BUILTIN_MEASURES else "; pass replace=True to overwrite"))
    _REGISTRY[m.name] = m
    return m


def unregister_measure(name: str) -> None:
    """Remove a registered measure (not a built-in one)."""
    if name in BUILTIN_MEASURES:
        raise MeasureError(f"{name!r} is a built-in refusal measure and cannot be removed")
    if name not in _REGISTRY:
        raise MeasureError(f"refusal measure {name!r} is not registered")
    del _REGISTRY[name]


def measure(name: str) -> RefusalMeasure:
    """The registered measure ``name``; a one-line :class:`MeasureError` naming the registered ones."""
    m = _REGISTRY.get(name)
    if m is None:
        raise MeasureError(f"unknown refusal measure {name!r}; registered: {', '.join(measure_names())}")
    return m


def measure_names() -> tuple[str, ...]:
    """Every registered measure, built-in ones first, then in registration order."""
    return tuple(_REGISTRY)


register_measure(RefusalMeasure(
    "substring", lambda e: "refusal" if e.substring else "compliance", ("detector",),
    "a refusal marker in the response (refusal or compliance only)"))
register_measure(RefusalMeasure(
    "substring+coherence", lambda e: classify(e.substring, e.coherent), ("detector", "coherence"),
    "the detector behind the coherence check: an incoherent completion is incoherent whatever its words"))
register_measure(RefusalMeasure(
    "judge", lambda e: e.judge, ("judge",), "the judge model's three-way label"))
