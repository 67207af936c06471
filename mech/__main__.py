"""Command line: ``python -m mech prepare [MODEL]`` sets up a registry model once; ``python -m mech models`` lists
them; ``python -m mech memory [--budget-gb 16]`` prints memory estimates (bf16 / 8-bit / 4-bit) of known models.
The replication, which runs the suite, sits above it: ``python -m runner replicate`` (:mod:`runner.replicate`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mech.registry import DEFAULT_MODEL, REGISTRY, ModelError, default_cache_dir, prepare


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mech")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="assemble, verify and de-quantize a registry model into the cache")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--cache-dir", default=None)
    sub.add_parser("models", help="list the registry")
    m = sub.add_parser("memory", help="memory estimates of known models in bf16, 8-bit and 4-bit")
    m.add_argument("--budget-gb", type=float, default=16.0)
    sub.add_parser("replicate", help="the primary claims across models, prompt sets and precisions (the runner's: "
                   "python -m runner replicate --help)")
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["replicate"]:
        return _replicate(args_in[1:])
    args = ap.parse_args(argv)
    if args.cmd == "memory":
        from mech.memory import table

        key = f"fits_{args.budget_gb:g}gb"
        sys.stdout.write(f"{'model':30s} {'weights':>7s} {'params':>8s} {'weights':>9s} {'total':>9s}  fits {args.budget_gb:g} GB\n")
        for r in table(args.budget_gb):
            sys.stdout.write(f"{r['model']:30s} {r['weights']:>7s} {r['params_b']:7.2f}B {r['weights_gb']:7.2f}GB "
                             f"{r['total_gb']:7.2f}GB  {'yes' if r[key] else 'no'}\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "models":
        for spec in REGISTRY.values():
            sys.stdout.write(f"{spec.name:32s} {spec.note}\n")
        return 0
    try:
        path = prepare(args.model, args.cache_dir or default_cache_dir())
    except ModelError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    sys.stdout.write(f"{args.model}: ready at {path}\n")
    return 0


def _replicate(args: list[str]) -> int:
    """``python -m mech replicate ...`` kept for its users: the replication runs the suite, so it lives above it
    (``python -m runner replicate``, :mod:`runner.replicate`); the library hands the command over to a new
    process instead of importing the runner (imports point down only)."""
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "runner" / "__main__.py").is_file():
        sys.stderr.write(f"error: replicate needs a checkout of the repository (no runner/ next to {checkout / 'mech'})"
                         "; run python -m runner replicate from one\n")
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])])}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "runner", "replicate", *args], env)


if __name__ == "__main__":
    raise SystemExit(main())
