"""Reading the residual stream: linear decodability of harmfulness per layer, and direct logit attribution.

* :func:`probe_accuracy_by_layer` — at each layer, a difference-in-means linear probe (project onto
  mean(harmful) − mean(harmless) of the train prompts, threshold at the midpoint of the two projected
  means) classifies held-out prompts; its accuracy says how linearly decodable harmfulness is there.
* :func:`direct_logit_attribution` — the direct contribution of each layer's attention and MLP output (at the
  last position) to the refusal tokens' logits, through the final norm frozen at its scale on that run
  (the usual DLA linearization): ``u · (γ ⊙ out / rms(resid_final))`` with ``u`` the mean unembedding of the
  refusal tokens minus the mean unembedding of all tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mech.architectures import architecture_of
from mech.hooks import hook_name, run_with_cache

if TYPE_CHECKING:
    from mech.models import LoadedModel


@torch.inference_mode()
def last_position_resid(lm: LoadedModel, prompts: Sequence[str], batch_size: int = 16) -> Tensor:
    """``resid_pre`` of every layer plus the final residual at the last prompt position: ``[n, n_layers+1, d]``
    (float64, CPU)."""
    n_layers = lm.shape.n_layers
    names = [hook_name(L, "hook_resid_pre") for L in range(n_layers)] + [hook_name(n_layers - 1, "hook_resid_post")]
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = lm.batch(list(prompts[i : i + batch_size]))
        _, cache = run_with_cache(lm, enc, names, positions=[-1], to_cpu=True, stop_after_last=True, use_cache=False)
        out.append(torch.stack([cache[n][:, 0].double() for n in names], dim=1))  # [b, n_layers+1, d]
    return torch.cat(out)


def probe_accuracy_by_layer(
    lm: LoadedModel,
    train_harmful: Sequence[str],
    train_harmless: Sequence[str],
    test_harmful: Sequence[str],
    test_harmless: Sequence[str],
    batch_size: int = 16,
) -> list[float]:
    """Held-out accuracy of the difference-in-means probe at ``resid_pre`` of each layer (last position)."""
    if not (train_harmful and train_harmless and test_harmful and test_harmless):
        raise ValueError("probe_accuracy_by_layer needs non-empty train and test sets of both labels")
    th = last_position_resid(lm, train_harmful, batch_size)[:, :-1]  # [n, L, d]
    ts = last_position_resid(lm, train_harmless, batch_size)[:, :-1]
    eh = last_position_resid(lm, test_harmful, batch_size)[:, :-1]
    es = last_position_resid(lm, test_harmless, batch_size)[:, :-1]
    return probe_correct(th, ts, eh, es).double().mean(0).tolist()


def probe_correct(train_h: Tensor, train_s: Tensor, eval_h: Tensor, eval_s: Tensor) -> Tensor:
    """Per-prompt correctness of the difference-in-means probe at every layer: ``[n_eval_h + n_eval_s, L]`` bool.

    Inputs are residuals ``[n, L, d]`` (:func:`last_position_resid` without its last column). The probe projects
    onto ``mean(train_h) - mean(train_s)`` and thresholds at the midpoint of the two projected means."""
    mu_h, mu_s = train_h.mean(0), train_s.mean(0)  # [L, d]
    w = mu_h - mu_s
    thresh = 0.5 * ((mu_h * w).sum(-1) + (mu_s * w).sum(-1))  # [L]
    return torch.cat([(eval_h * w).sum(-1) > thresh, (eval_s * w).sum(-1) <= thresh])


def shuffled_probe_accuracy(train_h: Tensor, train_s: Tensor, eval_h: Tensor, eval_s: Tensor, n_shuffles: int,
                            seed: int = 0) -> Tensor:
    """The null of :func:`probe_correct`: held-out accuracy per layer of probes fit on train prompts whose
    harmful/harmless labels were shuffled, ``[n_shuffles, L]`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([train_h, train_s])
    nh = train_h.shape[0]
    out = []
    for _ in range(n_shuffles):
        perm = torch.randperm(x.shape[0], generator=g)
        out.append(probe_correct(x[perm[:nh]], x[perm[nh:]], eval_h, eval_s).double().mean(0))
    return torch.stack(out)


@torch.inference_mode()
def _dla_one(lm: LoadedModel, prompts: Sequence[str], u: Tensor, gamma: Tensor, eps: float, batch_size: int) -> Tensor:
    n_layers = lm.shape.n_layers
    names = [hook_name(L, k) for L in range(n_layers) for k in ("hook_attn_out", "hook_mlp_out")]
    final = hook_name(n_layers - 1, "hook_resid_post")
    rows = []
    for i in range(0, len(prompts), batch_size):
        enc = lm.batch(list(prompts[i : i + batch_size]))
        _, cache = run_with_cache(lm, enc, names + [final], positions=[-1], to_cpu=True, use_cache=False,
                                  stop_after_last=True)
        x = cache[final][:, 0].double()  # [b, d]
        rms = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()  # [b, 1]
        outs = torch.stack([cache[n][:, 0].double() for n in names], 1)  # [b, 2L, d]
        rows.append(((outs * gamma / rms[:, None]) @ u).view(-1, n_layers, 2))  # [b, L, 2]
    return torch.cat(rows)


def direct_logit_attribution(
    lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], refusal_ids: Sequence[int], batch_size: int = 16
) -> dict[str, Any]:
    """Per layer: mean DLA of ``attn_out`` and ``mlp_out`` to the refusal tokens on harmful and harmless
    prompts, and their difference (``delta[L] = [attn, mlp]``), the direct effect each block has on refusal;
    ``*_per_prompt`` ``[n, L, 2]`` for confidence intervals."""
    model = lm.model
    norm = architecture_of(model).final_norm_of(model)
    d = lm.shape.d_model
    dev = next(norm.parameters()).device
    with torch.inference_mode():
        gamma = norm(torch.ones(1, d, device=dev, dtype=lm.dtype)).double().cpu()[0]  # γ_eff (Gemma's 1+w included)
        W = model.get_output_embeddings().weight.detach().double().cpu()  # [vocab, d]
        u = W[list(refusal_ids)].mean(0) - W.mean(0)  # [d]
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    hp = _dla_one(lm, harmful, u, gamma, eps, batch_size)  # [n, L, 2]
    sp = _dla_one(lm, harmless, u, gamma, eps, batch_size)
    h, s = hp.mean(0), sp.mean(0)
    return {"harmful": h.tolist(), "harmless": s.tolist(), "delta": (h - s).tolist(), "columns": ["attn", "mlp"],
            "harmful_per_prompt": hp.tolist(), "harmless_per_prompt": sp.tolist()}
