"""Shared test helpers: the accuracy rule, backend lists, input makers."""

from __future__ import annotations

import pytest
import torch

from plm_engine.ops import backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Absolute slack on top of the 2x rule, per dtype (a kernel may round differently by one ulp of the
# output where PyTorch happens to be exact).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_2x_rule(ours: torch.Tensor, ref: torch.Tensor, torch_lowp: torch.Tensor, dtype=None, what=""):
    """FlashAttention's rule: our error vs a high-precision reference is at most 2x PyTorch's error
    when PyTorch runs the same computation in the same low precision (plus a small atol)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all() or not torch.isfinite(ref).all(), f"{what}: non-finite output"
    dtype = dtype or ours.dtype
    e_ours, e_torch = max_err(ours, ref), max_err(torch_lowp, ref)
    bound = 2 * e_torch + ATOL[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
    assert e_ours <= bound, f"{what}: error {e_ours:.3g} > 2 x torch's {e_torch:.3g} + atol (bound {bound:.3g})"


def cpu_backends(op: str) -> list:
    """Every backend that can run `op` on CPU tensors here, as pytest params (triton only interpreted)."""
    params = []
    for b in ("cpu", "triton", "torch"):
        ok, why = backends.availability(b, torch.device("cpu"), op)
        params.append(pytest.param(b, marks=() if ok else pytest.mark.skip(reason=why), id=b))
    return params


def device_backends(op: str) -> list:
    """(device, backend) pairs: what runs here on CPU, plus the GPU backends (marked, skipped here)."""
    cpu = [pytest.param("cpu", p.values[0], marks=p.marks, id=f"cpu-{p.id}") for p in cpu_backends(op)]
    gpu = [pytest.param("cuda", b, marks=pytest.mark.cuda, id=f"cuda-{b}") for b in ("triton", "cuda")]
    return cpu + gpu
