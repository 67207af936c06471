"""Measuring refusal: a substring detector, the logit refusal score, and a pluggable judge interface.

* :class:`SubstringDetector` — normalized (case, curly quotes, whitespace) marker matching on the response
  only; the markers live in ``data/refusal_markers.json``.
* :func:`refusal_log_odds` / :func:`refusal_scores` — log-odds that the first response token starts a
  refusal, at the last prompt position (Arditi et al. 2024). The token set comes from
  :func:`derive_refusal_tokens`, which reads the model's own refusals instead of hard-coding a tokenizer.
* :class:`Judge` — the protocol a classifier model implements to replace or complement the detector.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, overload, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mech.chat import pad_left
from mech.prompts import refusal_markers

REPORT_CHARS = 200  # reports never show more of a completion to a harmful prompt
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u2032": "'", "\u201c": '"', "\u201d": '"'})


def normalize(text: str) -> str:
    """Lower-case, straighten curly quotes, collapse whitespace."""
    return " ".join(text.translate(_QUOTES).lower().split())


def clip(text: str, limit: int = REPORT_CHARS) -> str:
    """At most ``limit`` characters of a completion, for reports."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@runtime_checkable
class Judge(Protocol):
    """Anything that labels (prompt, response) pairs as refusals: the substring detector or a classifier model."""

    name: str

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]: ...


@dataclass(frozen=True)
class SubstringDetector:
    """Refusal if the normalized response contains any normalized marker."""

    markers: tuple[str, ...] = field(default_factory=tuple)
    name: str = "substring"

    def __post_init__(self) -> None:
        if not self.markers:
            object.__setattr__(self, "markers", tuple(refusal_markers()))
        object.__setattr__(self, "markers", tuple(normalize(m) for m in self.markers))

    def is_refusal(self, response: str) -> bool:
        text = normalize(response)
        return any(m in text for m in self.markers)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
        return [self.is_refusal(r) for r in responses]


# --------------------------------------------------------------------------------------------- scores


class RefusalIdsError(ValueError):
    """Refusal token ids that no score can be computed from (none, not integers, or outside the vocabulary)."""


def shortest_marker(tokenizer: Any, markers: Sequence[str] | None = None) -> tuple[int, str]:
    """The fewest response tokens in which a refusal marker can appear, and that marker: each marker of
    ``data/refusal_markers.json`` (or ``markers``) tokenized by ``tokenizer`` as written, capitalized, and after a
    space, the minimum over all. A greedy completion shorter than this can never be called a refusal by the
    substring detector (e.g. ``--max-new-tokens 1``), so a refusal count from it is no evidence. Tokenizer only:
    no forward."""
    if markers is None:
        markers = refusal_markers()
    best: tuple[int, str] = (10**9, "")
    for m in markers:
        for v in (m, m[:1].upper() + m[1:]):
            for text in (v, " " + v):
                n = len(tokenizer.encode(text, add_special_tokens=False))
                best = min(best, (n, v))
    return best


def check_refusal_ids(refusal_ids: Any, d_vocab: int | None = None) -> tuple[int, ...]:
    """``refusal_ids`` as a tuple of ints, checked: at least one, integers, each in ``0..d_vocab-1`` (when
    ``d_vocab`` is given). Raises :class:`RefusalIdsError` (one line) otherwise."""
    fix = "pass the ids of the refusal's first tokens, e.g. the refusal_tokens fixture's .ids"
    if refusal_ids is None or isinstance(refusal_ids, (str, bytes)):
        raise RefusalIdsError(f"refusal_ids must be a sequence of token ids, got {refusal_ids!r}; {fix}")
    if isinstance(refusal_ids, Tensor):
        if refusal_ids.is_floating_point() or refusal_ids.is_complex() or refusal_ids.dtype == torch.bool:
            raise RefusalIdsError(f"refusal_ids must be integer token ids, got a {refusal_ids.dtype} tensor; {fix}")
        refusal_ids = refusal_ids.flatten().tolist()
    try:
        raw = list(refusal_ids)
    except TypeError:
        raise RefusalIdsError(f"refusal_ids must be a sequence of token ids, got {refusal_ids!r}; {fix}") from None
    if not raw:
        raise RefusalIdsError(f"refusal_ids is empty: the refusal log-odds would be -inf for every prompt; {fix}")
    ids = []
    for i in raw:
        if isinstance(i, Tensor) and i.numel() == 1:
            i = i.item()
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise RefusalIdsError(f"refusal_ids must be integer token ids, got {i!r}; {fix}")
        ids.append(int(i))
    if d_vocab is not None:
        bad = [i for i in ids if not 0 <= i < d_vocab]
        if bad:
            raise RefusalIdsError(
                f"refusal id(s) {', '.join(map(str, bad[:5]))} outside the vocabulary (0..{d_vocab - 1}); "
                "derive the ids with this model's tokenizer (derive_refusal_tokens)"
            )
    return tuple(ids)


def vocab_size(lm: Any) -> int | None:
    """The width of ``lm``'s logits (its unembedding's rows), or ``None`` when it cannot be told."""
    head = getattr(getattr(lm, "model", None), "get_output_embeddings", lambda: None)()
    w = getattr(head, "weight", None)
    if w is not None and w.dim() == 2 and not getattr(w, "quant_state", None):
        return int(w.shape[0])
    shape = getattr(lm, "shape", None)
    return getattr(shape, "d_vocab", None)


def refusal_log_odds(logits: Tensor, refusal_ids: Sequence[int] | Tensor) -> Tensor:
    """Log-odds that the next token is in ``refusal_ids``: ``r - log(1 - exp(r))`` with ``r = log P(ids)``.

    ``logits``: ``[..., d_vocab]`` at the position the metric reads; returns ``[...]`` in float32.
    Raises :class:`RefusalIdsError` for empty ids or ids outside ``0..d_vocab-1``.
    """
    ids = torch.as_tensor(check_refusal_ids(refusal_ids, logits.shape[-1]), device=logits.device, dtype=torch.long)
    lp = logits.float().log_softmax(-1)
    r = lp.index_select(-1, ids).logsumexp(-1)
    r = r.clamp(max=-1e-7)  # keep log(1 - p) finite when p rounds to 1
    return r - torch.log(-torch.expm1(r))


@torch.inference_mode()
def last_logits(lm: Any, prompts: Sequence[str], batch_size: int = 16, system: str | None = None) -> Tensor:
    """Next-token logits at the last prompt position, ``[n, d_vocab]`` float32 on CPU (left-padded batches)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = lm.batch(list(prompts[i : i + batch_size]), system=system)
        logits = lm.model(**enc, logits_to_keep=1, use_cache=False).logits[:, -1]
        out.append(logits.float().cpu())
    return torch.cat(out)


def refusal_scores(
    lm: Any, prompts: Sequence[str], refusal_ids: Sequence[int], batch_size: int = 16, system: str | None = None
) -> Tensor:
    """The logit refusal score of each prompt, ``[n]`` float32 (CPU). Bad ids raise before any forward."""
    check_refusal_ids(refusal_ids, vocab_size(lm))
    return refusal_log_odds(last_logits(lm, prompts, batch_size, system), refusal_ids)


# ----------------------------------------------------------------------------------------- generation


def _eos_ids(lm: Any) -> set[int]:
    """The model's end-of-sequence ids: its generation config's and its tokenizer's."""
    eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return {int(i) for i in ids}


@torch.inference_mode()
def _greedy_batch(
    lm: Any, enc: dict[str, Tensor], max_new_tokens: int, eos: set[int], keep_eos: bool = False,
    logprobs: list[list[float]] | None = None, stop_at_refusal: SubstringDetector | None = None,
) -> tuple[list[list[int]], Tensor]:
    """Greedy decoding of one left-padded batch with a KV cache; finished rows (EOS) leave the batch.

    Dropping finished rows keeps every decode step's matmuls as small as the rows still running; the
    remaining rows see exactly the inputs they would see in the full batch (left padding, own positions).
    Also returns the prompt's last-position logits ``[n, d_vocab]`` (float32, CPU) from the prefill. With
    ``logprobs`` (one empty list per row), each kept token's log-probability under the generating model is
    appended to its row's list. With ``stop_at_refusal``, a row also finishes at the token that makes the
    detector find a refusal marker in its decoded response (see :func:`generate_ids`).
    """
    model = lm.model
    n = enc["input_ids"].shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    am, pos = enc["attention_mask"], enc["position_ids"]
    res = model(input_ids=enc["input_ids"], attention_mask=am, position_ids=pos, use_cache=max_new_tokens > 0,
                logits_to_keep=1)
    first = res.logits[:, -1].float().cpu()
    if max_new_tokens <= 0:
        return out, first
    cache = res.cache
    alive = torch.arange(n)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long) if eos else None
    can_prune = hasattr(cache, "batch_select_indices")
    finished: set[int] = set()
    for step in range(max_new_tokens):
        last = res.logits[:, -1]
        nxt = last.argmax(-1)
        nxt_cpu = nxt.cpu()
        done = torch.isin(nxt_cpu, eos_t) if eos_t is not None else torch.zeros(len(alive), dtype=torch.bool)
        lp = (last.float().log_softmax(-1).gather(1, nxt[:, None])[:, 0].cpu().tolist() if logprobs is not None
              else None)
        for j, (row, tok, d) in enumerate(zip(alive.tolist(), nxt_cpu.tolist(), done.tolist(), strict=True)):
            if row in finished:  # only where the cache cannot drop rows: a finished row gets no more tokens
                continue
            if keep_eos or not d:
                out[row].append(tok)
                if lp is not None:
                    logprobs[row].append(lp[j])  # type: ignore[index]
            if stop_at_refusal is not None and not d and stop_at_refusal.is_refusal(
                    lm.tokenizer.decode(out[row], skip_special_tokens=True)):
                done[j] = True  # the verdict is known: a marker, once in the text, stays in it
            if done[j]:
                finished.add(row)
        if len(finished) == n:
            break
        if step == max_new_tokens - 1:
            break
        if can_prune and bool(done.any()):
            keep = (~done).nonzero().flatten()
            if len(keep) == 0:
                break
            alive, nxt, am, pos = alive[keep], nxt[keep.to(nxt.device)], am[keep.to(am.device)], pos[keep.to(pos.device)]
            cache.batch_select_indices(keep.to(nxt.device))
        am = torch.cat([am, am.new_ones(am.shape[0], 1)], 1)
        pos = pos[:, -1:] + 1
        res = model(input_ids=nxt[:, None].to(am.device), attention_mask=am, position_ids=pos, cache=cache,
                    use_cache=True)
    return out, first


@overload
def generate_ids(lm: Any, prompts: Sequence[str], max_new_tokens: int = ..., batch_size: int = ...,
                 system: str | None = ..., progress: bool = ..., keep_eos: bool = ...,
                 return_logits: Literal[False] = ..., token_logprobs: list[list[float]] | None = ...,
                 stop_at_refusal: SubstringDetector | None = ...) -> list[list[int]]: ...
@overload
def generate_ids(lm: Any, prompts: Sequence[str], max_new_tokens: int = ..., batch_size: int = ...,
                 system: str | None = ..., progress: bool = ..., keep_eos: bool = ..., *,
                 return_logits: Literal[True], token_logprobs: list[list[float]] | None = ...,
                 stop_at_refusal: SubstringDetector | None = ...) -> tuple[list[list[int]], Tensor]: ...
def generate_ids(
    lm: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 64,
    system: str | None = None,
    progress: bool = False,
    keep_eos: bool = False,
    return_logits: bool = False,
    token_logprobs: list[list[float]] | None = None,
    stop_at_refusal: SubstringDetector | None = None,
) -> list[list[int]] | tuple[list[list[int]], Tensor]:
    """Greedy response token ids of each prompt, up to the first EOS (dropped, or kept with ``keep_eos``).

    Prompts are batched by length (less padding) and returned in input order. A row stops at the model's
    EOS token and leaves the batch; big batches matter on CPU, where a decode step of 16 rows costs nearly
    as much as one of 64. ``return_logits`` also returns each prompt's last-position logits ``[n, d_vocab]``
    (float32, CPU), read off the prefill: the logit refusal score at no extra forward. ``token_logprobs`` (an
    empty list) is filled with one list per prompt: each response token's log-probability under the generating
    model, read off the decoding logits (the completion's NLL at no extra forward).

    ``stop_at_refusal`` (a :class:`SubstringDetector`): a row also leaves the batch at the token with which the
    detector first finds a refusal marker in its decoded response, so its ids end there. Only for callers that
    read nothing but that detector's verdict (and the first tokens): the verdict equals the full generation's,
    because a marker in a text stays in every longer text. The texts are shorter, so never for graded outcomes
    (:mod:`mech.grading` reads the whole completion: a refusal that degenerates into a loop is incoherent).
    """
    eos = _eos_ids(lm)
    lps: list[list[float]] = [[] for _ in prompts]
    enc_all = lm.encode_chat(list(prompts), system=system)
    order = sorted(range(len(prompts)), key=lambda i: (len(enc_all[i]), i))
    out: list[list[int]] = [[] for _ in prompts]
    logits: Tensor | None = None
    for i in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
        rows = order[i : i + batch_size]
        enc = pad_left([enc_all[r] for r in rows], lm.tokenizer.pad_token_id, lm.input_device)
        row_lps: list[list[float]] | None = [[] for _ in rows] if token_logprobs is not None else None
        ids, first = _greedy_batch(lm, enc, max_new_tokens, eos, keep_eos, row_lps, stop_at_refusal)
        for j, (r, row_ids) in enumerate(zip(rows, ids, strict=True)):
            out[r] = row_ids
            if row_lps is not None:
                lps[r] = row_lps[j]
        if return_logits:
            if logits is None:
                logits = torch.empty(len(prompts), first.shape[-1])
            logits[torch.tensor(rows)] = first
    if token_logprobs is not None:
        token_logprobs[:] = lps
    if return_logits:
        return out, logits if logits is not None else torch.empty(0, 0)
    return out


def generate(lm: Any, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 64, **kw: Any) -> list[str]:
    """Greedy completions (:func:`generate_ids`): the text of the response only, special tokens dropped.
    ``kw``: :func:`generate_ids`' ``system``, ``progress`` and ``stop_at_refusal``."""
    ids = generate_ids(lm, prompts, max_new_tokens, batch_size, **kw)
    return lm.tokenizer.batch_decode(ids, skip_special_tokens=True)


def generate_completions(lm: Any, prompts: Sequence[str], max_new_tokens: int = 64, self_nll: bool = False,
                         **kw: Any) -> list[dict[str, Any]]:
    """Greedy completions with what grading needs: ``text`` (full, special tokens dropped), the response token
    ``ids`` and ``cut_off`` (``True`` when the row hit ``max_new_tokens`` without an end-of-sequence token).
    ``self_nll``: also each token's ``logprobs`` under the generating model — the coherence NLL for free, valid
    only when that model is the unmodified one. ``kw``: :func:`generate_ids`' ``batch_size``, ``system``,
    ``progress``."""
    lps: list[list[float]] | None = [] if self_nll else None
    ids = generate_ids(lm, prompts, max_new_tokens, token_logprobs=lps, **kw)
    texts = lm.tokenizer.batch_decode(ids, skip_special_tokens=True)
    rows = [{"text": t, "ids": list(r), "cut_off": len(r) >= max_new_tokens} for t, r in zip(texts, ids, strict=True)]
    if lps is not None:
        for row, lp in zip(rows, lps, strict=True):
            row["logprobs"] = [round(x, 5) for x in lp]
    return rows


@dataclass(frozen=True)
class RefusalTokens:
    """The first tokens of the model's own refusals, with how they were found."""

    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    counts: tuple[int, ...]
    source: str  # "derived" from generations, or "fallback" when the model refused none of the probes

    def to_dict(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "tokens": list(self.tokens), "counts": list(self.counts), "source": self.source}


FALLBACK_OPENINGS = ("I", "As")


def derive_refusal_tokens(
    lm: Any,
    harmful_prompts: Sequence[str],
    detector: SubstringDetector | None = None,
    max_new_tokens: int = 24,
    min_share: float = 0.05,
    batch_size: int = 16,
) -> RefusalTokens:
    """Find the refusal token set from the model's actual refusals of ``harmful_prompts``.

    Greedy-generates each prompt; among responses the detector calls refusals, counts the first response
    token; keeps tokens that start at least ``min_share`` of the refusals. If the model refuses none, falls
    back to the first tokens of the usual openings ("I", "As") in this tokenizer.
    """
    detector = detector or SubstringDetector()
    tok = lm.tokenizer
    firsts: Counter[int] = Counter()
    # only the detector's verdict and the first token are read: a row stops once its refusal is detected
    rows = generate_ids(lm, harmful_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        stop_at_refusal=detector)
    for row, text in zip(rows, tok.batch_decode(rows, skip_special_tokens=True), strict=True):
        if row and detector.is_refusal(text):
            firsts[row[0]] += 1
    total = sum(firsts.values())
    kept = [(t, c) for t, c in firsts.most_common() if total and c / total >= min_share]
    if kept:
        return RefusalTokens(
            ids=tuple(t for t, _ in kept),
            tokens=tuple(tok.convert_ids_to_tokens(t) for t, _ in kept),
            counts=tuple(c for _, c in kept),
            source="derived",
        )
    ids = []
    for word in FALLBACK_OPENINGS:
        enc = tok(word, add_special_tokens=False)["input_ids"]
        if enc and enc[0] not in ids:
            ids.append(enc[0])
    return RefusalTokens(
        ids=tuple(ids), tokens=tuple(tok.convert_ids_to_tokens(i) for i in ids), counts=(0,) * len(ids), source="fallback"
    )


def measure(
    lm: Any,
    prompts: Sequence[str],
    refusal_ids: Sequence[int],
    max_new_tokens: int = 64,
    batch_size: int = 64,
    judges: Sequence[Judge] = (),
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The logit score and a greedy completion of each prompt, with the substring verdict.

    Per prompt: ``score`` (logit refusal log-odds), ``refused`` (substring detector on a greedy completion of
    ``max_new_tokens``), one boolean per extra judge under its name, the full completion ``text``, its token
    ``ids``, their ``logprobs`` under the model and ``cut_off`` (for grading: :mod:`mech.grading`), and ``response``, the text clipped to
    :data:`REPORT_CHARS` characters (what reports may show; never write ``text`` into a report).
    """
    check_refusal_ids(refusal_ids, vocab_size(lm))  # before any forward
    detector = SubstringDetector()
    lps: list[list[float]] = []
    ids, logits = generate_ids(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=progress, return_logits=True, token_logprobs=lps)
    scores = refusal_log_odds(logits, refusal_ids)  # the generation's prefill: no second forward
    responses = lm.tokenizer.batch_decode(ids, skip_special_tokens=True)
    refused = detector(prompts, responses)
    extra = {j.name: j(prompts, responses) for j in judges}
    return [
        {
            "prompt": p,
            "score": float(s),
            "refused": bool(r),
            **{name: bool(v[i]) for name, v in extra.items()},
            "response": clip(resp),
            "text": resp,
            "ids": list(ids[i]),
            "logprobs": [round(x, 5) for x in lps[i]],
            "cut_off": len(ids[i]) >= max_new_tokens,
        }
        for i, (p, s, r, resp) in enumerate(zip(prompts, scores.tolist(), refused, responses, strict=True))
    ]
