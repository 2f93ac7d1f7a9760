"""The compiled extension plm_engine._C: loading it, and what it provides here.

_C registers its kernels under torch.ops.plm_engine for the CPU and, when compiled with nvcc, the CUDA
dispatch keys (one pattern for every family: csrc/bindings.cpp's header). Fake impls and autograd for
those ops are Python's: plm_engine/ops/contracts, registered by plm_engine.ops.backends.
"""

from __future__ import annotations

import functools
import importlib
import types

import torch


@functools.cache
def load() -> tuple[types.ModuleType | None, str]:
    """Imports plm_engine._C once. Returns (module or None, reason it is missing)."""
    try:
        mod = importlib.import_module("plm_engine._C")
    except ImportError as e:  # not built, or built against another torch
        hint = "reinstall with `pip install --no-build-isolation -e .`"
        return None, f"plm_engine._C could not be imported ({e}); {hint}"
    return mod, ""


@functools.cache
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.plm_engine.<op> has a kernel for dispatch_key ("CPU" or "CUDA"). Cached: the
    dispatcher lookup costs more than a small op, paid per op call otherwise, and _C's registrations
    never change."""
    if load()[0] is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"plm_engine::{op}", dispatch_key)
    except RuntimeError:  # the op is not defined at all: a _C built before it existed
        return False


def cuda_built() -> bool:
    mod = load()[0]
    return bool(mod is not None and mod.cuda_built())


# ---- the CPU kernels' instruction set ------------------------------------------------------------------

CPU_ISA_LEVELS = ("generic", "avx2", "avx512", "avx512_bf16")


def cpu_isa() -> str:
    """The instruction set the C++ CPU kernels run with now: "generic" (or "neon" on aarch64), "avx2",
    "avx512" or "avx512_bf16" ("none" without _C). PLM_ENGINE_CPU_ISA caps it at start-up."""
    mod = load()[0]
    return mod.cpu_isa() if mod is not None else "none"


def cpu_isa_supported() -> str:
    """The best instruction set this CPU supports for the C++ CPU kernels ("none" without _C)."""
    mod = load()[0]
    return mod.cpu_isa_supported() if mod is not None else "none"


def cpu_isas_available() -> list[str]:
    """Every instruction-set build of the CPU kernels this machine can run, lowest first."""
    best = cpu_isa_supported()
    if best == "none":
        return []
    if best not in CPU_ISA_LEVELS:  # "neon": the portable build is the only one
        return [best]
    return list(CPU_ISA_LEVELS[: CPU_ISA_LEVELS.index(best) + 1])


def set_cpu_isa(name: str) -> None:
    """Caps the CPU kernels' instruction set ("generic", "avx2", "avx512", "avx512_bf16" or "best");
    raises RuntimeError for a level this CPU does not support."""
    mod = load()[0]
    if mod is None:
        raise RuntimeError(load()[1])
    mod.set_cpu_isa(name)


# The C++ CPU op families. Each runs its own build of one source for the current ISA (csrc/cpu/simd.h);
# avx512_bf16 adds dot-product paths only where a family has one (the linear kernel's VDPBF16PS).
CPU_FAMILIES = ("norms", "rope", "softmax", "cross_entropy", "activations", "attention", "linear", "token_mask")


def cpu_family_isas() -> dict[str, str]:
    """The instruction set each C++ CPU op family runs with now ({} without _C)."""
    isa = cpu_isa()
    if isa == "none":
        return {}
    build = "avx512" if isa == "avx512_bf16" else isa
    out = {f: build for f in CPU_FAMILIES}
    if has_kernel("linear_fwd", "CPU"):
        out["linear"] = torch.ops.plm_engine.linear_cpu_isa()
    return out


class cpu_isa_cap:
    """Context manager: run the C++ CPU kernels with at most `name`'s instruction set, then restore."""

    def __init__(self, name: str):
        self.name = name
        self.saved = None

    def __enter__(self):
        self.saved = cpu_isa()
        set_cpu_isa(self.name)
        return self

    def __exit__(self, *exc):
        set_cpu_isa(self.saved if self.saved != "none" else "best")
        return False
