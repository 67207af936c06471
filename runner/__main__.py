"""``python -m runner calibrate ...``: see :mod:`runner.calibrate`."""

from __future__ import annotations

import sys

from runner.calibrate import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] != "calibrate":
        sys.stderr.write("usage: python -m runner calibrate [--shuffles K] [--plan] ... (python -m runner calibrate "
                         "--help)\n")
        raise SystemExit(2)
    raise SystemExit(main(argv[1:]))
