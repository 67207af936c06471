"""Command line: ``python -m mech prepare [MODEL]`` sets up a registry model once; ``python -m mech models`` lists them."""

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
    args = ap.parse_args(argv)
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
