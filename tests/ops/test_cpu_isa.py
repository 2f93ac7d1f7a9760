"""The CPU kernels' instruction-set switch (csrc/cpu/isa.h) and the portability of the binary.

Every CPU kernel is compiled once per instruction set into one extension; a CPU without AVX-512 (or
without AVX2) must never execute an instruction it lacks. The disassembly test proves that for the
whole binary on any x86-64 machine: vector code of a wider ISA may only appear in the functions of that
ISA's build (namespaces avx2:: / avx512::), never in code every CPU runs (a header's inline function
compiled inside a target region, a helper outside it).
"""

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

from plm_engine.ops import extension

pytestmark = pytest.mark.skipif(extension.load()[0] is None, reason="plm_engine._C is not built")


def test_levels_and_caps():
    levels = extension.cpu_isas_available()
    assert levels and levels[-1] == extension.cpu_isa_supported()
    start = extension.cpu_isa()
    for name in levels:
        with extension.cpu_isa_cap(name):
            assert extension.cpu_isa() == name
        assert extension.cpu_isa() == start
    with pytest.raises(RuntimeError, match="unknown instruction set 'sse9'"):
        extension.set_cpu_isa("sse9")
    assert extension.cpu_isa() == start
    if "avx512_bf16" not in levels and platform.machine() == "x86_64":
        with pytest.raises(RuntimeError, match="supports the CPU kernels' instruction sets up to"):
            extension.set_cpu_isa("avx512_bf16")


def _isa_in_subprocess(value: str) -> subprocess.CompletedProcess:
    code = "from plm_engine.ops import extension as e; print(e.cpu_isa())"
    env = {**os.environ, "PLM_ENGINE_CPU_ISA": value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_environment_cap():
    levels = extension.cpu_isas_available()
    r = _isa_in_subprocess("generic")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == levels[0]
    # A cap above what this CPU has is no error (one setting serves machines of several kinds).
    r = _isa_in_subprocess("avx512_bf16")
    assert r.returncode == 0 and r.stdout.strip() == levels[-1], r.stderr
    r = _isa_in_subprocess("avx3000")
    assert r.returncode != 0 and "PLM_ENGINE_CPU_ISA=avx3000 is not an instruction set" in r.stderr


# Registers only the wider ISAs have: zmm and the mask registers k0-k7 (AVX-512), ymm (AVX/AVX2).
_AVX512_REG = re.compile(r"%zmm\d|%k[0-7]\b")
_AVX_REG = re.compile(r"%ymm\d")


@pytest.mark.skipif(
    platform.machine() != "x86_64" or shutil.which("objdump") is None, reason="needs x86-64 and binutils' objdump"
)
def test_wide_vector_code_only_inside_its_isa_build():
    so = extension.load()[0].__file__
    out = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", so], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    leaks, func = {}, None
    for line in out.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            func = head.group(1)
            continue
        if func is None or not line.startswith(" "):
            continue
        name = func.lower()  # the builds' namespaces (avx2::, avx512::) and policies (simd::Avx2, simd::Avx512)
        if _AVX512_REG.search(line) and "avx512" not in name:
            leaks.setdefault(func, "AVX-512")
        elif _AVX_REG.search(line) and "avx2" not in name and "avx512" not in name:
            leaks.setdefault(func, "AVX")
    assert not leaks, "vector code outside its ISA build (would crash older CPUs):\n" + "\n".join(
        f"  {isa}: {name[:160]}" for name, isa in list(leaks.items())[:20]
    )
