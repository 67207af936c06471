"""Command line: ``python -m mech prepare [MODEL]`` sets up a registry model once; ``python -m mech models`` lists
them; ``python -m mech memory [--budget-gb 16]`` prints memory estimates (bf16 / 8-bit / 4-bit) of known models;
``python -m mech replicate --models A,B --prompts pairs,FILE`` runs the primary claims for every (model, prompt set)
and writes reports/replication.{json,html} (see :mod:`mech.replicate`)."""

from __future__ import annotations

import argparse
import logging
import sys

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
    _replicate_parser(sub)
    args = ap.parse_args(argv)
    if args.cmd == "replicate":
        return _replicate(args, argv)
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


def _replicate_parser(sub: argparse._SubParsersAction) -> None:
    from mech.replicate import DEFAULT_PROMPTS

    r = sub.add_parser("replicate", help="the primary claims across models and prompt sets: reports/replication.html")
    r.add_argument("--models", default=f"{DEFAULT_MODEL},qwen2.5-coder-1.5b-instruct,smollm2-135m-instruct",
                   help="comma-separated registry names, model dirs, .gguf files or HF ids")
    r.add_argument("--prompts", default=DEFAULT_PROMPTS,
                   help=f"comma-separated prompt files (JSON/CSV; harmful-only is fine); '{DEFAULT_PROMPTS}' = the "
                        "project's matched pairs; 'eval:FILE' = train and select on the pairs, judge the claims on "
                        "FILE (the suite's --eval-prompts)")
    r.add_argument("--set", dest="set_items", action="append", default=[], metavar="NAME=VALUE",
                   help="override a suite configuration field in every run (repeatable)")
    r.add_argument("--out", default="reports", help="where replication.{json,html} and replication/<run>/ go")
    r.add_argument("--cache-dir", default=None, help="shared disk cache of models and sweeps (default ~/.cache/mech)")
    r.add_argument("--device", default="auto")
    r.add_argument("--dtype", "--dtypes", dest="dtype", default="auto",
                   help="the suite's --dtype, or a comma-separated precision axis, e.g. float32,bfloat16")
    r.add_argument("--quantize", default="none")
    r.add_argument("--memory-budget-gb", type=float, default=None,
                   help="compare each model's memory estimate with this instead of the machine's available memory")
    r.add_argument("--force", action="store_true", help="re-run finished runs too (still warm from the disk cache)")
    r.add_argument("--check", action="store_true", help="only check the inputs and memory, run nothing")


def _replicate(args: argparse.Namespace, argv: list[str] | None) -> int:
    from mech.replicate import ReplicationError, replicate

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    split = [s.strip() for s in args.models.split(",") if s.strip()], [s.strip() for s in args.prompts.split(",") if s.strip()]
    try:
        rep = replicate(*split, set_items=args.set_items, out=args.out, cache_dir=args.cache_dir, device=args.device,
                        dtype=args.dtype, quantize=args.quantize, budget_gb=args.memory_budget_gb, force=args.force,
                        check_only=args.check, command=["python", "-m", "mech", *(sys.argv[1:] if argv is None else argv)])
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
                     f"{rep['wall_s']:.0f} s; wrote {args.out}/replication.html and {args.out}/replication.json\n")
    for row in rep["claims"]:
        sys.stdout.write(f"  {row['hypothesis']:8} {row['id'].split('::')[-1]:45} "
                         + "  ".join(f"{rid}: {c['verdict']}" for rid, c in row["cells"].items()) + "\n")
    return 1 if "error" in cells else 0


if __name__ == "__main__":
    raise SystemExit(main())
