"""Which floating-point precision a run computes in, decided from the hardware it finds.

``--dtype auto`` is bfloat16 where the hardware multiplies bfloat16 natively — CUDA, and a CPU with AMX-BF16 tiles
or AVX512-BF16 instructions — and float32 elsewhere (on a CPU without them bfloat16 is emulated and slower than
float32: 3.5x slower was measured on such a machine). float16 on MPS. Measured on 2 threads of an AVX512-BF16
CPU (AMD EPYC, no AMX), a 512x896 by 896x4864 matmul: 410 GFLOP/s in bfloat16 against 150-175 in float32; on an
AMX CPU 1,869 against 235. float32 stays available (``--dtype float32``) as the exact reference that bfloat16
verdicts are checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PrecisionError(ValueError):
    """An unknown dtype name."""


def cpu_bf16_units() -> list[str]:
    """The bfloat16 matrix units this CPU has: a subset of ``["amx_bf16", "avx512_bf16"]``.

    Read from torch's own CPU feature probe (what its oneDNN kernels dispatch on); where that private probe is
    missing (another torch build), from ``/proc/cpuinfo``'s flags; empty where neither says.
    """
    units: list[str] = []
    probe = getattr(torch, "cpu", None)
    amx, avx = getattr(probe, "_is_amx_tile_supported", None), getattr(probe, "_is_avx512_bf16_supported", None)
    if amx is not None and avx is not None:
        if amx():
            units.append("amx_bf16")
        if avx():
            units.append("avx512_bf16")
        return units
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return units
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


@dataclass(frozen=True)
class Precision:
    """The dtype a run computes in and why (shown on the report's model line and in ``findings.json``)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def choose_precision(dtype: str, device: torch.device) -> Precision:
    """``auto``: bfloat16 on CUDA and on a CPU with bfloat16 matrix units, float16 on MPS, float32 elsewhere;
    a named dtype is taken as asked."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise PrecisionError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return Precision(DTYPES[dtype], f"--dtype {dtype}")
    if device.type == "cuda":
        return Precision(torch.bfloat16, "auto: CUDA multiplies bfloat16 natively")
    if device.type == "mps":
        return Precision(torch.float16, "auto: MPS multiplies float16 natively")
    units = cpu_bf16_units()
    if units:
        return Precision(torch.bfloat16, f"auto: this CPU has bfloat16 matrix units ({', '.join(units)})")
    return Precision(torch.float32, "auto: this CPU has no bfloat16 matrix units (no amx_bf16 or avx512_bf16), "
                                    "where bfloat16 is slower than float32")
