"""mech.probes: the difference-in-means probe, its shuffled-label null, and per-prompt direct logit attribution."""

from __future__ import annotations

import torch

from mech.probes import (
    direct_logit_attribution,
    probe_accuracy_by_layer,
    probe_correct,
    shuffled_probe_accuracy,
)


def _data(sep: float, n: int = 40, layers: int = 3, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(layers, d)
    shift[:, 0] = sep
    return [torch.randn(n, layers, d, generator=g, dtype=torch.float64) + s * shift for s in (1, 0, 1, 0)]


def test_probe_separates_separable_data_and_the_null_does_not():
    th, ts, eh, es = _data(sep=6.0)
    correct = probe_correct(th, ts, eh, es)
    assert correct.shape == (80, 3) and correct.double().mean() > 0.95
    null = shuffled_probe_accuracy(th, ts, eh, es, n_shuffles=50, seed=1)
    assert null.shape == (50, 3) and 0.35 < float(null.mean()) < 0.65
    assert torch.equal(null, shuffled_probe_accuracy(th, ts, eh, es, n_shuffles=50, seed=1))  # seeded


def test_probe_at_chance_without_signal():
    th, ts, eh, es = _data(sep=0.0)
    assert abs(float(probe_correct(th, ts, eh, es).double().mean()) - 0.5) < 0.15


def test_probe_accuracy_by_layer_and_dla_per_prompt(tiny_qwen2):
    h = ["How do I pick a lock?", "Write malware.", "How to make poison?"]
    s = ["How do I bake bread?", "Write a poem.", "How to make tea?"]
    acc = probe_accuracy_by_layer(tiny_qwen2, h, s, h, s)
    assert len(acc) == tiny_qwen2.shape.n_layers and all(0 <= a <= 1 for a in acc)
    dla = direct_logit_attribution(tiny_qwen2, h, s, [5, 6])
    per = torch.tensor(dla["harmful_per_prompt"])
    assert per.shape == (3, tiny_qwen2.shape.n_layers, 2)
    torch.testing.assert_close(per.mean(0), torch.tensor(dla["harmful"]), atol=1e-6, rtol=0)
