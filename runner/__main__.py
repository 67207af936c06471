"""``python -m runner calibrate ...`` (:mod:`runner.calibrate`) and ``python -m runner replicate ...``
(:mod:`runner.replicate`)."""

from __future__ import annotations

import sys

from runner.calibrate import main as calibrate_main
from runner.replicate.main import main as replicate_main

COMMANDS = {"calibrate": calibrate_main, "replicate": replicate_main}

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write("usage: python -m runner {calibrate,replicate} ... (python -m runner calibrate --help, "
                         "python -m runner replicate --help)\n")
        raise SystemExit(2)
    raise SystemExit(COMMANDS[argv[0]](argv[1:]))
