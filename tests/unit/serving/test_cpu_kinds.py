"""What serving does by CPU kind: W8A8 is less accurate on x86 without VNNI (oneDNN's int8 GEMMs
saturate there); the engine's auto dtype is float32 where bf16 is emulated (x86 without AVX-512)."""

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


def test_auto_engine_dtype_is_float32_where_bf16_is_emulated(monkeypatch):
    from bloomray.serving import engines
    from bloomray.serving.options import ServeOptions

    monkeypatch.setattr(engines, "emulates_bf16", lambda: True)
    assert engines.engine_dtype(ServeOptions(), gpu=False) == "float32"
    assert engines.engine_dtype(ServeOptions(), gpu=True) == "auto"  # a GPU: vLLM's choice
    assert engines.engine_dtype(ServeOptions(dtype="bfloat16"), gpu=False) == "bfloat16"  # asked for
    assert engines.engine_dtype(ServeOptions(quantize="w8a8"), gpu=False) == "auto"  # int8 kernels' choice
    monkeypatch.setattr(engines, "emulates_bf16", lambda: False)
    assert engines.engine_dtype(ServeOptions(), gpu=False) == "auto"
