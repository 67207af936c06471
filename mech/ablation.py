"""Necessity: zero- and mean-ablation of heads, neurons and blocks, cumulative curves, random-component controls.

Patching shows that a component is *sufficient* to move refusal; ablation asks whether it is *necessary*.

Components
    :class:`Component` ``(kind, layer, index)`` with a stable id: ``"L12.H3"`` (attention head: its slice of
    ``blocks.L.attn.hook_z``), ``"L5.N1234"`` (MLP neuron: one unit of ``blocks.L.mlp.hook_post``, the
    down_proj input), ``"L7.attn"`` (``blocks.L.hook_attn_out``), ``"L7.mlp"`` (``blocks.L.hook_mlp_out``).

Ablation (:func:`ablate`, a context manager over :func:`mech.hooks.hooks`, so hooks are removed on error)
    ``zero``: the activation is set to 0. ``mean``: it is set to its mean over a reference set (the harmless
    prompts; :func:`mean_activations`). Two mean conventions (``mode``):

    * ``"end_aligned"`` (default): the last ``n_end`` positions of a forward (the chat template's
      post-instruction tokens, identical across prompts) get the mean *at that end-aligned position*; every
      earlier position gets the mean over all real (non-pad) tokens of the reference prompts. A forward shorter
      than ``n_end`` (a cached decoding step during generation) gets the all-token mean.
    * ``"averaged"``: every position gets the mean over all real tokens.

    ``positions`` (optional, negative = end-aligned) restricts the ablation to those positions of each forward.

Parameter fractions (:func:`param_fraction`, :func:`param_breakdown`)
    The denominator is **every unique parameter of the model**, embeddings and norms included (a tied
    ``lm_head`` is counted once; an untied one is counted). A **head** owns its ``d_head`` rows of ``q_proj``
    (and biases), its ``d_head`` input columns of ``o_proj``, and a ``1/(n_heads/n_kv_heads)`` share of the
    rows (and biases) of the key/value head it reads, since a KV head is shared by that many query heads. So
    every head of a layer owns the same count: ``(|q_proj| + |k_proj| + |v_proj| + |o_proj.weight|) / n_heads``.
    A **neuron** owns its ``gate_proj`` and ``up_proj`` rows (and biases) and its ``down_proj`` column:
    ``(|gate_proj| + |up_proj| + |down_proj.weight|) / d_mlp``. A **block** (``attn`` / ``mlp``) owns every
    parameter of its module. All heads + all neurons + attention/MLP leftovers (an o_proj / down_proj bias,
    q/k norms) + norms + embeddings (+ an untied lm_head) = 1.

Evaluating an intervention (shared with :mod:`mech.directions`)
    :func:`make_baseline` measures the unmodified model once — logit refusal scores of harmful and harmless
    prompts, the harmless first-token distributions, greedy completions of the harmless prompts (for the
    cross-entropy side effect), optionally generations + substring-detector refusals, and the benign-but-alarming
    set. :func:`evaluate_intervention` measures the same under any intervention context manager and returns an
    :class:`InterventionResult` (JSON-ready via ``to_dict``).

Controls
    :func:`cumulative_ablation` ablates the top-k of a ranking for each k and compares each with ``n_random``
    (≥ 20) sets of the same size and kind drawn uniformly (seeded :class:`numpy.random.Generator`) from all
    components of that kind: a permutation p-value (+1 corrected) for "the ranked set lowers the harmful refusal
    score more than chance".
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mech.hooks import HookPoint, decoder_layers, hook_name, hooks
from mech.models import pad_left
from mech.refusal import SubstringDetector, generate, last_logits, refusal_log_odds
from mech.stats import PermutationResult, RateCI, binomial_rate, jsonable, mcnemar_exact, permutation_pvalue

__all__ = [
    "COMPONENT_KINDS",
    "AblationMethod",
    "Baseline",
    "Component",
    "CumulativePoint",
    "CumulativeResult",
    "InterventionResult",
    "MeanActivations",
    "ScoreChange",
    "ablate",
    "all_components",
    "component_param_count",
    "completion_cross_entropy",
    "cumulative_ablation",
    "evaluate_ablation",
    "evaluate_intervention",
    "first_token_kl",
    "greedy_completion_ids",
    "individual_ablations",
    "make_baseline",
    "mean_activations",
    "param_breakdown",
    "param_fraction",
    "random_components",
]

ComponentKind = Literal["head", "neuron", "attn", "mlp"]
AblationMethod = Literal["zero", "mean"]
MeanMode = Literal["end_aligned", "averaged"]
COMPONENT_KINDS: tuple[str, ...] = ("head", "neuron", "attn", "mlp")
_HOOK_OF_KIND = {"head": "attn.hook_z", "neuron": "mlp.hook_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}
_ID_RE = re.compile(r"^L(\d+)\.(?:H(\d+)|N(\d+)|(attn)|(mlp))$")


# ------------------------------------------------------------------------------------------ components


@dataclass(frozen=True, order=True)
class Component:
    """One ablatable unit: ``kind`` in head | neuron | attn | mlp, its layer, and the head/neuron index."""

    kind: str
    layer: int
    index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in COMPONENT_KINDS:
            raise ValueError(f"unknown component kind {self.kind!r}; use one of {', '.join(COMPONENT_KINDS)}")
        if (self.index is None) != (self.kind in ("attn", "mlp")):
            raise ValueError(f"a {self.kind} component {'needs' if self.kind in ('head', 'neuron') else 'takes no'} an index")

    @property
    def id(self) -> str:
        """Stable string id: ``L12.H3``, ``L5.N1234``, ``L7.attn``, ``L7.mlp``."""
        if self.kind == "head":
            return f"L{self.layer}.H{self.index}"
        if self.kind == "neuron":
            return f"L{self.layer}.N{self.index}"
        return f"L{self.layer}.{self.kind}"

    @property
    def hook(self) -> str:
        """The hook name this component lives in."""
        return hook_name(self.layer, _HOOK_OF_KIND[self.kind])

    @classmethod
    def parse(cls, text: str) -> Component:
        """Inverse of :attr:`id`."""
        m = _ID_RE.match(text.strip())
        if not m:
            raise ValueError(f"bad component id {text!r}; use L<layer>.H<head>, L<layer>.N<neuron>, L<layer>.attn or L<layer>.mlp")
        layer = int(m.group(1))
        if m.group(2) is not None:
            return cls("head", layer, int(m.group(2)))
        if m.group(3) is not None:
            return cls("neuron", layer, int(m.group(3)))
        return cls("attn" if m.group(4) else "mlp", layer)

    def __str__(self) -> str:
        return self.id


def _as_component(c: Component | str) -> Component:
    return c if isinstance(c, Component) else Component.parse(c)


def all_components(lm: Any, kind: str, layers: Sequence[int] | None = None) -> list[Component]:
    """Every component of ``kind`` in the model (optionally only in ``layers``), in (layer, index) order."""
    s = lm.shape
    layers = range(s.n_layers) if layers is None else layers
    if kind == "head":
        return [Component("head", L, h) for L in layers for h in range(s.n_heads)]
    if kind == "neuron":
        return [Component("neuron", L, n) for L in layers for n in range(s.d_mlp)]
    if kind in ("attn", "mlp"):
        return [Component(kind, L) for L in layers]
    raise ValueError(f"unknown component kind {kind!r}; use one of {', '.join(COMPONENT_KINDS)}")


def _check(lm: Any, c: Component) -> None:
    s = lm.shape
    if not 0 <= c.layer < s.n_layers:
        raise ValueError(f"component {c.id}: layer out of range 0..{s.n_layers - 1}")
    limit = {"head": s.n_heads, "neuron": s.d_mlp}.get(c.kind)
    if limit is not None and not 0 <= (c.index or 0) < limit:
        raise ValueError(f"component {c.id}: index out of range 0..{limit - 1}")


# ------------------------------------------------------------------------------------- param fractions


def _numel(p: Tensor) -> int:
    qs = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: the stored tensor is packed
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(np.prod(tuple(qs.shape)))
    return int(p.numel())


_HEAD_PARAMS = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$|\.self_attn\.o_proj\.weight$")
_NEURON_PARAMS = re.compile(r"\.mlp\.(gate_proj|up_proj)\.(weight|bias)$|\.mlp\.down_proj\.weight$")


def param_breakdown(lm: Any) -> dict[str, int]:
    """Parameter counts by owner; the values other than ``total`` sum to ``total`` (unique parameters).

    Keys: ``heads`` (q/k/v weights and biases + o_proj weights), ``attn_other`` (the rest of self_attn),
    ``neurons`` (gate/up weights and biases + down_proj weights), ``mlp_other``, ``norms``, ``embeddings``,
    ``lm_head`` (0 when tied to the embeddings), ``other``, ``total``.
    """
    out = dict.fromkeys(("heads", "attn_other", "neurons", "mlp_other", "norms", "embeddings", "lm_head", "other"), 0)
    for name, p in lm.model.named_parameters():  # remove_duplicate=True: a tied lm_head is counted once
        n = _numel(p)
        if _HEAD_PARAMS.search(name):
            out["heads"] += n
        elif ".self_attn." in name:
            out["attn_other"] += n
        elif _NEURON_PARAMS.search(name):
            out["neurons"] += n
        elif ".mlp." in name:
            out["mlp_other"] += n
        elif "embed_tokens" in name:
            out["embeddings"] += n
        elif name.startswith("lm_head"):
            out["lm_head"] += n
        elif "norm" in name:
            out["norms"] += n
        else:
            out["other"] += n
    out["total"] = sum(out.values())
    return out


def _module_params(module: torch.nn.Module, pattern: re.Pattern[str] | None = None) -> int:
    return sum(_numel(p) for n, p in module.named_parameters(prefix="x") if pattern is None or pattern.search(n))


def component_param_count(lm: Any, component: Component | str) -> float:
    """Parameters owned by one component (fractional for heads: the shared K/V share; see module doc)."""
    c = _as_component(component)
    _check(lm, c)
    block = decoder_layers(lm.model)[c.layer]
    if c.kind == "attn":
        return float(_module_params(block.self_attn))
    if c.kind == "mlp":
        return float(_module_params(block.mlp))
    if c.kind == "head":
        return _module_params(block.self_attn, re.compile(_HEAD_PARAMS.pattern.replace(r"\.self_attn", ""))) / lm.shape.n_heads
    return _module_params(block.mlp, re.compile(_NEURON_PARAMS.pattern.replace(r"\.mlp", ""))) / lm.shape.d_mlp


def param_fraction(lm: Any, components: Sequence[Component | str]) -> float:
    """Fraction of all model parameters (embeddings included) owned by ``components`` (duplicates once).

    A block and a head inside it overlap; their counts are simply added (don't mix them in one set).
    """
    unique = {_as_component(c) for c in components}
    return sum(component_param_count(lm, c) for c in unique) / param_breakdown(lm)["total"]


# -------------------------------------------------------------------------------------------- means


@dataclass
class MeanActivations:
    """Means of hook activations over a reference (harmless) prompt set, for mean-ablation.

    ``averaged[name]``: ``[*feat]`` mean over every real (non-pad) token; ``end_aligned[name]``:
    ``[n_end, *feat]`` mean at the end-aligned positions ``-n_end..-1`` (float32, CPU). ``*feat`` is
    ``[n_heads, d_head]`` for ``attn.hook_z``, ``[d_mlp]`` for ``mlp.hook_post``, ``[d_model]`` otherwise.
    """

    averaged: dict[str, Tensor]
    end_aligned: dict[str, Tensor]
    n_end: int
    n_prompts: int
    _cache: dict[tuple, Tensor] = field(default_factory=dict, repr=False)

    def replacement(self, name: str, n_pos: int, mode: MeanMode, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The mean to write at each of ``n_pos`` positions of one forward: ``[n_pos, *feat]``."""
        key = (name, n_pos, mode, device, dtype)
        if key not in self._cache:
            if name not in self.averaged:
                raise KeyError(f"no mean cached for {name}; compute mean_activations for its component kind")
            avg = self.averaged[name]
            rep = avg.expand(n_pos, *avg.shape).clone()
            if mode == "end_aligned" and n_pos >= self.n_end:
                rep[n_pos - self.n_end :] = self.end_aligned[name]
            elif mode not in ("end_aligned", "averaged"):
                raise ValueError(f"unknown mean mode {mode!r}; use end_aligned or averaged")
            self._cache[key] = rep.to(device=device, dtype=dtype)
        return self._cache[key]


@torch.inference_mode()
def mean_activations(
    lm: Any,
    prompts: Sequence[str],
    kinds: Sequence[str] = ("head",),
    n_end: int = 5,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
) -> MeanActivations:
    """Mean activations of the hook points of ``kinds`` (all layers, or ``layers``) over ``prompts``.

    Accumulated in float64 on the CPU. Every prompt must have at least ``n_end`` tokens.
    """
    layers = list(range(lm.shape.n_layers)) if layers is None else list(layers)
    names = [hook_name(L, _HOOK_OF_KIND[k]) for k in kinds for L in layers]
    sums: dict[str, Tensor] = {}
    ends: dict[str, Tensor] = {}
    count = 0
    n_tok = 0
    state: dict[str, Tensor] = {}

    def make(name: str) -> Callable[[Tensor, HookPoint], None]:
        def acc(x: Tensor, hook: HookPoint) -> None:
            mask = state["mask"].to(x.device, x.dtype).view(*state["mask"].shape, *[1] * (x.dim() - 2))
            s = (x * mask).sum((0, 1)).double().cpu()  # [*feat]
            e = x[:, -n_end:].sum(0).double().cpu()  # [n_end, *feat]
            sums[name] = sums[name] + s if name in sums else s
            ends[name] = ends[name] + e if name in ends else e

        return acc

    for i in range(0, len(prompts), batch_size):
        enc = lm.batch(list(prompts[i : i + batch_size]))
        lengths = enc["attention_mask"].sum(-1)
        if int(lengths.min()) < n_end:
            raise ValueError(f"mean_activations: a prompt has fewer than n_end={n_end} tokens")
        state["mask"] = enc["attention_mask"]
        with hooks(lm, [(n, make(n)) for n in names]):
            lm.model(**enc, logits_to_keep=1, use_cache=False)
        count += enc["input_ids"].shape[0]
        n_tok += int(lengths.sum())
    return MeanActivations(
        averaged={n: (sums[n] / n_tok).float() for n in names},
        end_aligned={n: (ends[n] / count).float() for n in names},
        n_end=n_end,
        n_prompts=count,
    )


# ------------------------------------------------------------------------------------------- ablation


def _unit_masks(lm: Any, components: Sequence[Component]) -> dict[str, Tensor]:
    """``{hook name: bool mask [*feat]}`` of the units to ablate at each hook point."""
    s = lm.shape
    masks: dict[str, Tensor] = {}
    for c in components:
        _check(lm, c)
        if c.kind == "head":
            m = masks.setdefault(c.hook, torch.zeros(s.n_heads, s.d_head, dtype=torch.bool))
            m[c.index] = True
        elif c.kind == "neuron":
            m = masks.setdefault(c.hook, torch.zeros(s.d_mlp, dtype=torch.bool))
            m[c.index] = True
        else:
            masks[c.hook] = torch.ones(s.d_model, dtype=torch.bool)
    return masks


@contextmanager
def ablate(
    lm: Any,
    components: Sequence[Component | str],
    method: AblationMethod = "zero",
    means: MeanActivations | None = None,
    mode: MeanMode = "end_aligned",
    positions: Sequence[int] | None = None,
) -> Iterator[None]:
    """Zero- or mean-ablate ``components`` for the duration of the block (hooks removed on exit or error).

    ``positions``: ``None`` ablates every position; otherwise the listed indices of each forward's sequence
    (negative = end-aligned). ``means`` is required for ``method="mean"`` (see :func:`mean_activations`).
    Ablating no component is the identity (no hook is attached).
    """
    comps = [_as_component(c) for c in components]
    if method not in ("zero", "mean"):
        raise ValueError(f"unknown ablation method {method!r}; use zero or mean")
    if method == "mean" and means is None:
        raise ValueError("mean-ablation needs means=mean_activations(lm, harmless_prompts, kinds)")
    masks = _unit_masks(lm, comps)
    dev_masks: dict[tuple[str, torch.device], Tensor] = {}

    def make(name: str) -> Callable[[Tensor, HookPoint], Tensor]:
        def fn(x: Tensor, hook: HookPoint) -> Tensor:  # x: [batch, pos, *feat]
            n_pos = x.shape[1]
            key = (name, x.device)
            if key not in dev_masks:
                dev_masks[key] = masks[name].to(x.device)
            m = dev_masks[key]  # [*feat]
            if positions is not None:
                pm = torch.zeros(n_pos, dtype=torch.bool, device=x.device)
                idx = [p if p >= 0 else n_pos + p for p in positions]
                pm[[i for i in idx if 0 <= i < n_pos]] = True
                m = pm.view(n_pos, *[1] * m.dim()) & m  # [pos, *feat]
            if method == "zero":
                rep = x.new_zeros(())
            else:
                assert means is not None
                rep = means.replacement(name, n_pos, mode, x.device, x.dtype)  # [pos, *feat]
            return torch.where(m, rep, x)

        return fn

    if not masks:  # ablating nothing: the identity
        yield
        return
    with hooks(lm, [(name, make(name)) for name in masks]):
        yield


# ------------------------------------------------------------------------------- side-effect measures


def first_token_kl(base_logits: Tensor, new_logits: Tensor) -> Tensor:
    """``KL(P_base || P_new)`` of next-token distributions per row: ``[n, d_vocab]`` x2 → ``[n]`` (nats)."""
    lp = base_logits.double().log_softmax(-1)
    lq = new_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp(min=0).float()


def greedy_completion_ids(
    lm: Any, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 64
) -> list[list[int]]:
    """Greedy response token ids of each prompt, cut after the first end-of-sequence token (kept)."""
    from mech.refusal import generate_ids

    return generate_ids(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, keep_eos=True)


@torch.inference_mode()
def completion_cross_entropy(
    lm: Any, prompts: Sequence[str], completions: Sequence[Sequence[int]], batch_size: int = 8
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


def _scores_and_logits(lm: Any, prompts: Sequence[str], ids: Sequence[int], bs: int) -> tuple[Tensor, Tensor]:
    """Logit refusal scores ``[n]`` and last-position logits ``[n, d_vocab]`` (float32, CPU)."""
    if not prompts:
        return torch.zeros(0), torch.zeros(0, lm.shape.d_vocab)
    logits = last_logits(lm, list(prompts), batch_size=bs)
    return refusal_log_odds(logits, list(ids)), logits


def _generated_refusals(lm: Any, prompts: Sequence[str], det: SubstringDetector, max_new: int, bs: int) -> list[bool]:
    if not prompts:
        return []
    return det(list(prompts), generate(lm, list(prompts), max_new_tokens=max_new, batch_size=bs))


def make_baseline(
    lm: Any,
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
        return jsonable(
            {"mean_before": self.mean_before, "mean_after": self.mean_after, "delta": self.delta,
             "before": list(self.before), "after": list(self.after)}
        )


@dataclass(frozen=True)
class GeneratedRefusals:
    """Substring-detector refusals on greedy generations before/after, with rates, CIs and McNemar."""

    before: tuple[bool, ...]
    after: tuple[bool, ...]
    rate_before: RateCI
    rate_after: RateCI
    mcnemar: Any  # McNemarResult

    @classmethod
    def of(cls, before: Sequence[bool], after: Sequence[bool]) -> GeneratedRefusals:
        return cls(tuple(before), tuple(after), binomial_rate(list(before)), binomial_rate(list(after)), mcnemar_exact(before, after))

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {"rate_before": self.rate_before, "rate_after": self.rate_after, "mcnemar": self.mcnemar,
             "before": list(self.before), "after": list(self.after)}
        )


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
        return jsonable({k: getattr(self, k) for k in self.__dataclass_fields__})

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)


def _tup(t: Tensor | None) -> tuple[float, ...]:
    return () if t is None else tuple(float(x) for x in t.tolist())


def evaluate_intervention(
    lm: Any,
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


# -------------------------------------------------------------------------------- ablation sweeps


def evaluate_ablation(
    lm: Any,
    baseline: Baseline,
    components: Sequence[Component | str],
    method: AblationMethod = "zero",
    means: MeanActivations | None = None,
    mode: MeanMode = "end_aligned",
    positions: Sequence[int] | None = None,
    name: str | None = None,
) -> InterventionResult:
    """Ablate ``components`` together and measure everything the baseline measured."""
    comps = [_as_component(c) for c in components]
    ids = [c.id for c in comps]
    target: dict[str, Any] = {"components": ids, "method": method, "positions": list(positions) if positions else None}
    if method == "mean":
        target["mean_mode"] = mode
    return evaluate_intervention(
        lm, baseline, lambda: ablate(lm, comps, method, means, mode, positions),
        name=name or f"{method}-ablate[{','.join(ids[:4])}{',...' if len(ids) > 4 else ''}]",
        kind=f"{method}_ablation", target=target, param_fraction=param_fraction(lm, comps),
    )


def individual_ablations(
    lm: Any,
    baseline: Baseline,
    components: Sequence[Component | str],
    method: AblationMethod = "zero",
    means: MeanActivations | None = None,
    mode: MeanMode = "end_aligned",
    positions: Sequence[int] | None = None,
) -> list[InterventionResult]:
    """One :func:`evaluate_ablation` per component (a per-component necessity sweep)."""
    return [evaluate_ablation(lm, baseline, [c], method, means, mode, positions, name=str(c)) for c in components]


def random_components(
    lm: Any,
    like: Sequence[Component | str],
    rng: np.random.Generator,
    pool: Sequence[Component | str] | None = None,
    match_layers: bool = False,
) -> list[Component]:
    """As many components of each kind as ``like`` has, drawn uniformly without replacement.

    From ``pool`` (default: every component of that kind in the model). ``match_layers``: as many of each kind
    *in each layer* as ``like`` has (the matched null for a ranked set, whose layers are not uniform).
    Reproducible under ``rng``'s seed.
    """
    if match_layers:
        groups = Counter((c.layer, c.kind) for c in (_as_component(x) for x in like))
        pool_m = None if pool is None else [_as_component(c) for c in pool]
        out_m: list[Component] = []
        for (layer, kind), need in sorted(groups.items()):
            if pool_m is None:
                cands = all_components(lm, kind, [layer])
            else:
                cands = [c for c in pool_m if c.layer == layer and c.kind == kind]
            if need > len(cands):
                raise ValueError(f"cannot draw {need} {kind} components in layer {layer} from a pool of {len(cands)}")
            out_m += [cands[int(i)] for i in sorted(rng.choice(len(cands), size=need, replace=False))]
        return out_m
    counts = Counter(_as_component(c).kind for c in like)
    pool_c = None if pool is None else [_as_component(c) for c in pool]
    out: list[Component] = []
    s = lm.shape
    per_layer = {"head": s.n_heads, "neuron": s.d_mlp, "attn": 1, "mlp": 1}
    for kind in sorted(counts):
        cands = None if pool_c is None else [c for c in pool_c if c.kind == kind]
        size = s.n_layers * per_layer[kind] if cands is None else len(cands)
        if counts[kind] > size:
            raise ValueError(f"cannot draw {counts[kind]} {kind} components from a pool of {size}")
        for i in sorted(int(i) for i in rng.choice(size, size=counts[kind], replace=False)):
            if cands is not None:
                out.append(cands[i])
            else:  # index i enumerates all_components(lm, kind) without building the list
                layer, unit = divmod(i, per_layer[kind])
                out.append(Component(kind, layer, unit if kind in ("head", "neuron") else None))
    return out


@torch.inference_mode()
def _harmful_mean(lm: Any, baseline: Baseline, ctx: AbstractContextManager[Any]) -> float:
    with ctx:
        logits = last_logits(lm, list(baseline.harmful), batch_size=baseline.batch_size)
    return float(refusal_log_odds(logits, list(baseline.refusal_ids)).double().mean())


@dataclass(frozen=True)
class CumulativePoint:
    """Ablating the top-``k`` of a ranking together vs ``n_random`` random sets of the same size and kind."""

    k: int
    ranked: InterventionResult
    random_sets: tuple[tuple[str, ...], ...]
    random_deltas: tuple[float, ...]  # change of the mean harmful refusal score per random set
    random_param_fraction: float  # mean over the random sets
    test: PermutationResult  # alternative "less": the ranked set lowers the score more than chance

    @property
    def delta(self) -> float:
        return self.ranked.harmful.delta

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {"k": self.k, "delta": self.delta, "param_fraction": self.ranked.param_fraction,
             "random_param_fraction": self.random_param_fraction, "p_value": self.test.p_value, "test": self.test,
             "random_deltas": list(self.random_deltas), "random_sets": [list(s) for s in self.random_sets],
             "ranked": self.ranked}
        )


@dataclass(frozen=True)
class CumulativeResult:
    """A cumulative ablation curve with its random controls."""

    name: str
    method: str
    ranking: tuple[str, ...]
    points: tuple[CumulativePoint, ...]
    n_random: int
    seed: int
    baseline_harmful_score: float

    def curve(self) -> dict[str, list[float]]:
        """Plot-ready columns: k, ranked delta, random mean delta, p-value, param fraction."""
        return {
            "k": [p.k for p in self.points],
            "delta": [p.delta for p in self.points],
            "random_mean_delta": [float(np.mean(p.random_deltas)) for p in self.points],
            "p_value": [p.test.p_value for p in self.points],
            "param_fraction": [p.ranked.param_fraction or 0.0 for p in self.points],
        }

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {"name": self.name, "method": self.method, "ranking": list(self.ranking), "n_random": self.n_random,
             "seed": self.seed, "baseline_harmful_score": self.baseline_harmful_score, "curve": self.curve(),
             "points": list(self.points)}
        )

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)


def cumulative_ablation(
    lm: Any,
    baseline: Baseline,
    ranking: Sequence[Component | str],
    ks: Sequence[int],
    method: AblationMethod = "zero",
    means: MeanActivations | None = None,
    mode: MeanMode = "end_aligned",
    positions: Sequence[int] | None = None,
    n_random: int = 20,
    seed: int = 0,
    pool: Sequence[Component | str] | None = None,
    name: str = "cumulative",
    runner: Any = None,
    match_layers: bool = False,
) -> CumulativeResult:
    """Ablate the top-k of ``ranking`` (most important first) for each k in ``ks``, with random controls.

    Each ranked set gets the full :func:`evaluate_ablation` (everything the baseline measures); each of the
    ``n_random`` control sets (same size and kinds, :func:`random_components` from ``pool``) only its mean
    harmful logit refusal score (one batched forward). The p-value is :func:`mech.stats.permutation_pvalue`
    with ``alternative="less"`` on the change of the mean harmful score. ``match_layers``: the random sets
    have the ranked set's count per layer (see :func:`random_components`). ``runner``: a
    :class:`mech.distributed.RayPool` scores the random sets on its workers (the same sets, the same numbers).
    """
    if n_random < 1:
        raise ValueError("cumulative_ablation needs n_random >= 1 (use >= 20 for a p-value below 0.05)")
    comps = [_as_component(c) for c in ranking]
    if not ks or max(ks) > len(comps) or min(ks) < 1:
        raise ValueError(f"ks must lie in 1..{len(comps)} (the ranking's length), got {list(ks)}")
    rng = np.random.default_rng(seed)
    base_mean = float(baseline.harmful_scores.double().mean())
    points = []
    for k in ks:
        top = comps[:k]
        ranked = evaluate_ablation(lm, baseline, top, method, means, mode, positions, name=f"{name}-top{k}")
        rands = [random_components(lm, top, rng, pool, match_layers) for _ in range(n_random)]
        sets = [tuple(c.id for c in rand) for rand in rands]
        fracs = [param_fraction(lm, rand) for rand in rands]
        if runner is None:
            means_k = [_harmful_mean(lm, baseline, ablate(lm, rand, method, means, mode, positions)) for rand in rands]
        else:
            from mech.distributed import ablation_scores

            means_k = ablation_scores(runner, baseline.harmful, baseline.refusal_ids, sets, method, means, mode,
                                      positions, baseline.batch_size)
        deltas = [m - base_mean for m in means_k]
        test = permutation_pvalue(ranked.harmful.delta, deltas, alternative="less")
        points.append(CumulativePoint(k, ranked, tuple(sets), tuple(deltas), float(np.mean(fracs)), test))
    return CumulativeResult(name, method, tuple(c.id for c in comps), tuple(points), n_random, seed, base_mean)
