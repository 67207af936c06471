"""Running one suite run of a replication: the pytest command line, a collect-only preflight, the subprocess
with its peak memory, and the stamp that lets a finished run be reused and a killed one resume (see
:mod:`runner.replicate`, step 3)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mech.cache import atomic_write_text
from mech.heldout import heldout_identity, is_heldout
from mech.models import registry_missing_wheels
from mech.registry import REGISTRY, ModelError, prepare
from runner.replicate.specs import DEFAULT_PROMPTS, EVAL_PREFIX, ROOT, ReplicationError, RunSpec

log = logging.getLogger(__name__)

# the suite's run-selecting environment: each run gets its own through its options, never the caller's
_RUN_ENV = ("MECH_MODEL", "MECH_PROMPTS", "MECH_EVAL_PROMPTS", "MECH_REPORTS_DIR")
# how a run shows itself, never what it computes: outside a stamp's key (a calibration started with
# MECH_NO_PROGRESS=1 was otherwise not reused by the same command without it)
_DISPLAY_ENV = ("MECH_NO_PROGRESS", "MECH_VERDICT_EXIT")


@dataclass
class RunResult:
    """What one run gave: its findings, or why it has none."""

    spec: RunSpec
    dir: Path
    status: str  # "complete" (findings read) | "error" (no findings)
    reused: bool = False
    exit_status: int | None = None
    wall_s: float | None = None
    peak_rss_gb: float | None = None
    message: str = ""
    findings: dict[str, Any] = field(default_factory=dict)


def code_hash() -> str:
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
    if is_heldout(prompts.removeprefix(EVAL_PREFIX)):  # the converted rows (package, version and sha256 pinned)
        return str(heldout_identity(prompts.removeprefix(EVAL_PREFIX))["content_hash"])
    return hashlib.sha256(Path(prompts.removeprefix(EVAL_PREFIX)).read_bytes()).hexdigest()


def pytest_args(spec: RunSpec, opts: dict[str, Any], extra: Sequence[str] = ()) -> list[str]:
    """The command line of one run: ``pytest hypotheses/ -m primary`` with the run's model, prompts, dtype and
    the shared options ``opts`` (``cache_dir``, ``device``, ``quantize``, ``set``), then ``extra``."""
    args = [sys.executable, "-m", "pytest", str(ROOT / "hypotheses"), "-m", "primary", "--rootdir", str(ROOT),
            "-c", str(ROOT / "pyproject.toml"), "-p", "no:cacheprovider", "-q", "--tb=line", "--verdict-exit",
            "--durations=10", "--model", spec.model, "--cache-dir", str(opts["cache_dir"]), "--device",
            opts["device"], "--dtype", spec.dtype, "--quantize", opts["quantize"]]
    if spec.prompts_path:
        args += ["--prompts", str(Path(spec.prompts_path).resolve())]
    if spec.eval_path:
        args += ["--eval-prompts", spec.eval_path if is_heldout(spec.eval_path) else str(Path(spec.eval_path).resolve())]
    for item in opts["set"]:
        args += ["--set", item]
    return args + list(spec.extra) + list(extra)


def _env(reports_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RUN_ENV}
    env["MECH_REPORTS_DIR"] = str(reports_dir)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def prepare_models(models: Sequence[str], cache_dir: Path) -> None:
    """Prepare each registry model once (verified, de-quantized into the cache) after the memory check and
    before the runs, so no run spends its time on it and a failure is one line up front."""
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
    proc = subprocess.run(pytest_args(spec, opts, ["--co"]), cwd=ROOT, env=_env(work), capture_output=True,
                          text=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    if proc.returncode != 0:
        err = next((ln for ln in lines if ln.startswith("ERROR:")), None) or next(
            (ln for ln in reversed(lines) if ln.strip()), f"exit status {proc.returncode}")
        raise ReplicationError(f"the suite refused the options of run {spec.id}: {err.removeprefix('ERROR: ')}")
    return [ln.strip() for ln in proc.stdout.splitlines() if "::" in ln and not ln.startswith(" ")]


def stamp_key(spec: RunSpec, opts: dict[str, Any], code: str) -> str:
    """The key of a finished run's stamp: its inputs (model and prompt files by content), options, ``MECH_*``
    environment and ``code`` (:func:`code_hash`). A run is reused only under the same key."""
    env = {k: v for k, v in sorted(os.environ.items())
           if k.startswith("MECH_") and k not in _RUN_ENV and k not in _DISPLAY_ENV}
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


def stop_like_ctrl_c() -> None:
    """Make SIGTERM (``kill PID``) and SIGINT stop a runner as Ctrl-C does: the running suite gets SIGINT, writes
    its partial report and exits, and the runner exits 130, so no orphaned suite run goes on writing into a run
    folder that the next invocation will reuse. SIGINT is restored too, since a shell ignores it in background
    jobs (``make calibrate &``)."""

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGINT, _raise)


def run_one(spec: RunSpec, opts: dict[str, Any], out: Path, code: str, force: bool = False,
            subdir: str = "replication") -> RunResult:
    """One suite run of the primary claims in a subprocess (or its stamp, when it already finished with the
    same inputs and code) in ``<out>/<subdir>/<spec.id>``. Exit status 0/1 with findings is a complete run;
    anything else an error."""
    run_dir = out / subdir / spec.id
    stamp = run_dir / "run.json"
    key = stamp_key(spec, opts, code)
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
        proc = subprocess.Popen(pytest_args(spec, opts), cwd=ROOT, env=_env(run_dir), stdout=fh,
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


def usage_error(res: RunResult) -> str | None:
    """The suite's usage error when it refused every claim of a run for its options (the same for every run)."""
    claims = res.findings.get("claims", [])
    msgs = [c.get("message") or "" for c in claims]
    if claims and all(c["verdict"] == "error" and "UsageError" in m for c, m in zip(claims, msgs, strict=True)):
        return msgs[0].split("UsageError: ", 1)[-1]
    return None


def report_page(run_dir: Path) -> str:
    """The file name of a run's suite report, beside the findings it was read from: ``hypotheses.html`` for a
    complete suite run (``findings.json``), else the partial page a ``-m primary`` run writes
    (``hypotheses.partial.html``)."""
    full = (run_dir / "findings.json").is_file() and not (run_dir / "findings.partial.json").is_file()
    return "hypotheses.html" if full else "hypotheses.partial.html"
