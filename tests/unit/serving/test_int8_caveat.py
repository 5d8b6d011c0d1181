"""Where W8A8 on a CPU is less accurate: x86 without VNNI (oneDNN's int8 GEMMs saturate there)."""

from __future__ import annotations

import pytest

from bloomray.serving.quantize import cpu_int8_caveat

ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse4_2 avx avx2 fma f16c\n"
SAPPHIRE = "flags\t\t: fpu avx avx2 avx512f avx512_vnni avx512_bf16 amx_int8\n"
ALDER = "flags\t\t: fpu avx avx2 avx_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd asimddp\n"


def test_x86_without_vnni_gets_the_caveat_with_the_fix():
    caveat = cpu_int8_caveat(ZEN3)
    assert caveat is not None and "VNNI" in caveat and "bf16 export" in caveat


@pytest.mark.parametrize(
    "cpuinfo", [SAPPHIRE, ALDER, ARM, ""], ids=["avx512-vnni-amx", "avx-vnni", "arm", "empty"]
)
def test_no_caveat_with_vnni_or_off_x86(cpuinfo):
    assert cpu_int8_caveat(cpuinfo) is None


def test_reads_this_machines_cpuinfo():
    """No argument: /proc/cpuinfo of this machine, the same answer as passing its text."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        text = ""
    assert cpu_int8_caveat() == cpu_int8_caveat(text)
