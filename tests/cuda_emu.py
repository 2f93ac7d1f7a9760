"""The CUDA-emulation test extension: csrc/cuda/*_kernels.cuh compiled as host C++ under
csrc/testing/cuda_emu.h, with host launchers, loaded as torch.ops.plm_emu (tests only, never in the wheel).

The build goes to build/cuda_emu/ in the checkout (or a temporary folder if that is not writable);
torch.utils.cpp_extension.load rebuilds only what changed, so a second session starts in about a second.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import sys
import sysconfig
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = [
    "emu_bindings.cpp",
    "emu_norms.cpp",
    "emu_softmax.cpp",
    "emu_activations.cpp",
    "emu_rope.cpp",
    "emu_paged_attention.cpp",
    "emu_selftest.cpp",
]
# The host halves of the CUDA headers the kernels and the emulator include.
# cuda_fp16.h includes crt/ and CCCL's nv/target, which the nvidia-* and triton wheels' copies lack today.
NEEDED_HEADERS = (
    "cuda_fp16.h",
    "cuda_bf16.h",
    "vector_types.h",
    "vector_functions.h",
    "crt/host_defines.h",
    "nv/target",
)


def cuda_include_dir() -> str | None:
    """A folder with the CUDA headers the emulation needs: a toolkit's, or a wheel's that has all of them
    (the nvidia-* wheels of a CUDA build of torch; no nvcc needed)."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    candidates += sorted(glob.glob("/usr/local/cuda*/include"), reverse=True)
    purelib = sysconfig.get_paths()["purelib"]
    candidates += sorted(glob.glob(os.path.join(purelib, "nvidia", "cu*", "include")), reverse=True)
    candidates += sorted(glob.glob(os.path.join(purelib, "nvidia", "cuda_runtime", "include")))
    for c in candidates:
        if all(os.path.isfile(os.path.join(c, h)) for h in NEEDED_HEADERS):
            return c
    return None


def _build_dir() -> str:
    d = os.path.join(ROOT, "build", "cuda_emu")
    try:
        os.makedirs(d, exist_ok=True)
        probe = os.path.join(d, ".write_probe")
        with open(probe, "w"):
            pass
        os.remove(probe)
        return d
    except OSError:
        return tempfile.mkdtemp(prefix="plm_cuda_emu_")


@functools.cache
def load() -> tuple[object | None, str]:
    """Builds (if needed) and loads the extension once per session. Returns (torch.ops.plm_emu or None,
    the reason it cannot be built here); raises if the build itself fails."""
    if not sys.platform.startswith("linux"):
        return None, f"the CUDA emulation uses glibc ucontext fibers (Linux); this is {sys.platform}"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None, f"no C++ compiler ({cxx}) to build the CUDA emulation"
    inc = cuda_include_dir()
    if inc is None:
        return None, (
            "no CUDA headers (cuda_fp16.h, vector_types.h, ...) found: install a CUDA toolkit or a CUDA "
            "build of torch, or set CUDA_HOME"
        )
    from torch.utils import cpp_extension

    flags = [
        "-O1",  # a quarter of -O2's compile time, and the emulated kernels still run fast enough
        "-g0",
        # The kernels type-pun packs (reinterpret_cast to uint4 / __half2), as CUDA code does and nvcc allows.
        "-fno-strict-aliasing",
        "-Wno-unknown-pragmas",  # #pragma unroll
    ]
    # A build failure is not a reason to skip: with a compiler and the headers present it means a kernel
    # header or the emulator no longer compiles as host code, which the tests must report.
    cpp_extension.load(
        name="plm_engine_cuda_emu",
        sources=[os.path.join(CSRC, "testing", s) for s in SOURCES],
        extra_cflags=flags,
        extra_include_paths=[CSRC, inc],
        build_directory=_build_dir(),
        is_python_module=False,
        verbose=os.environ.get("PLM_ENGINE_EMU_VERBOSE", "0") == "1",
    )
    return torch.ops.plm_emu, ""
