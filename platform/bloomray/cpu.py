"""What this machine's CPU can do fast, from ``/proc/cpuinfo`` (x86 flags; elsewhere: unknown).

Two facts bloomray acts on, both measured on the CPUs named:

- bf16 GEMMs: x86 without AVX-512 (AVX2 only, e.g. AMD Zen 3) emulates them, ~65x below its
  fp32 rate (1.2 vs 86 GFLOP/s on one core): training there is ~16x slower in bf16 than fp32.
- int8 GEMMs: without VNNI, oneDNN multiplies with ``vpmaddubsw``, which saturates the int16
  sum of each pair of u8 x s8 products (see ``serving.quantize.cpu_int8_caveat``).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The first ``flags`` line of ``cpuinfo`` (default: this machine's); empty off x86."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@cache
def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def emulates_bf16(flags: frozenset[str] | None = None) -> bool:
    """x86 without AVX-512: bf16 matmuls run far below fp32 there."""
    flags = cpu_flags() if flags is None else flags
    return "avx2" in flags and "avx512f" not in flags


def lacks_vnni(flags: frozenset[str] | None = None) -> bool:
    """x86 with AVX2 but no VNNI/AMX: oneDNN's int8 GEMMs saturate pairs of products there."""
    flags = cpu_flags() if flags is None else flags
    return "avx2" in flags and not flags & VNNI_FLAGS
