"""Evaluating an intervention against the unmodified model: refusal scores, KL, CE, generated refusals.

Shared by :mod:`mech.ablation` and :mod:`mech.directions` (and any intervention: a callable returning a
context manager).

1. :func:`make_baseline` measures the unmodified model once: logit refusal scores of the harmful, harmless and
   benign-but-alarming prompts, the harmless last-position logits, greedy completions of the harmless prompts
   and their cross-entropy, optionally greedy generations judged by the substring detector.
2. :func:`evaluate_intervention` measures the same under the intervention and returns an
   :class:`InterventionResult` (JSON-ready via ``to_dict``): score changes, the first-token
   ``KL(base || intervened)`` on harmless prompts (:func:`first_token_kl`), the cross-entropy of the unmodified
   model's own completions before and after (:func:`completion_cross_entropy`), and for generations the
   refusal rates with an exact McNemar test of the paired flips.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mech.chat import pad_left
from mech.refusal import SubstringDetector, generate, generate_ids, last_logits, refusal_log_odds
from mech.stats import McNemarResult, RateCI, binomial_rate, fields_dict, mcnemar_exact

if TYPE_CHECKING:
    from mech.models import LoadedModel

__all__ = [
    "Baseline",
    "GeneratedRefusals",
    "InterventionResult",
    "ScoreChange",
    "completion_cross_entropy",
    "evaluate_intervention",
    "first_token_kl",
    "greedy_completion_ids",
    "make_baseline",
]


def first_token_kl(base_logits: Tensor, new_logits: Tensor) -> Tensor:
    """``KL(P_base || P_new)`` of next-token distributions per row: ``[n, d_vocab]`` x2 → ``[n]`` (nats)."""
    lp = base_logits.double().log_softmax(-1)
    lq = new_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp(min=0).float()


def greedy_completion_ids(
    lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 64
) -> list[list[int]]:
    """Greedy response token ids of each prompt, cut after the first end-of-sequence token (kept)."""
    return generate_ids(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, keep_eos=True)


@torch.inference_mode()
def completion_cross_entropy(
    lm: LoadedModel, prompts: Sequence[str], completions: Sequence[Sequence[int]], batch_size: int = 8
) -> Tensor:
    """Mean per-token cross-entropy (nats) of each completion given its chat-formatted prompt: ``[n]``.

    Sequences are left-padded, so every completion ends at the last position; only the last
    ``max_len + 1`` positions' logits are computed.
    """
    prompt_ids = lm.encode_chat(list(prompts))
    out: list[Tensor] = []
    for i in range(0, len(prompts), batch_size):
        ps, cs = prompt_ids[i : i + batch_size], [list(c) for c in completions[i : i + batch_size]]
        enc = pad_left([p + c for p, c in zip(ps, cs, strict=True)], lm.tokenizer.pad_token_id, lm.input_device)
        k = max(len(c) for c in cs) + 1
        logits = lm.model(**enc, logits_to_keep=k, use_cache=False).logits.float()  # [b, k, d_vocab]
        lp = logits.log_softmax(-1)
        for r, c in enumerate(cs):
            if not c:
                out.append(torch.tensor(float("nan")))
                continue
            pred = lp[r, k - len(c) - 1 : k - 1]  # [len(c), d_vocab]: positions predicting the completion
            tgt = torch.tensor(c, device=pred.device)
            out.append(-pred.gather(-1, tgt[:, None]).mean().cpu())
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ baseline


@dataclass
class Baseline:
    """The unmodified model's measurements, made once and compared against every intervention."""

    harmful: tuple[str, ...]
    harmless: tuple[str, ...]
    benign: tuple[str, ...]
    refusal_ids: tuple[int, ...]
    harmful_scores: Tensor  # [n_harmful] logit refusal score
    harmless_scores: Tensor  # [n_harmless]
    benign_scores: Tensor  # [n_benign]
    harmless_logits: Tensor  # [n_harmless, d_vocab] last-position logits (first-token KL)
    completions: list[list[int]] | None  # greedy completion ids of the harmless prompts (CE side effect)
    ce: Tensor | None  # [n_harmless] per-token CE of those completions, unmodified model
    generate: bool
    max_new_tokens: int
    batch_size: int
    harmful_refused: list[bool] | None = None  # substring detector on greedy generations
    harmless_refused: list[bool] | None = None
    benign_refused: list[bool] | None = None
    detector: SubstringDetector | None = None


def _scores_and_logits(lm: LoadedModel, prompts: Sequence[str], ids: Sequence[int], bs: int) -> tuple[Tensor, Tensor]:
    """Logit refusal scores ``[n]`` and last-position logits ``[n, d_vocab]`` (float32, CPU)."""
    if not prompts:
        return torch.zeros(0), torch.zeros(0, lm.shape.d_vocab)
    logits = last_logits(lm, list(prompts), batch_size=bs)
    return refusal_log_odds(logits, list(ids)), logits


def _generated_refusals(lm: LoadedModel, prompts: Sequence[str], det: SubstringDetector, max_new: int, bs: int) -> list[bool]:
    if not prompts:
        return []
    # the substring verdict is all that is read: a row stops once its refusal is detected (same verdicts)
    return det(list(prompts), generate(lm, list(prompts), max_new_tokens=max_new, batch_size=bs, stop_at_refusal=det))


def make_baseline(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_ids: Sequence[int],
    benign: Sequence[str] = (),
    ce_tokens: int = 32,
    generate: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    detector: SubstringDetector | None = None,
) -> Baseline:
    """Measure the unmodified model on the evaluation prompts, once.

    Always: logit refusal scores of ``harmful``, ``harmless`` and ``benign`` and the harmless last-position
    logits. ``ce_tokens > 0``: greedy completions (≤ ``ce_tokens`` new tokens) of the harmless prompts and their
    cross-entropy. ``generate``: greedy generations (``max_new_tokens``) of all three sets, judged by the
    substring detector (costly: ~1 min per 16 prompts x 64 tokens on 2 CPU cores for the 0.5B model).
    """
    harmful, harmless, benign = tuple(harmful), tuple(harmless), tuple(benign)
    ids = tuple(int(i) for i in refusal_ids)
    all_scores, all_logits = _scores_and_logits(lm, harmful + harmless + benign, ids, batch_size)
    nh, nl = len(harmful), len(harmless)
    completions = ce = None
    if ce_tokens > 0 and harmless:
        completions = greedy_completion_ids(lm, harmless, max_new_tokens=ce_tokens, batch_size=batch_size)
        ce = completion_cross_entropy(lm, harmless, completions, batch_size=max(1, batch_size // 2))
    b = Baseline(
        harmful=harmful, harmless=harmless, benign=benign, refusal_ids=ids,
        harmful_scores=all_scores[:nh], harmless_scores=all_scores[nh : nh + nl], benign_scores=all_scores[nh + nl :],
        harmless_logits=all_logits[nh : nh + nl], completions=completions, ce=ce, generate=generate,
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )
    if generate:
        b.detector = detector or SubstringDetector()
        b.harmful_refused = _generated_refusals(lm, harmful, b.detector, max_new_tokens, batch_size)
        b.harmless_refused = _generated_refusals(lm, harmless, b.detector, max_new_tokens, batch_size)
        b.benign_refused = _generated_refusals(lm, benign, b.detector, max_new_tokens, batch_size)
    return b


# ---------------------------------------------------------------------------------------- results


def _mean(t: Tensor | None) -> float:
    return float("nan") if t is None or t.numel() == 0 else float(t.double().nanmean())


@dataclass(frozen=True)
class ScoreChange:
    """Per-prompt logit refusal scores before and after an intervention, and their means."""

    before: tuple[float, ...]
    after: tuple[float, ...]

    @property
    def mean_before(self) -> float:
        return float(np.mean(self.before)) if self.before else float("nan")

    @property
    def mean_after(self) -> float:
        return float(np.mean(self.after)) if self.after else float("nan")

    @property
    def delta(self) -> float:
        """``mean_after - mean_before`` (negative: the intervention lowered refusal)."""
        return self.mean_after - self.mean_before

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self, "mean_before", "mean_after", "delta")


@dataclass(frozen=True)
class GeneratedRefusals:
    """Substring-detector refusals on greedy generations before/after, with rates, CIs and McNemar."""

    before: tuple[bool, ...]
    after: tuple[bool, ...]
    rate_before: RateCI
    rate_after: RateCI
    mcnemar: McNemarResult

    @classmethod
    def of(cls, before: Sequence[bool], after: Sequence[bool]) -> GeneratedRefusals:
        return cls(tuple(before), tuple(after), binomial_rate(list(before)), binomial_rate(list(after)), mcnemar_exact(before, after))

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)


@dataclass(frozen=True)
class InterventionResult:
    """Everything measured for one intervention, JSON-ready (``to_dict`` / ``to_json``).

    ``kind``: ``zero_ablation`` | ``mean_ablation`` | ``directional_ablation`` | ``activation_addition`` |
    ``weight_orthogonalization`` | any label. ``target``: what was intervened on (component ids, direction
    layer/position/norm/coefficient, ...). Side effects on harmless prompts: ``kl`` (mean first-token
    ``KL(base || intervened)``, nats), ``ce_before``/``ce_after`` (mean per-token cross-entropy of the unmodified
    model's own greedy completions). ``benign``: scores on the benign-but-alarming set.
    """

    name: str
    kind: str
    target: dict[str, Any]
    param_fraction: float | None
    harmful: ScoreChange
    harmless: ScoreChange
    benign: ScoreChange
    kl: float
    kl_per_prompt: tuple[float, ...]
    ce_before: float
    ce_after: float
    ce_per_prompt_before: tuple[float, ...]
    ce_per_prompt_after: tuple[float, ...]
    harmful_refusals: GeneratedRefusals | None = None
    harmless_refusals: GeneratedRefusals | None = None
    benign_refusals: GeneratedRefusals | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)


def _tup(t: Tensor | None) -> tuple[float, ...]:
    return () if t is None else tuple(float(x) for x in t.tolist())


def evaluate_intervention(
    lm: LoadedModel,
    baseline: Baseline,
    intervention: Callable[[], AbstractContextManager[Any]],
    name: str,
    kind: str,
    target: dict[str, Any] | None = None,
    param_fraction: float | None = None,
    extra: dict[str, Any] | None = None,
) -> InterventionResult:
    """Measure everything ``baseline`` measured, under ``intervention()`` (a fresh context per measurement).

    One batched forward for the logit scores of all three prompt sets (+ the harmless KL), one for the CE,
    and greedy generation of each set when the baseline generated.
    """
    b = baseline
    nh, nl = len(b.harmful), len(b.harmless)
    with intervention():
        scores, logits = _scores_and_logits(lm, b.harmful + b.harmless + b.benign, b.refusal_ids, b.batch_size)
    kl = first_token_kl(b.harmless_logits, logits[nh : nh + nl]) if nl else torch.zeros(0)
    ce_after = None
    if b.completions is not None:
        with intervention():
            ce_after = completion_cross_entropy(lm, b.harmless, b.completions, batch_size=max(1, b.batch_size // 2))
    gens: dict[str, GeneratedRefusals | None] = {"harmful": None, "harmless": None, "benign": None}
    if b.generate and b.detector is not None:
        for key, prompts, before in (
            ("harmful", b.harmful, b.harmful_refused),
            ("harmless", b.harmless, b.harmless_refused),
            ("benign", b.benign, b.benign_refused),
        ):
            if prompts and before is not None:
                with intervention():
                    after = _generated_refusals(lm, prompts, b.detector, b.max_new_tokens, b.batch_size)
                gens[key] = GeneratedRefusals.of(before, after)
    return InterventionResult(
        name=name,
        kind=kind,
        target=dict(target or {}),
        param_fraction=param_fraction,
        harmful=ScoreChange(_tup(b.harmful_scores), _tup(scores[:nh])),
        harmless=ScoreChange(_tup(b.harmless_scores), _tup(scores[nh : nh + nl])),
        benign=ScoreChange(_tup(b.benign_scores), _tup(scores[nh + nl :])),
        kl=_mean(kl),
        kl_per_prompt=_tup(kl),
        ce_before=_mean(b.ce),
        ce_after=_mean(ce_after),
        ce_per_prompt_before=_tup(b.ce),
        ce_per_prompt_after=_tup(ce_after),
        harmful_refusals=gens["harmful"],
        harmless_refusals=gens["harmless"],
        benign_refusals=gens["benign"],
        extra=dict(extra or {}),
    )

