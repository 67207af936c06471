"""How much memory a model needs for this library's work, before loading it: weights (float, 8-bit or 4-bit
bitsandbytes), the KV cache of generation, and the activations of one forward.

:func:`estimate_memory` counts parameters from a config (an HF config object or a dict with the usual field
names); :data:`PRESETS` holds the public configs of models people ask about (Llama-3-8B/70B-Instruct), so
the estimate needs no hub. ``python -m mech memory`` prints the table. The benchmark
``benchmarks/bench_memory.py`` measures the real peak resident memory of the default model to compare.

bitsandbytes' storage, as transformers uses it: linear layers of the decoder only (``lm_head`` and the
embeddings stay in the compute dtype). NF4 with double quantization: 4 bits per weight, one 8-bit absmax per
64 weights, one float32 per 256 absmax blocks (~4.13 bits/weight). LLM.int8: 1 byte per weight plus one
float32 scale per output row.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mech.models import pick_device

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Public configs (config.json of the HF repos), so the estimate runs offline.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b-instruct": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                                attention_bias=False),
    "llama-3-70b-instruct": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False,
                                 attention_bias=False),
    "qwen2.5-coder-0.5b-instruct": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                        tie_word_embeddings=False, attention_bias=True),
    "qwen2.5-coder-1.5b-instruct": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                        tie_word_embeddings=False, attention_bias=True),
}
# The GGUF -> HF conversion of the embedded Qwen models keeps a separate output matrix, so the presets count it.


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by part; ``total`` = weights + KV cache + activations."""

    n_params: int
    weights: int
    quantized_params: int  # parameters stored by bitsandbytes (0 without quantization)
    kv_cache: int
    activations: int
    dtype: str
    quantize: str
    batch: int
    seq_len: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"total": self.total}

    def fits(self, budget_bytes: float, headroom: float = 0.9) -> bool:
        """Whether the total stays under ``headroom`` of the budget (runtime, allocator and OS need the rest)."""
        return self.total <= headroom * budget_bytes


def _get(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def parameter_counts(config: Any) -> dict[str, int]:
    """Parameters by kind: ``linear`` (decoder linear weights), ``other`` (embeddings, lm_head, norms, biases)."""
    v, d, ff = _get(config, "vocab_size"), _get(config, "hidden_size"), _get(config, "intermediate_size")
    n_layers, h = _get(config, "num_hidden_layers"), _get(config, "num_attention_heads")
    kv = _get(config, "num_key_value_heads") or h
    hd = _get(config, "head_dim") or d // h
    bias = _get(config, "attention_bias", _get(config, "model_type") == "qwen2")
    linear_per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * ff
    other_per_layer = 2 * d + ((h * hd + 2 * kv * hd) if bias else 0)
    tied = bool(_get(config, "tie_word_embeddings", False))
    other = v * d * (1 if tied else 2) + d + n_layers * other_per_layer
    return {"linear": n_layers * linear_per_layer, "other": other, "per_layer_linear": linear_per_layer}


def estimate_memory(
    config: Any | str,
    dtype: str = "bfloat16",
    quantize: str = "none",
    batch: int = 8,
    seq_len: int = 128,
) -> MemoryEstimate:
    """Memory for loading ``config`` (an HF config, a dict, or a :data:`PRESETS` name) and running a forward
    of ``batch`` x ``seq_len`` tokens with a KV cache (greedy generation, patching, ablation)."""
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; use one of {', '.join(PRESETS)} or pass a config")
        config = PRESETS[config]
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    if quantize not in ("none", "4bit", "8bit"):
        raise ValueError(f"unknown quantize mode {quantize!r}; use none, 4bit or 8bit")
    b = _DTYPE_BYTES[dtype]
    counts = parameter_counts(config)
    lin, other = counts["linear"], counts["other"]
    n_layers, d = _get(config, "num_hidden_layers"), _get(config, "hidden_size")
    h = _get(config, "num_attention_heads")
    kv = _get(config, "num_key_value_heads") or h
    hd = _get(config, "head_dim") or d // h
    ff, v = _get(config, "intermediate_size"), _get(config, "vocab_size")
    if quantize == "4bit":
        lin_bytes = lin / 2 + lin / 64 + 4 * lin / (64 * 256)
    elif quantize == "8bit":
        out_rows = n_layers * (h * hd + 2 * kv * hd + d + 2 * ff + d)
        lin_bytes = lin + 4 * out_rows
    else:
        lin_bytes = lin * b
    weights = int(lin_bytes + other * b)
    kv_cache = 2 * n_layers * kv * hd * seq_len * batch * b
    # one layer's live tensors (residual, q/k/v, attention scores, MLP intermediates) plus last-position logits
    act = batch * seq_len * (4 * d + 3 * ff) * b + batch * h * seq_len * seq_len * b + batch * v * 4
    return MemoryEstimate(lin + other, weights, lin if quantize != "none" else 0, int(kv_cache), int(act), dtype,
                          quantize, batch, seq_len)


def table(budget_gb: float = 16.0, names: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Estimates of each preset in bf16, 8-bit and 4-bit (batch 8 x 128 tokens) against a budget in GB."""
    rows = []
    for name in names or tuple(PRESETS):
        for q in ("none", "8bit", "4bit"):
            e = estimate_memory(name, "bfloat16", q)
            rows.append({"model": name, "weights": "bf16" if q == "none" else q, "params_b": e.n_params / 1e9,
                         "weights_gb": e.weights / 1e9, "total_gb": e.total / 1e9,
                         f"fits_{budget_gb:g}gb": e.fits(budget_gb * 1e9)})
    return rows


def memory_budget(device: str) -> tuple[float, str]:
    """Bytes this machine can give a model now, and what they are: free GPU memory on CUDA, else available RAM."""
    dev = pick_device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return float(free), f"free memory of {torch.cuda.get_device_name(dev)}"
    try:
        with open("/proc/meminfo") as fh:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in fh if ":" in ln}
        return float(info.get("MemAvailable", info["MemTotal"])), "available RAM"
    except (OSError, KeyError, ValueError):
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "physical RAM"


def stored_bytes(model: Any) -> int:
    """Bytes the loaded model's parameters really occupy, bitsandbytes' quantization state included
    (4-bit absmax and its second-level scales, 8-bit row scales). Meta (offloaded) tensors count 0."""
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen or p.device.type == "meta":
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
            if getattr(qs, "state2", None) is not None:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
        scb = getattr(p, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total
