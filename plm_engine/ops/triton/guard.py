"""The device a Triton launch runs on.

A Triton launcher launches on the *current* CUDA device and its current stream, not on the device of
the tensors it is given: a cuda:1 tensor launched from a process whose current device is cuda:0 makes
the kernel dereference cuda:1 pointers on cuda:0. Every launcher in plm_engine/ops/triton therefore
launches inside `with device_guard(t):` for one of its input tensors (tests/test_gpu_suite.py
checks that statically). The guard is a plain context manager around a custom op's eager body, so
torch.compile never traces it; CPU tensors (the interpreter) get a no-op.
"""

from __future__ import annotations

import contextlib

import torch

_NO_GUARD = contextlib.nullcontext()


def device_guard(t: torch.Tensor):
    """Context manager making t's CUDA device current (and so its current stream) for a launch."""
    if t.device.type != "cuda":
        return _NO_GUARD
    # torch.cuda.device swaps the current device only when it differs: a few hundred ns per launch.
    return torch.cuda.device(t.device.index)
