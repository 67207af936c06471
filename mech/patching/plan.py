"""Sweep inputs, checked and planned before any forward: pairs, the metric, each patch's sites per pair.

:func:`prepare_sweep` is the one entry of exact and attribution sweeps: it checks the arguments (one-line
:class:`~mech.patching.spec.PatchingError` s), tokenizes the pairs once and resolves every patch's sites to
end-aligned positions per pair (a :class:`Plan`); the returned :class:`PreparedSweep` also packs the sweep's
device tensors into a :class:`~mech.patching.result.PatchResult` with its metadata (one host sync).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import torch
from torch import Tensor

from mech.chat import TemplateError, template_suffix_len
from mech.patching.result import PatchResult
from mech.patching.spec import (
    DENOISE,
    Patch,
    PatchDirection,
    PatchingError,
    Site,
    end_positions,
    normalize_direction,
)
from mech.refusal import RefusalIdsError, check_refusal_ids, refusal_log_odds, vocab_size

if TYPE_CHECKING:
    from mech.engine import Work
    from mech.models import LoadedModel


Method = Literal["auto", "fast", "naive"]


_PAIRS_FIX = "pass a list of (harmful, harmless) tuples, e.g. [(harmful_text, harmless_text)] or prompt_set.pairs()"


def _pair_text(x: Any, where: str) -> str:
    text = x if isinstance(x, str) else getattr(x, "prompt", None)
    if not isinstance(text, str):
        raise PatchingError(f"{where} is a {type(x).__name__}, not a prompt text or Prompt; {_PAIRS_FIX}")
    if not text.strip():
        raise PatchingError(f"{where} is an empty prompt; {_PAIRS_FIX}")
    return text


def as_pairs(pairs: Any) -> list[tuple[str, str]]:
    """``(harmful, harmless)`` text pairs from tuples of strings or of :class:`~mech.prompts.Prompt`, or dicts with
    ``harmful``/``harmless`` keys (the workload file's format).

    Raises :class:`PatchingError` (one line) for anything else, e.g. one pair passed as two bare strings
    (``("harmful", "harmless")`` instead of ``[("harmful", "harmless")]``), a PromptSet instead of its
    ``.pairs()``, a tuple of other than two items, or Prompts whose labels are the wrong way round."""
    if pairs is None or isinstance(pairs, (str, bytes, Mapping)):
        what = "one string" if isinstance(pairs, (str, bytes)) else (
            "one dict (a single pair?)" if isinstance(pairs, Mapping) else "None")
        raise PatchingError(f"pairs is {what}, not a list of pairs; {_PAIRS_FIX}")
    try:
        items = list(pairs)
    except TypeError:
        raise PatchingError(f"pairs is a {type(pairs).__name__}, not a list of pairs; {_PAIRS_FIX}") from None
    out = []
    for i, p in enumerate(items):
        if isinstance(p, Mapping):
            missing = [k for k in ("harmful", "harmless") if k not in p]
            if missing:
                raise PatchingError(f"pairs[{i}] has no {' or '.join(repr(k) for k in missing)} key; {_PAIRS_FIX}")
            a, b = p["harmful"], p["harmless"]
        elif isinstance(p, (str, bytes)):
            hint = (" (one pair of two strings? wrap it in a list: [(harmful, harmless)])"
                    if len(items) == 2 and all(isinstance(x, str) for x in items) else "")
            raise PatchingError(f"pairs[{i}] is a string, not a (harmful, harmless) pair{hint}; {_PAIRS_FIX}")
        elif isinstance(p, (tuple, list)):
            if len(p) != 2:
                raise PatchingError(f"pairs[{i}] has {len(p)} items, not 2 (harmful, harmless); {_PAIRS_FIX}")
            a, b = p
        else:
            raise PatchingError(f"pairs[{i}] is a {type(p).__name__}, not a (harmful, harmless) pair; {_PAIRS_FIX}")
        la, lb = getattr(a, "label", None), getattr(b, "label", None)
        if (la, lb) == ("harmless", "harmful"):
            raise PatchingError(
                f"pairs[{i}] is ({la}, {lb}); the order is (harmful, harmless): swap the two (prompt_set.pairs() "
                "returns them in that order)"
            )
        out.append((_pair_text(a, f"pairs[{i}][0]"), _pair_text(b, f"pairs[{i}][1]")))
    if not out:
        raise PatchingError("no pairs given; pass at least one (harmful, harmless) pair")
    return out



@dataclass(frozen=True)
class RefusalMetric:
    """The logit refusal score (:func:`mech.refusal.refusal_log_odds`) on last-position logits ``[B, d_vocab]``."""

    ids: tuple[int, ...]
    name: str = "refusal_log_odds"

    def __call__(self, logits: Tensor) -> Tensor:
        return refusal_log_odds(logits, self.ids)


Metric = Callable[[Tensor], Tensor]  # logits [B, d_vocab] -> [B]


def make_metric(refusal_ids: Sequence[int] | None, metric: Metric | None, d_vocab: int | None = None) -> Metric:
    """``metric`` if given, else the refusal log-odds of ``refusal_ids`` (checked: non-empty, integers, each
    below ``d_vocab`` when given; :class:`PatchingError` otherwise)."""
    if metric is not None:
        if not callable(metric):
            raise PatchingError(f"metric must be a callable logits [B, d_vocab] -> [B], got a {type(metric).__name__}")
        return metric
    if refusal_ids is None:
        raise PatchingError("pass refusal_ids= (e.g. the refusal_tokens fixture's ids) or a metric= callable")
    try:
        return RefusalMetric(check_refusal_ids(refusal_ids, d_vocab))
    except RefusalIdsError as e:
        raise PatchingError(str(e)) from None


def _logits_device(lm: LoadedModel) -> torch.device:
    head = lm.model.get_output_embeddings()
    dev = head.weight.device if head is not None else torch.device("cpu")
    return torch.device("cpu") if dev.type == "meta" else dev


def check_metric(lm: LoadedModel, metric: Metric, d_vocab: int | None = None) -> None:
    """Call ``metric`` once on zero logits ``[2, d_vocab]`` (no forward) and check it returns one value per
    row, ``[2]``: a metric of the wrong shape is a one-line :class:`PatchingError` before the sweep starts."""
    if isinstance(metric, RefusalMetric):
        return
    d_vocab = d_vocab or vocab_size(lm)
    if not d_vocab:
        return
    name = metric_name(metric)
    try:
        with torch.no_grad():
            out = metric(torch.zeros(2, d_vocab, device=_logits_device(lm)))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise PatchingError(
            f"metric {name!r} failed on logits of shape [2, {d_vocab}] ({type(e).__name__}: {first}); a metric "
            "maps last-position logits [B, d_vocab] to one value per row, shape [B]"
        ) from e
    if not isinstance(out, Tensor):
        raise PatchingError(f"metric {name!r} returned a {type(out).__name__}, expected a tensor of shape [B] "
                            "(one value per row of logits [B, d_vocab])")
    if tuple(out.shape) != (2,):
        raise PatchingError(
            f"metric {name!r} returned shape {list(out.shape)} for logits [2, {d_vocab}]; expected [2]: one value "
            "per row (reduce over the vocabulary, not over the batch)"
        )


def metric_name(metric: Metric) -> str:
    """A metric's display name (its ``name``, ``__name__`` or type)."""
    return str(getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__)


@dataclass
class Plan:
    """A sweep's tokenized inputs: receivers/sources per pair and each patch's sites resolved per pair.

    ``neg[i][j]``: the sites of patch ``j`` for pair ``i``, each with its end-aligned positions (negative).
    ``window``: the most end positions any (pair, patch) touches (the patched window ``W`` of the engine)."""

    recv: list[list[int]]  # unique receiver token lists
    src: list[list[int]]  # unique source token lists
    pair_recv: list[int]  # pair -> index into recv
    pair_src: list[int]
    neg: list[list[list[tuple[Site, tuple[int, ...]]]]]  # [pair][patch] -> [(site, end-aligned positions)]
    window: int  # W_max: the largest window any (pair, patch) needs


def _unique(seqs: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    seen: dict[tuple[int, ...], int] = {}
    for s in seqs:
        seen.setdefault(tuple(s), len(seen))
    return [list(k) for k in seen], [seen[tuple(s)] for s in seqs]


def make_plan(
    lm: LoadedModel, pairs: list[tuple[str, str]], patches: Sequence[Patch], direction: PatchDirection, system: str | None,
    check_aligned: bool,
) -> Plan:
    """Tokenize the pairs once and resolve every patch's sites to end-aligned positions per pair (checked:
    layers, units, positions inside the prompts, absolute positions only on equal lengths, the same tokens at
    end-aligned positions unless ``check_aligned=False``)."""
    shape = lm.shape
    harmful = lm.encode_chat([a for a, _ in pairs], system=system)
    harmless = lm.encode_chat([b for _, b in pairs], system=system)
    src_tok, rcv_tok = (harmful, harmless) if direction == DENOISE else (harmless, harmful)
    for patch in patches:
        for site in patch.sites:
            top = shape.n_layers - 1
            if not 0 <= site.layer <= top:
                raise PatchingError(f"layer {site.layer} out of range: the model has {shape.n_layers} layers (0..{top})")
            if site.index is not None:
                limit = site.spec.features(shape)
                bad = [i for i in site.index if not 0 <= i < limit]
                if bad:
                    raise PatchingError(f"{site.spec.unit} {bad[0]} out of range at layer {site.layer}: 0..{limit - 1}")
    neg: list[list[list[tuple[Site, tuple[int, ...]]]]] = []
    window = 1
    for i, (r, s) in enumerate(zip(rcv_tok, src_tok, strict=True)):
        row = []
        need = 1
        for patch in patches:
            sites = []
            for site in patch.sites:
                if site.positions[0] >= 0:
                    if len(r) != len(s):
                        raise PatchingError(
                            f"pair {i}: absolute positions need prompts of equal token length ({len(r)} vs {len(s)}); "
                            "use end-aligned (negative) positions"
                        )
                    pos = tuple(p - len(r) for p in site.positions)
                else:
                    pos = site.positions
                if min(pos) < -min(len(r), len(s)) or max(pos) >= 0:
                    raise PatchingError(
                        f"pair {i}: position {site.positions} outside the prompts ({len(r)} and {len(s)} tokens)"
                    )
                need = max(need, -min(pos))
                sites.append((site, pos))
            row.append(sites)
        if check_aligned:
            end_aligned = any(st.positions[0] < 0 for p in patches for st in p.sites)
            k = max((-min(pos) for sites in row for st, pos in sites if st.positions[0] < 0), default=0)
            if end_aligned and r[len(r) - k :] != s[len(s) - k :]:
                raise PatchingError(
                    f"pair {i}: the last {k} tokens differ between source and receiver; patch only the template's "
                    f"{template_suffix_len(lm, system)} post-instruction positions, or pass check_aligned=False"
                )
        window = max(window, need)
        neg.append(row)
    recv, pair_recv = _unique(rcv_tok)
    src, pair_src = _unique(src_tok)
    return Plan(recv, src, pair_recv, pair_src, neg, window)



def sweep_positions(lm: LoadedModel, positions: Sequence[int] | None, system: str | None) -> tuple[int, ...]:
    """``positions``, or by default the chat template's post-instruction positions (end-aligned)."""
    if positions is not None:
        return tuple(positions)
    try:
        return end_positions(template_suffix_len(lm, system))
    except TemplateError as e:
        raise PatchingError(str(e)) from None


@dataclass
class PreparedSweep:
    """A sweep's checked arguments and its :class:`Plan` (what :func:`prepare_sweep` returns)."""

    direction: PatchDirection
    pairs: list[tuple[str, str]]
    patches: list[Patch]
    metric: Metric
    method: Literal["fast", "naive"]
    plan: Plan
    t0: float = 0.0  # when the sweep's compute started (set by :meth:`start`)

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def meta(self, lm: LoadedModel, method: str) -> dict[str, Any]:
        ids = getattr(self.metric, "ids", None)
        return {
            "model": getattr(lm, "name", "model"),
            "fingerprint": getattr(lm, "fingerprint", None),
            "n_layers": lm.shape.n_layers,
            "n_heads": lm.shape.n_heads,
            "d_mlp": lm.shape.d_mlp,
            "pairs": [{"harmful": a, "harmless": b} for a, b in self.pairs],
            "direction": self.direction,
            "method": method,
            "metric": metric_name(self.metric),
            "refusal_ids": None if ids is None else list(ids),
            "window": self.plan.window,
        }

    def result(
        self, lm: LoadedModel, values: Tensor, clean: Tensor, source: Tensor, work: Work, *, kind: str,
        estimate: bool = False, logits: Tensor | None = None,
    ) -> PatchResult:
        """Pack device tensors into a :class:`PatchResult` (the sweep's one host sync). ``values``
        ``[n_pairs, n_patches]``: the patched metric, or with ``estimate`` the AtP estimate of its change (then
        ``raw`` = clean + estimate and ``method="atp"``)."""
        packed = torch.cat([values.flatten(), clean, source]).detach().float().cpu().numpy()
        work.seconds = time.perf_counter() - self.t0
        n_pairs, n_patches = values.shape
        vals = packed[: n_pairs * n_patches].reshape(n_pairs, n_patches)
        clean_np = packed[n_pairs * n_patches : n_pairs * n_patches + n_pairs]
        meta = self.meta(lm, f"atp-{self.method}" if estimate else self.method)
        meta["work"] = work.to_dict()
        meta["seconds"] = work.seconds
        return PatchResult(
            kind=kind,
            method="atp" if estimate else self.method,
            direction=self.direction,
            patches=self.patches,
            raw=clean_np[:, None] + vals if estimate else vals,
            clean=clean_np,
            source=packed[n_pairs * n_patches + n_pairs :],
            meta=meta,
            logits=logits,
        )


class SweepOptions(TypedDict, total=False):
    """The keyword arguments every exact and attribution sweep takes (defaults: :func:`prepare_sweep`)."""

    direction: str
    refusal_ids: Sequence[int] | None
    metric: Metric | None
    method: Method
    system: str | None
    check_aligned: bool


def prepare_sweep(
    lm: LoadedModel,
    pairs: Any,
    patches: Sequence[Patch],
    *,
    direction: str = DENOISE,
    refusal_ids: Sequence[int] | None = None,
    metric: Metric | None = None,
    method: Method = "auto",
    system: str | None = None,
    check_aligned: bool = True,
) -> PreparedSweep:
    """Checks and normalizes a sweep's arguments (exact or AtP): one-line :class:`PatchingError` s before any
    forward.

    ``pairs``: ``(harmful, harmless)`` texts (or Prompts, or dicts). ``direction``: ``harmful_to_harmless``
    (source harmful, receiver harmless; alias ``denoise``) or ``harmless_to_harmful`` (``noise``). The metric is
    ``metric(logits[B, d_vocab]) -> [B]`` on the receiver's last-position logits, by default the refusal
    log-odds of ``refusal_ids``. ``method``: ``fast`` (batched partial forwards), ``naive`` (hooks on full HF
    forwards) or ``auto`` (fast, or naive on a model sharded over devices or offloaded by accelerate, where hooks
    move activations to each layer's device). ``system``: a system prompt for every chat-formatted prompt.
    ``check_aligned``: end-aligned positions must hold the same tokens in source and receiver."""
    direction_n = normalize_direction(direction)
    pairs_t = as_pairs(pairs)
    patches = list(patches)
    if not patches:
        raise PatchingError("no patches given")
    d_vocab = vocab_size(lm)
    met = make_metric(refusal_ids, metric, d_vocab)
    check_metric(lm, met, d_vocab)
    if method not in ("fast", "naive", "auto"):
        raise PatchingError(f"unknown method {method!r}; use auto, fast or naive")
    chosen: Literal["fast", "naive"] = (
        ("naive" if getattr(lm, "sharded", False) else "fast") if method == "auto" else method
    )
    plan = make_plan(lm, pairs_t, patches, direction_n, system, check_aligned)
    return PreparedSweep(direction_n, pairs_t, patches, met, chosen, plan)
