"""The CUDA norm kernels are registered whenever plm_engine._C was compiled with nvcc.

Runs on CPU: it checks the dispatcher registrations, not the kernels (tests/ops/test_norms.py runs
those on a GPU). A CPU-only build, or no build at all, skips with the reason.
"""

from __future__ import annotations

import pytest
import torch

from plm_engine.ops import backends

OPS = ["norm_fwd", "norm_bwd"]


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(cuda_build, op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"plm_engine::{op}", "CUDA"), (
        f"plm_engine._C reports cuda_built() but registers no CUDA kernel for plm_engine::{op}"
    )
    # The CPU kernel must not be displaced by the CUDA registration.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"plm_engine::{op}", "CPU")


def test_cuda_backend_reported_available(cuda_build):
    # What the dispatcher sees for CUDA tensors; building a torch.device needs no GPU.
    ok, why = backends.availability("cuda", torch.device("cuda"), "norm_fwd")
    assert ok, why
