"""Attribution patching (AtP): moved to :mod:`mech.patching.attribution`; this module keeps the old import path."""

from mech.patching.attribution import (
    Verification,
    attribution_patching,
    attribution_sweep,
    verify_against_exact,
)

__all__ = ["Verification", "attribution_patching", "attribution_sweep", "verify_against_exact"]
