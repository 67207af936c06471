"""Where each Hugging Face decoder family keeps the modules and config keys the library reads: one entry per family.

An :class:`Architecture` names, for one HF ``config.model_type``, every module path and config key that the hooks
(:mod:`mech.hooks`), the parameter accounting (:mod:`mech.components`), the partial-forward engine
(:mod:`mech.engine`), the weight edit (:mod:`mech.directions`), the direct logit attribution
(:mod:`mech.probes`) and the model's shape (:class:`mech.models.ModelShape`) use. The entries are registered by
``model_type`` (:func:`register_architecture`); :func:`architecture_of` looks a model up:

1. read ``model.config.model_type`` (a :class:`~mech.models.LoadedModel`, a causal LM or its base model);
2. return its registered entry, or raise :class:`ArchitectureError` naming the supported types.

Every entry also names the tiny test model of its family (``tiny_model``: the ``arch`` argument of
``fixtures.tiny_models.build_tiny_model``; ``None`` where there is none): tests/test_architectures.py builds each
one and resolves every hook point through the entry. Adding a family is one :func:`register_architecture` call
(hypotheses/README.md, "Adding a model architecture", built by tests/test_adding_an_architecture.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["ARCHITECTURES", "Architecture", "ArchitectureError", "architecture", "architecture_of",
           "register_architecture", "supported_model_types", "unregister_architecture"]


class ArchitectureError(ValueError):
    """An unknown model type or a model that lacks a module its entry names; the message is one line."""


@dataclass(frozen=True)
class Architecture:
    """The module paths (attribute names, dotted where nested) and config keys of one HF decoder family.

    Paths: ``base`` on the causal LM; ``layers``, ``embed``, ``final_norm``, ``rotary`` on the base model;
    ``attn``, ``mlp`` on a decoder layer; ``attn_in``/``attn_out`` on the attention module, ``mlp_in``/``mlp_out``
    on the MLP; ``unembed`` on the causal LM. The hook points sit on them (:mod:`mech.hooks`): ``attn.hook_z`` is
    the input of ``attn_out``, ``hook_attn_out`` the output of ``attn``, ``mlp.hook_post`` the input of
    ``mlp_out``, ``hook_mlp_out`` the output of ``mlp``.
    """

    model_type: str  # HF config.model_type
    tiny_model: str | None  # the `arch` of fixtures.tiny_models.build_tiny_model (None: no tiny model)
    base: str = "model"  # causal LM -> base (decoder) model
    layers: str = "layers"  # base model -> ModuleList of decoder layers
    embed: str = "embed_tokens"  # base model -> token embedding
    final_norm: str = "norm"  # base model -> final norm before the unembedding
    rotary: str = "rotary_emb"  # base model -> rotary position embedding (the partial-forward engine)
    unembed: str = "lm_head"  # causal LM -> output embedding
    attn: str = "self_attn"  # decoder layer -> attention
    attn_in: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # attention -> per-head input projections
    attn_out: str = "o_proj"  # attention -> output projection (its input: hook_z)
    mlp: str = "mlp"  # decoder layer -> MLP
    mlp_in: tuple[str, ...] = ("gate_proj", "up_proj")  # MLP -> per-neuron input projections
    mlp_out: str = "down_proj"  # MLP -> output projection (its input: the neurons, hook_post)
    # config keys
    n_layers_key: str = "num_hidden_layers"
    d_model_key: str = "hidden_size"
    n_heads_key: str = "num_attention_heads"
    n_kv_heads_key: str = "num_key_value_heads"  # absent: as many KV heads as heads
    d_head_key: str = "head_dim"  # absent or None: d_model // n_heads
    d_mlp_key: str = "intermediate_size"
    d_vocab_key: str = "vocab_size"

    def __post_init__(self) -> None:
        if not self.model_type or not isinstance(self.model_type, str):
            raise ArchitectureError(f"an architecture needs a model_type string, got {self.model_type!r}")

    # -- modules
    def base_model(self, model: Any) -> Any:
        """The base (decoder) model of a causal LM; a base model is returned as is."""
        return _get(model, self.base, model)

    def decoder_layers(self, model: Any) -> nn.ModuleList:
        layers = _get(self.base_model(model), self.layers, None)
        if layers is None:
            raise ArchitectureError(f"{type(model).__name__} ({self.model_type}) has no .{self.base}.{self.layers}")
        return layers

    def attention(self, block: Any) -> Any:
        return _get(block, self.attn, None)

    def mlp_module(self, block: Any) -> Any:
        return _get(block, self.mlp, None)

    def attn_out_proj(self, block: Any) -> Any:
        return _get(self.attention(block), self.attn_out, None)

    def mlp_out_proj(self, block: Any) -> Any:
        return _get(self.mlp_module(block), self.mlp_out, None)

    def final_norm_of(self, model: Any) -> Any:
        return _get(self.base_model(model), self.final_norm, None)

    def rotary_of(self, model: Any) -> Any:
        return _get(self.base_model(model), self.rotary, None)

    # -- parameter names (``named_parameters`` of the causal LM, or of one module with ``inside=True``)
    def head_params(self, inside: bool = False) -> re.Pattern[str]:
        """The parameters the heads own: the attention's input projections' weights and biases and the output
        projection's weight (``inside``: names relative to the attention module)."""
        a = "" if inside else rf"\.{re.escape(self.attn)}"
        ins = "|".join(re.escape(x) for x in self.attn_in)
        return re.compile(rf"{a}\.({ins})\.(weight|bias)$|{a}\.{re.escape(self.attn_out)}\.weight$")

    def neuron_params(self, inside: bool = False) -> re.Pattern[str]:
        """The parameters the MLP neurons own (``inside``: names relative to the MLP module)."""
        m = "" if inside else rf"\.{re.escape(self.mlp)}"
        ins = "|".join(re.escape(x) for x in self.mlp_in)
        return re.compile(rf"{m}\.({ins})\.(weight|bias)$|{m}\.{re.escape(self.mlp_out)}\.weight$")

    # -- config
    def shape_values(self, config: Any) -> dict[str, int]:
        """``n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp, d_vocab`` read off an HF config."""
        n_heads = getattr(config, self.n_heads_key)
        d_model = getattr(config, self.d_model_key)
        return {
            "n_layers": getattr(config, self.n_layers_key),
            "d_model": d_model,
            "n_heads": n_heads,
            "n_kv_heads": getattr(config, self.n_kv_heads_key, None) or n_heads,
            "d_head": getattr(config, self.d_head_key, None) or d_model // n_heads,
            "d_mlp": getattr(config, self.d_mlp_key),
            "d_vocab": getattr(config, self.d_vocab_key),
        }


def _get(obj: Any, path: str, default: Any) -> Any:
    """``obj.a.b`` for ``path="a.b"``; ``default`` where a step is missing."""
    for part in path.split("."):
        if obj is None or not hasattr(obj, part):
            return default
        obj = getattr(obj, part)
    return obj


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture, replace: bool = False) -> Architecture:
    """Register ``arch`` under its ``model_type`` (``replace=True`` to overwrite an entry); returns it."""
    if not isinstance(arch, Architecture):
        raise TypeError(f"register an Architecture, got {type(arch).__name__}")
    if arch.model_type in ARCHITECTURES and not replace:
        raise ArchitectureError(f"model_type {arch.model_type!r} is already registered; pass replace=True to overwrite")
    ARCHITECTURES[arch.model_type] = arch
    return arch


def unregister_architecture(model_type: str) -> None:
    """Remove a registered entry (tests that register a toy one undo it with this)."""
    if model_type not in ARCHITECTURES:
        raise ArchitectureError(f"model_type {model_type!r} is not registered")
    del ARCHITECTURES[model_type]


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(ARCHITECTURES))


def architecture(model_type: str) -> Architecture:
    """The entry of one HF ``model_type``; a one-line :class:`ArchitectureError` naming the supported ones."""
    a = ARCHITECTURES.get(model_type)
    if a is None:
        raise ArchitectureError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())} "
            "(register one with mech.architectures.register_architecture)")
    return a


def architecture_of(model: Any) -> Architecture:
    """The entry of a :class:`~mech.models.LoadedModel`, an HF causal LM or its base model (``config.model_type``)."""
    if hasattr(model, "tokenizer") and hasattr(model, "model"):  # a LoadedModel
        model = model.model
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise ArchitectureError(f"{type(model).__name__} has no config.model_type; supported: "
                                f"{', '.join(supported_model_types())}")
    return architecture(model_type)


# The families the library supports today: all keep HF's Llama layout (model.layers[i].self_attn.o_proj,
# .mlp.down_proj, model.norm, model.rotary_emb, lm_head). Gemma differs in behaviour (embedding scaling, 1 + w
# norms), not in names; the code paths that care read the modules themselves.
for _arch in (
    Architecture("qwen2", tiny_model="qwen2"),
    Architecture("llama", tiny_model="llama"),
    Architecture("gemma", tiny_model="gemma"),
    Architecture("mistral", tiny_model=None),
    Architecture("qwen3", tiny_model=None),
):
    register_architecture(_arch)
