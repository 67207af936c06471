"""``python -m runner replicate``: :func:`replicate` (the steps of :mod:`runner.replicate`) and its command line."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mech.cache import atomic_write_text
from mech.registry import DEFAULT_MODEL, default_cache_dir
from runner.replicate.depth import depth
from runner.replicate.figures import depth_figure, forest_figure
from runner.replicate.gather import gather, grid
from runner.replicate.memory import memory_plan, memory_refusal
from runner.replicate.page import render_html
from runner.replicate.run import (
    RunResult,
    code_hash,
    preflight,
    prepare_models,
    report_page,
    run_one,
    stop_like_ctrl_c,
    usage_error,
)
from runner.replicate.specs import (
    DEFAULT_PROMPTS,
    ROOT,
    ReplicationError,
    check_inputs,
    check_set_items,
    parse_dtypes,
    plan_runs,
)
from runner.replicate.stability import stability
from runner.replicate.table import markdown_table

log = logging.getLogger(__name__)
SUBDIR = "replication"  # <out>/replication/<run id>/: each run's reports dir


def _run_entry(r: RunResult) -> dict[str, Any]:
    rel = Path(SUBDIR) / r.spec.id  # links relative to <out>/replication.html
    return {"id": r.spec.id, "model": r.spec.model, "prompts": r.spec.prompts, "dtype": r.spec.dtype,
            "dir": str(r.dir), "report": (rel / report_page(r.dir)).as_posix(),
            "log": (rel / "pytest.log").as_posix() if (r.dir / "pytest.log").is_file() else None,
            "status": r.status, "reused": r.reused, "exit_status": r.exit_status, "wall_s": r.wall_s,
            "peak_rss_gb": r.peak_rss_gb, "message": r.message, "summary": r.findings.get("summary"),
            "model_info": r.findings.get("model"), "suite_config": r.findings.get("config")}


def build_report(results: Sequence[RunResult], collected: Sequence[str], cache: Path,
                 mem: list[dict[str, Any]], config: dict[str, Any], command: Sequence[str],
                 wall_s: float) -> dict[str, Any]:
    """What ``replication.json`` holds, from the runs' results (a pure function of them and the arguments)."""
    return {
        "created": _dt.datetime.now().isoformat(timespec="seconds"), "command": list(command), "config": config,
        "memory": mem, "runs": [_run_entry(r) for r in results],
        "claims": gather(results, collected), "grid": grid(results, collected),
        "depth": depth(results, cache), "stability": stability(results), "wall_s": wall_s,
    }


def write_report(report: dict[str, Any], results: Sequence[RunResult], out: Path) -> None:
    """``<out>/replication.json``, ``<out>/replication.html`` and ``<out>/replication.md``."""
    specs = [r.spec for r in results]
    figures = {row["id"]: forest_figure(row, specs) for row in report["claims"]}
    figures["__depth__"] = depth_figure(report["depth"])
    atomic_write_text(out / "replication.json", json.dumps(report, indent=1, sort_keys=True, default=str))
    atomic_write_text(out / "replication.html", render_html(report, figures))
    atomic_write_text(out / "replication.md", markdown_table(report))


def replicate(models: Sequence[str], prompts: Sequence[str] = (DEFAULT_PROMPTS,), set_items: Sequence[str] = (),
              out: str | Path = "reports", cache_dir: str | Path | None = None, device: str = "auto",
              dtype: str = "auto", quantize: str = "none", budget_gb: float | None = None, force: bool = False,
              check_only: bool = False, command: Sequence[str] = ()) -> dict[str, Any]:
    """Run the replication (:mod:`runner.replicate`) and return what ``replication.json`` holds. Raises
    :class:`ReplicationError` (one line) for bad input or a model that does not fit, before any run."""
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
        raise ReplicationError(memory_refusal(bad[0]))
    opts = {"cache_dir": cache, "set": list(set_items), "device": device, "quantize": quantize}
    if check_only:
        return {"memory": mem, "runs": [asdict(s) for s in specs]}
    prepare_models(models, cache)
    collected = preflight(specs[0], opts, out / SUBDIR / ".preflight")
    code = code_hash()
    results = []
    for i, spec in enumerate(specs, 1):
        log.info("run %d/%d %s: %s on %s (log: %s)", i, len(specs), spec.id, spec.model, spec.prompts,
                 out / SUBDIR / spec.id / "pytest.log")
        res = run_one(spec, opts, out, code, force=force, subdir=SUBDIR)
        s = res.findings.get("summary", {})
        if res.reused:
            log.info("  reused (finished earlier with the same inputs and code)")
        elif res.status == "complete":
            log.info("  done in %.0f s (peak RSS %.2f GB): %s supported, %s NOT supported, %s not tested, %s error",
                     res.wall_s, res.peak_rss_gb, s.get("supported"), s.get("not_supported"), s.get("not_tested"),
                     s.get("error"))
        else:
            log.info("  ERROR after %.0f s: %s", res.wall_s, res.message)
        if (usage := usage_error(res)) is not None:
            raise ReplicationError(f"the suite refused the options of run {spec.id} (and would refuse every run): "
                                   f"{usage}")
        results.append(res)
    config = {"suite": str(ROOT), "models": list(models), "prompts": list(prompts), "set": list(set_items),
              "device": device, "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "quantize": quantize,
              "cache_dir": str(cache)}
    report = build_report(results, collected, cache, mem, config, command, time.monotonic() - t0)
    write_report(report, results, out)
    return report


def parser() -> argparse.ArgumentParser:
    """The options of ``python -m runner replicate``."""
    r = argparse.ArgumentParser(prog="python -m runner replicate",
                                description="the primary claims across models, prompt sets and precisions: "
                                            "reports/replication.{html,json,md}")
    r.add_argument("--models", default=f"{DEFAULT_MODEL},qwen2.5-coder-1.5b-instruct,smollm2-135m-instruct",
                   help="comma-separated registry names, model dirs, .gguf files or HF ids")
    r.add_argument("--prompts", default=DEFAULT_PROMPTS,
                   help=f"comma-separated prompt files (JSON/CSV; harmful-only is fine); '{DEFAULT_PROMPTS}' = the "
                        "project's matched pairs; 'eval:FILE' = train and select on the pairs, judge the claims on "
                        "FILE (the suite's --eval-prompts)")
    r.add_argument("--set", dest="set_items", action="append", default=[], metavar="NAME=VALUE",
                   help="override a suite configuration field in every run (repeatable)")
    r.add_argument("--out", default="reports", help="where replication.{json,html,md} and replication/<run>/ go")
    r.add_argument("--cache-dir", default=None, help="shared disk cache of models and sweeps (default ~/.cache/mech)")
    r.add_argument("--device", default="auto")
    r.add_argument("--dtypes", "--dtype", dest="dtype", default="auto",
                   help="the suite's --dtype, or a comma-separated precision axis, e.g. float32,bfloat16 (one run "
                        "per dtype; the run ids end in the dtype)")
    r.add_argument("--quantize", default="none")
    r.add_argument("--memory-budget-gb", type=float, default=None,
                   help="compare each model's memory estimate with this instead of the machine's available memory")
    r.add_argument("--force", action="store_true", help="re-run finished runs too (still warm from the disk cache)")
    r.add_argument("--check", action="store_true", help="only check the inputs and memory, run nothing")
    return r


def main(argv: list[str] | None = None) -> int:
    """``python -m runner replicate [options]``: exit 0 when every cell has a verdict, 1 when any is an error,
    2 for bad input (one ``error:`` line), 130 when interrupted (finished runs and cached sweeps are kept)."""
    args = parser().parse_args(argv)
    stop_like_ctrl_c()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models = [s.strip() for s in args.models.split(",") if s.strip()]
    prompts = [s.strip() for s in args.prompts.split(",") if s.strip()]
    try:
        rep = replicate(models, prompts, set_items=args.set_items, out=args.out, cache_dir=args.cache_dir,
                        device=args.device, dtype=args.dtype, quantize=args.quantize, budget_gb=args.memory_budget_gb,
                        force=args.force, check_only=args.check,
                        command=["python", "-m", "runner", "replicate", *(sys.argv[2:] if argv is None else argv)])
    except ReplicationError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("replicate: interrupted; finished runs and cached sweeps are kept: run the same command "
                         "again to resume\n")
        return 130
    if args.check:
        sys.stdout.write(f"replicate: inputs and memory OK for {len(rep['runs'])} run(s)\n")
        return 0
    cells = [c["verdict"] for row in rep["claims"] for c in row["cells"].values()]
    sys.stdout.write(f"replicate: {len(rep['runs'])} run(s), {len(rep['claims'])} primary claims in "
                     f"{rep['wall_s']:.0f} s; wrote {args.out}/replication.html, replication.md and "
                     "replication.json\n")
    for row in rep["claims"]:
        sys.stdout.write(f"  {row['hypothesis']:8} {row['id'].split('::')[-1]:45} "
                         + "  ".join(f"{rid}: {c['verdict']}" for rid, c in row["cells"].items()) + "\n")
    return 1 if "error" in cells else 0
