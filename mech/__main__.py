"""Command line: ``python -m mech prepare [MODEL]`` sets up a registry model once; ``python -m mech models`` lists
them; ``python -m mech memory [--budget-gb 16]`` prints memory estimates (bf16 / 8-bit / 4-bit) of known models."""

from __future__ import annotations

import argparse
import logging
import sys

from mech.models import DEFAULT_MODEL, REGISTRY, ModelError, default_cache_dir, prepare


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mech")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="assemble, verify and de-quantize a registry model into the cache")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--cache-dir", default=None)
    sub.add_parser("models", help="list the registry")
    m = sub.add_parser("memory", help="memory estimates of known models in bf16, 8-bit and 4-bit")
    m.add_argument("--budget-gb", type=float, default=16.0)
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


if __name__ == "__main__":
    raise SystemExit(main())
