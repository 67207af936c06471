"""Replication: the primary claims of the suite across models and prompt sets, side by side.

A finding about one model on one prompt set is an anecdote; this runs the pre-specified primary claim of every
hypothesis for each (model, prompt set) combination and draws the comparison.

1. Check every input before any expensive work, each failure one line saying how to fix it: the models resolve
   (registry name with its data wheels installed or already prepared, local dir, ``.gguf`` file, hub id), the
   prompt files load and validate, and each model fits this machine (:func:`memory_plan`: the
   :mod:`mech.memory` estimate at the run's dtype/quantization against available RAM, or GPU memory on CUDA).
   A model that would swap is refused, not started. A collect-only pass of the suite then checks the
   ``--set`` items (with the suite's own validator, ``python -m fixtures.config``) and the suite options exactly
   as the runs will see them.
   A prompt set is ``pairs`` (the project's), a file (trained, selected and judged on), or ``eval:FILE``
   (trained and selected on the pairs, judged on FILE: the suite's ``--eval-prompts``).
2. For each (model, prompt set), run ``pytest hypotheses/ -m primary`` as a subprocess with its own reports dir
   ``<out>/replication/<model>__<prompts>/`` and the shared ``--cache-dir``: every sweep lands in the disk cache
   as it finishes, so a killed replication resumes where it stopped. A finished run leaves a stamp
   (``run.json``) keyed by its inputs and the source of the suite and the library; a re-run with the same key
   reuses it without starting pytest, and any change re-runs it (warm from the disk cache).
3. Read each run's ``findings.partial.json`` (a ``-m primary`` run is partial by construction). A run that
   ended without findings (crash, kill, usage error) gives an ``error`` cell for every claim, never a verdict.
4. Write ``<out>/replication.json`` and ``<out>/replication.html`` (self-contained, plotly.js inlined, opens
   offline): one row per primary claim and one column per run, each cell the verdict with effect, 95% CI and n;
   a forest plot per primary claim (effect and CI per run); and the layer-normalized depth (layer / n_layers)
   of the selected refusal direction (H4), the early probe layer (H2) and the top attribution heads (H1) per
   run, so "where" compares across models of different depths.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import html
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mech.cache import atomic_write_text

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = "pairs"  # the project's matched pairs (data/refusal_pairs.json)
EVAL_PREFIX = "eval:"  # eval:FILE = train and select on the project's pairs, judge on FILE (the suite's --eval-prompts)
VERDICTS = ("supported", "NOT supported", "error", "not tested")
COLOR = {"supported": "#1a7f37", "NOT supported": "#cf222e", "error": "#8250df", "not tested": "#6e7781"}
HYPOTHESIS_ORDER = ("baseline", "H1", "H2", "H3", "H4")
# the public config of a registry model that mech.memory has no preset for, so its memory is known before it is
# prepared (once prepared, its own config.json is read)
_CONFIGS = {
    "smollm2-135m-instruct": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                  attention_bias=False),
}
_GGUF_BITS_PER_WEIGHT = 4.5  # a Q4 GGUF: the parameter count from the file size, when no config is readable


class ReplicationError(RuntimeError):
    """Bad input to a replication, found before any expensive work. ``str(err)`` is one line with the fix."""


@dataclass(frozen=True)
class RunSpec:
    """One (model, prompt set) suite run of the primary claims."""

    id: str  # <model>__<prompts>, also the name of its reports dir
    model: str
    prompts: str  # "pairs", a file path, or eval:FILE
    model_label: str
    prompts_label: str
    dtype: str = "auto"  # the suite's --dtype for this run (the precision axis: --dtype float32,bfloat16)
    extra: tuple[str, ...] = ()  # further suite options of this run only (e.g. a calibration's --shuffle-labels 3)

    @property
    def prompts_path(self) -> str | None:
        """The file the suite trains, selects and judges on (``--prompts``); None for the project's pairs."""
        return None if self.prompts == DEFAULT_PROMPTS or self.eval_path else self.prompts

    @property
    def eval_path(self) -> str | None:
        """The benchmark file the claims are judged on (``--eval-prompts``), for an ``eval:FILE`` prompt set."""
        return self.prompts.removeprefix(EVAL_PREFIX) if self.prompts.startswith(EVAL_PREFIX) else None


@dataclass
class RunResult:
    """What one run gave: its findings' primary claims, or why it has none."""

    spec: RunSpec
    dir: Path
    status: str  # "complete" (findings read) | "error" (no findings)
    reused: bool = False
    exit_status: int | None = None
    wall_s: float | None = None
    peak_rss_gb: float | None = None
    message: str = ""
    findings: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- inputs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def _model_label(model: str) -> str:
    from mech.models import REGISTRY

    if model in REGISTRY or "/" not in model and not Path(model).exists():
        return model
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else (p.name if p.exists() else model)


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def parse_dtypes(text: str) -> list[str]:
    """``--dtype`` of a replication: one dtype or a comma-separated precision axis (``float32,bfloat16``)."""
    dts = list(dict.fromkeys(d.strip() for d in text.split(",") if d.strip()))
    bad = [d for d in dts if d not in DTYPE_CHOICES]
    if not dts or bad:
        raise ReplicationError(f"--dtype {text!r}: give one or more of {', '.join(DTYPE_CHOICES)}, comma-separated "
                               "(e.g. --dtype float32,bfloat16 for the precision axis)")
    return dts


def plan_runs(models: Sequence[str], prompts: Sequence[str], dtypes: Sequence[str] = ("auto",)) -> list[RunSpec]:
    """Every (model, prompt set, dtype) combination, models outermost; each run id is unique and file-name safe
    (``<model>__<prompts>``, with ``__<dtype>`` when more than one dtype is asked)."""
    if not models:
        raise ReplicationError("no models given; pass --models A,B (registry names: python -m mech models)")
    if not prompts:
        raise ReplicationError(f"no prompt sets given; pass --prompts {DEFAULT_PROMPTS} or --prompts FILE.csv")
    runs, seen = [], set()
    for m in models:
        for p in prompts:
            for dt in dtypes:
                pl = ("pairs" if p == DEFAULT_PROMPTS
                      else f"eval-{Path(p.removeprefix(EVAL_PREFIX)).stem}" if p.startswith(EVAL_PREFIX)
                      else Path(p).stem)
                rid = f"{_slug(_model_label(m))}__{_slug(pl)}" + (f"__{dt}" if len(dtypes) > 1 else "")
                base, i = rid, 2
                while rid in seen:
                    rid, i = f"{base}-{i}", i + 1
                seen.add(rid)
                runs.append(RunSpec(rid, m, p, _model_label(m), pl, dt))
    return runs


def check_inputs(models: Sequence[str], prompts: Sequence[str], cache_dir: Path) -> None:
    """Each model resolvable without loading it (a registry model's wheels installed or it is prepared), each
    prompt file present and valid: a :class:`ReplicationError` line naming the fix, before anything runs."""
    from mech.heldout import is_heldout, load_heldout
    from mech.models import ModelError, check_model_source
    from mech.prompts import PromptFileError, load_prompts

    if not (ROOT / "hypotheses").is_dir():
        raise ReplicationError(f"the hypothesis suite is not next to this mech package ({ROOT / 'hypotheses'} is "
                               "missing); run replicate from a checkout of the repository")
    for flag, given in (("--models", models), ("--prompts", prompts)):
        dup = next((x for i, x in enumerate(given) if x in given[:i]), None)
        if dup is not None:
            raise ReplicationError(f"{flag} names {dup} twice: each run would repeat the other; list it once")
    for m in models:
        try:
            check_model_source(m, cache_dir)
        except ModelError as e:
            raise ReplicationError(f"--models {m}: {e}") from None
    for item in prompts:
        if item == DEFAULT_PROMPTS:
            continue
        p = item.removeprefix(EVAL_PREFIX)
        if item.startswith(EVAL_PREFIX) and is_heldout(p):  # registered held-out benchmarks (mech/heldout.py)
            try:
                load_heldout(p)
            except PromptFileError as e:
                raise ReplicationError(f"--prompts {item}: {e}") from None
            continue
        if not Path(p).is_file():
            raise ReplicationError(f"--prompts {item}: no such file; pass a JSON or CSV prompt file (prompt,label,"
                                   f"category[,pair_id]), {EVAL_PREFIX}FILE to judge on FILE what the project's "
                                   f"pairs select, or '{DEFAULT_PROMPTS}' for the project's pairs")
        try:
            load_prompts(p)
        except PromptFileError as e:
            raise ReplicationError(f"--prompts {item}: {e}") from None


def check_set_items(items: Sequence[str]) -> None:
    """Each ``--set`` item (and ``MECH_SET``) checked by the suite's own validator (``fixtures/config.py``
    :func:`parse_set`: form, field, type, range, consistency), run as ``python -m fixtures.config`` so the library
    imports nothing of the suite: the same one line the suite and ``--plan`` give, before anything runs."""
    proc = subprocess.run([sys.executable, "-m", "fixtures.config", *items], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise ReplicationError(lines[-1] if lines else f"--set: the suite's validator exited {proc.returncode}")


def _usage_error(res: RunResult) -> str | None:
    """The suite's usage error when it refused every claim of a run for its options (the same for every run)."""
    claims = res.findings.get("claims", [])
    msgs = [c.get("message") or "" for c in claims]
    if claims and all(c["verdict"] == "error" and "UsageError" in m for c, m in zip(claims, msgs, strict=True)):
        return msgs[0].split("UsageError: ", 1)[-1]
    return None


# ------------------------------------------------------------------------------------------------- memory


def model_config(model: str, cache_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The model's config (as a dict) without loading weights or preparing anything, and where it came from."""
    from mech.memory import PRESETS
    from mech.models import REGISTRY

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
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model, local_files_only=True).to_dict(), "HF cache config"
    except Exception:  # noqa: BLE001 - any failure means: no config known offline
        return None, "unknown"


def _nested(cfg: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs keep the language model under ``text_config``."""
    return cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg


def memory_budget(device: str) -> tuple[float, str]:
    """Bytes this machine can give a model now, and what they are: free GPU memory on CUDA, else available RAM."""
    import torch

    from mech.models import pick_device

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


def memory_plan(models: Sequence[str], cache_dir: Path, device: str = "auto", dtype: str = "auto",
                quantize: str = "none", budget_bytes: float | None = None) -> list[dict[str, Any]]:
    """Per model: the :func:`mech.memory.estimate_memory` total at the run's dtype/quantization (batch 8 x 128
    tokens) against the budget (``budget_bytes`` or :func:`memory_budget`), and whether it fits with 10%
    headroom. Models run one at a time, so each is compared with the whole budget."""
    from mech.memory import estimate_memory
    from mech.models import ModelError, pick_device, pick_dtype

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
            est = estimate_memory(_nested(cfg), dt, quantize)
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


def _memory_refusal(row: dict[str, Any]) -> str:
    fix = ("use --quantize 4bit" if row["quantize"] != "4bit" else "run it on a machine with more memory")
    if row["device"] == "cpu" and row["quantize"] == "none":
        fix = "use --quantize 4bit (bitsandbytes NF4 also runs on CPU), free memory, or drop it from --models"
    return (f"--models {row['model']}: needs about {row['estimate_gb']:.1f} GB ({row['params_b']:.2f} B parameters, "
            f"{row['quantize'] if row['quantize'] != 'none' else row['dtype']}) but there are "
            f"{row['budget_gb']:.1f} GB ({row['budget']}; 90% usable); refusing to start a model that would swap; {fix}")


# ----------------------------------------------------------------------------------------------- running


def _code_hash() -> str:
    """Source of the library, the suite and its data: a finished run is reused only while these are unchanged."""
    h = hashlib.sha256()
    files = [ROOT / "conftest.py", ROOT / "pyproject.toml"]
    for sub, pattern in (("mech", "*.py"), ("fixtures", "*.py"), ("hypotheses", "*.py"), ("data", "*.json")):
        files += sorted((ROOT / sub).rglob(pattern))
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _model_fingerprint(model: str) -> str:
    from mech.models import REGISTRY

    if model in REGISTRY:
        return REGISTRY[model].sha256
    p = Path(model).expanduser()
    if p.is_file():
        return f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.iterdir()):
            if f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
        return h.hexdigest()
    return model


def _prompts_fingerprint(prompts: str) -> str:
    if prompts == DEFAULT_PROMPTS:
        return DEFAULT_PROMPTS
    from mech.heldout import heldout_identity, is_heldout

    if is_heldout(prompts.removeprefix(EVAL_PREFIX)):  # the converted rows (package, version and sha256 pinned)
        return heldout_identity(prompts.removeprefix(EVAL_PREFIX))["content_hash"]
    return hashlib.sha256(Path(prompts.removeprefix(EVAL_PREFIX)).read_bytes()).hexdigest()


def _pytest_args(spec: RunSpec, opts: dict[str, Any], extra: Sequence[str] = ()) -> list[str]:
    args = [sys.executable, "-m", "pytest", str(ROOT / "hypotheses"), "-m", "primary", "--rootdir", str(ROOT),
            "-c", str(ROOT / "pyproject.toml"), "-p", "no:cacheprovider", "-q", "--tb=line", "--verdict-exit", "--durations=10",
            "--model", spec.model, "--cache-dir", str(opts["cache_dir"]), "--device", opts["device"],
            "--dtype", spec.dtype, "--quantize", opts["quantize"]]
    if spec.prompts_path:
        args += ["--prompts", str(Path(spec.prompts_path).resolve())]
    if spec.eval_path:
        from mech.heldout import is_heldout

        args += ["--eval-prompts", spec.eval_path if is_heldout(spec.eval_path) else str(Path(spec.eval_path).resolve())]
    for item in opts["set"]:
        args += ["--set", item]
    return args + list(spec.extra) + list(extra)


def _env(reports_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MECH_MODEL", "MECH_PROMPTS", "MECH_EVAL_PROMPTS", "MECH_REPORTS_DIR")}
    env["MECH_REPORTS_DIR"] = str(reports_dir)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def prepare_models(models: Sequence[str], cache_dir: Path) -> None:
    """Prepare each registry model once (verified, de-quantized into the cache) after the memory check and
    before the runs, so no run spends its time on it and a failure is one line up front."""
    from mech.models import REGISTRY, ModelError, prepare, registry_missing_wheels

    for m in dict.fromkeys(models):
        if m in REGISTRY and registry_missing_wheels(m, cache_dir) is not None:
            log.info("preparing %s (once: assemble, verify, de-quantize into %s)", m, cache_dir)
            try:
                prepare(m, cache_dir)
            except ModelError as e:
                raise ReplicationError(f"--models {m}: {e}") from None


def preflight(spec: RunSpec, opts: dict[str, Any], work: Path) -> list[str]:
    """Collect the primary claims of one run without running them: the suite checks its options and ``--set``
    items exactly as the runs will (one usage-error line otherwise). Returns the claims' node ids in order."""
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(_pytest_args(spec, opts, ["--co"]), cwd=ROOT, env=_env(work), capture_output=True,
                          text=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    if proc.returncode != 0:
        err = next((ln for ln in lines if ln.startswith("ERROR:")), None) or next(
            (ln for ln in reversed(lines) if ln.strip()), f"exit status {proc.returncode}")
        raise ReplicationError(f"the suite refused the options of run {spec.id}: {err.removeprefix('ERROR: ')}")
    return [ln.strip() for ln in proc.stdout.splitlines() if "::" in ln and not ln.startswith(" ")]


def _stamp_key(spec: RunSpec, opts: dict[str, Any], code: str) -> str:
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MECH_") and k not in (
        "MECH_MODEL", "MECH_PROMPTS", "MECH_EVAL_PROMPTS", "MECH_REPORTS_DIR")}
    blob = json.dumps({"model": spec.model, "model_fp": _model_fingerprint(spec.model), "prompts": spec.prompts,
                       "prompts_fp": _prompts_fingerprint(spec.prompts), "set": list(opts["set"]),
                       **({"extra": list(spec.extra)} if spec.extra else {}),
                       "device": opts["device"], "dtype": spec.dtype, "quantize": opts["quantize"],
                       "cache_dir": str(opts["cache_dir"]), "code": code, "env": env}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_findings(run_dir: Path) -> dict[str, Any] | None:
    for name in ("findings.partial.json", "findings.json"):
        f = run_dir / name
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError:
                return None
    return None


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    err = [ln for ln in lines if ln.startswith("ERROR:") or "Error" in ln.split(":")[0]]
    return (err[-1] if err else lines[-1] if lines else "")[:300]


def run_one(spec: RunSpec, opts: dict[str, Any], out: Path, code: str, force: bool = False,
            subdir: str = "replication") -> RunResult:
    """One suite run of the primary claims in a subprocess (or its stamp, when it already finished with the
    same inputs and code) in ``<out>/<subdir>/<spec.id>``. Exit status 0/1 with findings is a complete run;
    anything else an error."""
    run_dir = out / subdir / spec.id
    stamp = run_dir / "run.json"
    key = _stamp_key(spec, opts, code)
    if stamp.is_file() and not force:
        try:
            st = json.loads(stamp.read_text())
        except json.JSONDecodeError:
            st = {}
        findings = _read_findings(run_dir)
        if st.get("key") == key and st.get("status") == "complete" and findings is not None:
            return RunResult(spec, run_dir, "complete", reused=True, exit_status=st.get("exit_status"),
                             wall_s=st.get("wall_s"), peak_rss_gb=st.get("peak_rss_gb"), findings=findings)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("run.json", "findings.partial.json", "findings.json"):
        (run_dir / name).unlink(missing_ok=True)  # never read a previous run's findings as this one's
    logf = run_dir / "pytest.log"
    t0 = time.monotonic()
    with open(logf, "w") as fh:
        proc = subprocess.Popen(_pytest_args(spec, opts), cwd=ROOT, env=_env(run_dir), stdout=fh,
                                stderr=subprocess.STDOUT)
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS comes with its exit status
            proc.returncode = os.waitstatus_to_exitcode(status)
        except BaseException:
            proc.send_signal(signal.SIGINT)  # pytest stops at once and writes its partial report
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    wall = time.monotonic() - t0
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9
    findings = _read_findings(run_dir)
    rc = proc.returncode
    if rc in (0, 1) and findings is not None and findings.get("claims"):
        res = RunResult(spec, run_dir, "complete", exit_status=rc, wall_s=wall, peak_rss_gb=rss, findings=findings)
    else:
        why = f"killed by signal {-rc}" if rc < 0 else f"pytest exit status {rc}"
        res = RunResult(spec, run_dir, "error", exit_status=rc, wall_s=wall, peak_rss_gb=rss,
                        message=f"{why}: {_last_line(logf)} (see {logf})")
    atomic_write_text(stamp, json.dumps({"key": key, "status": res.status, "exit_status": rc, "wall_s": wall,
                                         "peak_rss_gb": rss, "message": res.message, "id": spec.id,
                                         "model": spec.model, "prompts": spec.prompts,
                                         "finished": _dt.datetime.now().isoformat(timespec="seconds")}, indent=1))
    return res


# ---------------------------------------------------------------------------------------------- gathering


def _claim_key(nodeid: str) -> str:
    return nodeid.split("hypotheses/", 1)[-1]


def gather(results: Sequence[RunResult], collected: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per primary claim (in the suite's order), one cell per run."""
    rows: dict[str, dict[str, Any]] = {}
    for nodeid in collected:
        rows.setdefault(_claim_key(nodeid), {"id": _claim_key(nodeid), "hypothesis": None, "claim": "", "cells": {}})
    for r in results:
        for c in r.findings.get("claims", []):
            if not c.get("primary"):
                continue
            row = rows.setdefault(_claim_key(c["id"]), {"id": _claim_key(c["id"]), "hypothesis": None, "claim": "",
                                                        "cells": {}})
            row["hypothesis"] = row["hypothesis"] or c.get("hypothesis")
            row["claim"] = row["claim"] or c.get("claim", "")
            row["cells"][r.spec.id] = {k: c.get(k) for k in (
                "verdict", "effect", "ci", "n", "statistic", "p_value", "p_adjusted", "threshold", "mde", "test",
                "null", "message")}
    for row in rows.values():
        if row["hypothesis"] is None:
            fam = row["id"].split("::")[0]
            row["hypothesis"] = {"test_baseline.py": "baseline", "test_localized_circuit.py": "H1",
                                 "test_layer_hierarchy.py": "H2", "test_shared_substrate.py": "H3",
                                 "test_single_direction.py": "H4"}.get(fam, fam)
        for r in results:
            if r.spec.id in row["cells"]:
                continue
            if r.status == "error":
                row["cells"][r.spec.id] = {"verdict": "error", "message": r.message}
            else:  # the run finished but this claim is missing from its findings: never silently a verdict
                row["cells"][r.spec.id] = {"verdict": "error", "message": "claim missing from the run's findings"}
        row["replicates"] = sum(c["verdict"] == "supported" for c in row["cells"].values())
    order = {h: i for i, h in enumerate(HYPOTHESIS_ORDER)}
    return sorted(rows.values(), key=lambda r: (order.get(r["hypothesis"], 99), r["id"]))


def _primary(r: RunResult, hyp: str) -> dict[str, Any] | None:
    return next((c for c in r.findings.get("claims", []) if c.get("primary") and c.get("hypothesis") == hyp), None)


def _norm(layer: int | None, n: int | None) -> float | None:
    return None if layer is None or not n else layer / n


def depth(results: Sequence[RunResult], cache_dir: Path) -> list[dict[str, Any]]:
    """Per run: where the claims located refusal, as layer index / n_layers (0 = the first layer, (n-1)/n the
    last): the selected direction's layer (H4), the early probe layer (H2), the top-k heads (H1). Each is None
    when that claim did not get that far (e.g. ``not tested``). n_layers comes from the run's findings.json
    (``model.n_layers``), or from the model's config for a run that recorded none."""
    out = []
    for r in results:
        n = (r.findings.get("model") or {}).get("n_layers")  # the run's own record; else the model's config
        if n is None:
            cfg, _ = model_config(r.spec.model, cache_dir)
            n = int(_nested(cfg)["num_hidden_layers"]) if cfg else None
        h4, h2, h1 = (_primary(r, h) for h in ("H4", "H2", "H1"))
        d_layer = (h4 or {}).get("numbers", {}).get("layer")
        p_layer = (h2 or {}).get("numbers", {}).get("layer")
        heads = (h1 or {}).get("numbers", {}).get("heads") or []
        head_layers = [int(m.group(1)) for h in heads if (m := re.match(r"L(\d+)\.H\d+", str(h)))]

        out.append({"run": r.spec.id, "model": r.spec.model, "n_layers": n,
                    "direction_layer": d_layer, "direction_depth": _norm(d_layer, n),
                    "direction_verdict": (h4 or {}).get("verdict"),
                    "probe_layer": p_layer, "probe_depth": _norm(p_layer, n),
                    "top_heads": list(heads), "top_head_depths": [_norm(L, n) for L in head_layers],
                    "mean_head_depth": (sum(head_layers) / len(head_layers) / n) if head_layers and n else None})
    return out


# -------------------------------------------------------------------------------------------------- figures


def forest_figure(row: dict[str, Any], runs: Sequence[RunSpec]) -> Any:
    """Effect and 95% CI of one primary claim per run; runs without an effect show their verdict as text."""
    import plotly.graph_objects as go

    labels = [r.id for r in runs]
    fig = go.Figure()
    for verdict in VERDICTS:
        pts = [(r.id, row["cells"][r.id]) for r in runs
               if row["cells"][r.id].get("verdict") == verdict and row["cells"][r.id].get("effect") is not None]
        if not pts:
            continue
        eff = [c["effect"] for _, c in pts]
        ci = [c.get("ci") or [None, None] for _, c in pts]
        hi = [(c[1] - e) if c[1] is not None else 0 for c, e in zip(ci, eff, strict=True)]
        lo = [(e - c[0]) if c[0] is not None else 0 for c, e in zip(ci, eff, strict=True)]
        fig.add_trace(go.Scatter(
            x=eff, y=[i for i, _ in pts], mode="markers", name=verdict, marker=dict(color=COLOR[verdict], size=11),
            error_x=dict(type="data", symmetric=False, array=hi, arrayminus=lo, color=COLOR[verdict], thickness=2),
            customdata=[[c.get("n"), c.get("p_value"), c.get("p_adjusted")] for _, c in pts],
            hovertemplate="%{y}<br>effect %{x:.3g}<br>n %{customdata[0]}<br>p %{customdata[1]:.3g}, Holm "
                          "%{customdata[2]:.3g}<extra>" + verdict + "</extra>"))
    rest = [(r.id, row["cells"][r.id]) for r in runs if row["cells"][r.id].get("effect") is None]
    if rest:
        fig.add_trace(go.Scatter(
            x=[0] * len(rest), y=[i for i, _ in rest], mode="text", name="no effect",
            text=[c.get("verdict", "") for _, c in rest], textposition="middle right",
            textfont=dict(color=[COLOR.get(c.get("verdict"), "#555") for _, c in rest]),
            hovertext=[c.get("message") or "" for _, c in rest], hoverinfo="text"))
    fig.add_vline(x=0, line_dash="dot", line_color="#888")
    fig.update_layout(title=f"{row['hypothesis']}: {row['id'].split('::')[-1]}", height=140 + 44 * len(labels),
                      xaxis_title="effect with 95% CI (0 = the claim's null or threshold)",
                      yaxis=dict(categoryorder="array", categoryarray=labels[::-1], type="category"),
                      margin=dict(l=10, r=10, t=50, b=50), legend=dict(orientation="h", y=-0.3))
    return fig


def depth_figure(rows: Sequence[dict[str, Any]]) -> Any:
    """Layer / n_layers of the selected direction, the probe layer and the top heads, one line per run."""
    import plotly.graph_objects as go

    fig = go.Figure()
    ys = [d["run"] for d in rows]
    hx, hy, ht = [], [], []
    for d in rows:
        for h, x in zip(d["top_heads"], d["top_head_depths"], strict=False):
            if x is not None:
                hx.append(x)
                hy.append(d["run"])
                ht.append(f"{h} of {d['n_layers']} layers")
    fig.add_trace(go.Scatter(x=hx, y=hy, mode="markers", name="top-k heads (H1)", text=ht,
                             marker=dict(color="#0969da", size=8, opacity=0.6), hoverinfo="text+x"))
    for key, name, sym, color in (("direction", "refusal direction (H4)", "diamond", "#cf222e"),
                                  ("probe", "early probe layer (H2)", "square", "#9a6700")):
        pts = [d for d in rows if d[f"{key}_depth"] is not None]
        fig.add_trace(go.Scatter(x=[d[f"{key}_depth"] for d in pts], y=[d["run"] for d in pts], mode="markers",
                                 name=name, marker=dict(symbol=sym, size=15, color=color),
                                 text=[f"layer {d[f'{key}_layer']} of {d['n_layers']}" for d in pts],
                                 hoverinfo="text+x"))
    fig.update_layout(title="Where refusal lives: layer / n_layers per run", height=160 + 44 * len(ys),
                      xaxis=dict(range=[-0.02, 1.02], title="layer / n_layers"),
                      yaxis=dict(categoryorder="array", categoryarray=ys[::-1], type="category"),
                      margin=dict(l=10, r=10, t=50, b=50), legend=dict(orientation="h", y=-0.3))
    return fig


# ----------------------------------------------------------------------------------------------- the page

_CSS = """
body{font-family:system-ui,sans-serif;margin:20px;color:#1f2328}
table{border-collapse:collapse;margin:8px 0 18px}
td,th{border:1px solid #d0d7de;padding:5px 8px;vertical-align:top;font-size:90%}
th{background:#f6f8fa}
td.cell b{display:block}
.muted{color:#57606a;font-size:85%}
"""


def _f(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _cell_html(rid: str, row: dict[str, Any]) -> str:
    c = row["cells"][rid]
    v = c.get("verdict", "error")
    ci = c.get("ci") or []
    ci_s = f" [{_f(ci[0])}, {_f(ci[1])}]" if len(ci) == 2 and ci[0] is not None else ""
    body = f"effect {_f(c.get('effect'))}{ci_s}<br>n {_f(c.get('n'))}" if c.get("effect") is not None or \
        c.get("n") is not None else ""
    if c.get("p_adjusted") is not None:
        body += f"<br>Holm p {_f(c['p_adjusted'])}"
    msg = c.get("message") or ""
    return (f'<td class="cell" data-run="{html.escape(rid)}" data-claim="{html.escape(row["id"])}" '
            f'data-verdict="{html.escape(v)}" title="{html.escape(msg)}"><b style="color:{COLOR.get(v, "#555")}">'
            f"{html.escape(v)}</b>{body}"
            + (f'<div class="muted">{html.escape(msg[:160])}</div>' if msg and v != "supported" else "") + "</td>")


def _layer_depth(layer: Any, dep: Any) -> str:
    return "—" if layer is None else f"{layer} ({_f(dep)})"


def render_html(report: dict[str, Any], figures: dict[str, Any]) -> str:
    """The self-contained page: plotly.js inlined once, every figure drawn from inline JSON."""
    import plotly.offline

    runs = report["runs"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Replication of the primary claims</title>"
             f"<style>{_CSS}</style><script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head>"
             "<body><h1>Does it replicate? The primary claims across models and prompt sets</h1>"
             f"<p class='muted'>Generated {html.escape(report['created'])} by <code>"
             f"{html.escape(' '.join(report['command']))}</code> in {report['wall_s']:.0f} s. Each run is "
             "<code>pytest hypotheses/ -m primary</code> on one model and one prompt set; verdicts are the suite's "
             "(Holm-corrected across the primaries of that run). An <b>error</b> cell is a run or claim that "
             "crashed, never a finding.</p>"]
    parts.append("<h2>Runs</h2><table id='runs'><tr><th>run</th><th>model</th><th>prompts</th><th>status</th>"
                 "<th>wall time</th><th>peak RSS</th><th>summary</th><th>report</th></tr>")
    for r in runs:
        s = r.get("summary") or {}
        summ = (f"{s.get('supported', 0)} supported, {s.get('not_supported', 0)} NOT supported, "
                f"{s.get('not_tested', 0)} not tested, {s.get('error', 0)} error") if s else html.escape(r["message"])
        wall = "—" if r["wall_s"] is None else f"{r['wall_s']:.0f} s"
        status = r["status"] + (" (reused: finished earlier with the same inputs and code)" if r["reused"] else "")
        rep = f"replication/{r['id']}/hypotheses.partial.html"
        parts.append(f"<tr><td>{html.escape(r['id'])}</td><td>{html.escape(r['model'])}</td>"
                     f"<td>{html.escape(r['prompts'])}</td><td>{html.escape(status)}</td><td>{wall}</td>"
                     f"<td>{_f(r['peak_rss_gb'])} GB</td><td>{summ}</td><td><a href='{html.escape(rep)}'>suite report"
                     "</a></td></tr>")
    parts.append("</table>")
    parts.append("<h2>Primary claims: verdict, effect [95% CI], n</h2><table id='replication-table'><tr>"
                 "<th>hypothesis</th><th>claim</th>" + "".join(f"<th>{html.escape(r['id'])}</th>" for r in runs)
                 + "<th>supported in</th></tr>")
    for row in report["claims"]:
        parts.append(f"<tr><td>{html.escape(row['hypothesis'])}</td><td><b>{html.escape(row['id'].split('::')[-1])}"
                     f"</b><div class='muted'>{html.escape(row['claim'][:400])}</div></td>"
                     + "".join(_cell_html(r["id"], row) for r in runs)
                     + f"<td>{row['replicates']} of {len(runs)}</td></tr>")
    parts.append("</table><h2>Forest plots: effect and 95% CI per run</h2>")
    for row in report["claims"]:
        parts.append(f"<div class='mech-forest' data-claim='{html.escape(row['id'])}'>"
                     + figures[row["id"]].to_html(full_html=False, include_plotlyjs=False) + "</div>")
    parts.append("<h2>Depth: where refusal is located, layer / n_layers</h2><div class='mech-depth'>"
                 + figures["__depth__"].to_html(full_html=False, include_plotlyjs=False) + "</div>")
    parts.append("<table id='depth'><tr><th>run</th><th>n_layers</th><th>direction layer (H4)</th><th>probe layer "
                 "(H2)</th><th>top heads (H1)</th><th>mean head depth</th></tr>")
    for d in report["depth"]:
        parts.append(f"<tr><td>{html.escape(d['run'])}</td><td>{_f(d['n_layers'])}</td>"
                     f"<td>{_layer_depth(d['direction_layer'], d['direction_depth'])}</td>"
                     f"<td>{_layer_depth(d['probe_layer'], d['probe_depth'])}</td>"
                     f"<td>{html.escape(', '.join(d['top_heads'])) or '—'}</td><td>{_f(d['mean_head_depth'])}</td></tr>")
    parts.append("</table><h2>Memory</h2><table id='memory'><tr><th>model</th><th>device</th><th>weights</th>"
                 "<th>parameters</th><th>estimate</th><th>budget</th><th>fits</th></tr>")
    for m in report["memory"]:
        parts.append(f"<tr><td>{html.escape(m['model'])}</td><td>{m['device']}</td><td>"
                     f"{m['quantize'] if m['quantize'] != 'none' else m['dtype']}</td><td>{_f(m['params_b'])} B</td>"
                     f"<td>{_f(m['estimate_gb'])} GB ({html.escape(m['source'])})</td><td>{_f(m['budget_gb'])} GB "
                     f"{html.escape(m['budget'])}</td><td>{_f(m['fits'])}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------- main


def replicate(models: Sequence[str], prompts: Sequence[str] = (DEFAULT_PROMPTS,), set_items: Sequence[str] = (),
              out: str | Path = "reports", cache_dir: str | Path | None = None, device: str = "auto",
              dtype: str = "auto", quantize: str = "none", budget_gb: float | None = None, force: bool = False,
              check_only: bool = False, command: Sequence[str] = ()) -> dict[str, Any]:
    """Run the replication (module docstring) and return what ``replication.json`` holds. Raises
    :class:`ReplicationError` (one line) for bad input or a model that does not fit, before any run."""
    from mech.models import default_cache_dir

    t0 = time.monotonic()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = Path(out)
    dtypes = parse_dtypes(dtype)
    specs = plan_runs(models, prompts, dtypes)
    check_inputs(models, prompts, cache)
    check_set_items(set_items)
    mem = [row for dt in dtypes
           for row in memory_plan(models, cache, device, dt, quantize, None if budget_gb is None else budget_gb * 1e9)]
    for row in mem:
        fits = {True: "fits", False: "DOES NOT FIT", None: "unknown size (no config readable offline)"}[row["fits"]]
        est = "?" if row["estimate_gb"] is None else f"{row['estimate_gb']:.2f}"
        log.info("memory: %s at %s on %s: about %s GB of %.1f GB %s: %s", row["model"],
                 row["quantize"] if row["quantize"] != "none" else row["dtype"], row["device"], est,
                 row["budget_gb"], row["budget"], fits)
    bad = [row for row in mem if row["fits"] is False]
    if bad:
        raise ReplicationError(_memory_refusal(bad[0]))
    opts = {"cache_dir": cache, "set": list(set_items), "device": device, "quantize": quantize}
    if check_only:
        return {"memory": mem, "runs": [asdict(s) for s in specs]}
    prepare_models(models, cache)
    collected = preflight(specs[0], opts, out / "replication" / ".preflight")
    code = _code_hash()
    results = []
    for i, spec in enumerate(specs, 1):
        log.info("run %d/%d %s: %s on %s (log: %s)", i, len(specs), spec.id, spec.model, spec.prompts,
                 out / "replication" / spec.id / "pytest.log")
        res = run_one(spec, opts, out, code, force=force)
        s = res.findings.get("summary", {})
        if res.reused:
            log.info("  reused (finished earlier with the same inputs and code)")
        elif res.status == "complete":
            log.info("  done in %.0f s (peak RSS %.2f GB): %s supported, %s NOT supported, %s not tested, %s error",
                     res.wall_s, res.peak_rss_gb, s.get("supported"), s.get("not_supported"), s.get("not_tested"),
                     s.get("error"))
        else:
            log.info("  ERROR after %.0f s: %s", res.wall_s, res.message)
        if (usage := _usage_error(res)) is not None:
            raise ReplicationError(f"the suite refused the options of run {spec.id} (and would refuse every run): "
                                   f"{usage}")
        results.append(res)
    claims = gather(results, collected)
    depths = depth(results, cache)
    report: dict[str, Any] = {
        "created": _dt.datetime.now().isoformat(timespec="seconds"), "command": list(command),
        "config": {"suite": str(ROOT), "models": list(models), "prompts": list(prompts), "set": list(set_items), "device": device,
                   "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "quantize": quantize, "cache_dir": str(cache)},
        "memory": mem,
        "runs": [{"id": r.spec.id, "model": r.spec.model, "prompts": r.spec.prompts, "dtype": r.spec.dtype,
                  "dir": str(r.dir),
                  "status": r.status, "reused": r.reused, "exit_status": r.exit_status, "wall_s": r.wall_s,
                  "peak_rss_gb": r.peak_rss_gb, "message": r.message, "summary": r.findings.get("summary"),
                  "model_info": r.findings.get("model"), "suite_config": r.findings.get("config")} for r in results],
        "claims": claims,
        "depth": depths,
        "wall_s": time.monotonic() - t0,
    }
    figures = {row["id"]: forest_figure(row, specs) for row in claims}
    figures["__depth__"] = depth_figure(depths)
    atomic_write_text(out / "replication.json", json.dumps(report, indent=1, sort_keys=True, default=str))
    atomic_write_text(out / "replication.html", render_html(report, figures))
    return report
