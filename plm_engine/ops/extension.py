"""The compiled extension plm_engine._C: loading it, and what it provides here.

_C registers its kernels under torch.ops.plm_engine (TORCH_LIBRARY in csrc/bindings.cpp) for the CPU
and, when compiled with nvcc, the CUDA dispatch keys. Fake impls and autograd for those ops are
registered in Python by the op family modules (e.g. plm_engine/ops/norms.py).
"""

from __future__ import annotations

import functools
import importlib

import torch


@functools.cache
def load() -> tuple[object | None, str]:
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
    dispatcher lookup costs ~50 us, paid per op call otherwise, and _C's registrations never change."""
    if load()[0] is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"plm_engine::{op}", dispatch_key)
    except RuntimeError:  # the op is not defined at all: a _C built before it existed
        return False


def cuda_built() -> bool:
    mod = load()[0]
    return bool(mod is not None and mod.cuda_built())
