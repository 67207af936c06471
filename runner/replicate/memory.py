"""The memory plan of a replication: each model's :func:`mech.memory.estimate_memory` at the run's dtype and
quantization against this machine's budget, known before any model is prepared or loaded (see
:mod:`runner.replicate`, step 2)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mech.memory import PRESETS, estimate_memory, memory_budget
from mech.models import pick_device, pick_dtype
from mech.registry import REGISTRY, ModelError
from runner.replicate.specs import ReplicationError

# the public config of a registry model that mech.memory has no preset for, so its memory is known before it is
# prepared (once prepared, its own config.json is read)
_CONFIGS = {
    "smollm2-135m-instruct": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                  attention_bias=False),
}
_GGUF_BITS_PER_WEIGHT = 4.5  # a Q4 GGUF: the parameter count from the file size, when no config is readable


def model_config(model: str, cache_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The model's config (as a dict) without loading weights or preparing anything, and where it came from."""
    if model in REGISTRY:
        cfg = cache_dir / "models" / f"{model}-fp32" / "config.json"
        if cfg.is_file():
            return json.loads(cfg.read_text()), "prepared config"
        if model in PRESETS:
            return dict(PRESETS[model]), "mech.memory preset"
        if model in _CONFIGS:
            return dict(_CONFIGS[model]), "public config"
        return None, "unknown"
    p = Path(model).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        try:
            return json.loads((p / "config.json").read_text()), "local config"
        except (OSError, ValueError):
            return None, "unreadable config"
    if p.suffix == ".gguf" and p.is_file():
        return None, "gguf size"
    try:  # a hub id already in the local HF cache
        from transformers import AutoConfig  # heavy: only for a model given as a hub id

        return AutoConfig.from_pretrained(model, local_files_only=True).to_dict(), "HF cache config"
    except Exception:  # noqa: BLE001 - any failure means: no config known offline
        return None, "unknown"


def language_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config: multimodal configs keep it under ``text_config``."""
    return cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg


def memory_plan(models: Sequence[str], cache_dir: Path, device: str = "auto", dtype: str = "auto",
                quantize: str = "none", budget_bytes: float | None = None) -> list[dict[str, Any]]:
    """Per model: the :func:`mech.memory.estimate_memory` total at the run's dtype/quantization (batch 8 x 128
    tokens) against the budget (``budget_bytes`` or :func:`mech.memory.memory_budget`), and whether it fits with
    10% headroom. Models run one at a time, so each is compared with the whole budget."""
    try:
        dev = pick_device(device)
        dt = str(pick_dtype(dtype, dev)).replace("torch.", "")
    except ModelError as e:
        raise ReplicationError(str(e)) from None
    if quantize not in ("none", "4bit", "8bit"):
        raise ReplicationError(f"--quantize {quantize!r} is not one of none, 4bit, 8bit")
    if budget_bytes is None:
        budget_bytes, what = memory_budget(device)
    else:
        what = "given budget"
    rows = []
    for m in models:
        cfg, source = model_config(m, cache_dir)
        if cfg is not None:
            est = estimate_memory(language_config(cfg), dt, quantize)
            total, n_params = est.total, est.n_params
        elif source == "gguf size":
            n_params = int(Path(m).expanduser().stat().st_size * 8 / _GGUF_BITS_PER_WEIGHT)
            per = {"4bit": 0.52, "8bit": 1.0}.get(quantize, {"float32": 4, "float16": 2, "bfloat16": 2}[dt])
            total = int(n_params * per * 1.1)
        else:
            n_params, total = None, None
        rows.append({"model": m, "device": dev.type, "dtype": dt, "quantize": quantize, "params_b":
                     None if n_params is None else n_params / 1e9, "estimate_gb": None if total is None else total / 1e9,
                     "budget_gb": budget_bytes / 1e9, "budget": what, "source": source,
                     "fits": None if total is None else bool(total <= 0.9 * budget_bytes)})
    return rows


def memory_refusal(row: dict[str, Any]) -> str:
    """The one line refusing a model that does not fit (a :func:`memory_plan` row), with the fix."""
    fix = ("use --quantize 4bit" if row["quantize"] != "4bit" else "run it on a machine with more memory")
    if row["device"] == "cpu" and row["quantize"] == "none":
        fix = "use --quantize 4bit (bitsandbytes NF4 also runs on CPU), free memory, or drop it from --models"
    return (f"--models {row['model']}: needs about {row['estimate_gb']:.1f} GB ({row['params_b']:.2f} B parameters, "
            f"{row['quantize'] if row['quantize'] != 'none' else row['dtype']}) but there are "
            f"{row['budget_gb']:.1f} GB ({row['budget']}; 90% usable); refusing to start a model that would swap; {fix}")
