"""Softmax with a scale and an optional bottom-right causal mask, on every backend.

Every fused backend implements the same pair of ops (plm_engine/ops/contracts/softmax.py):
  softmax_fwd(x, scale, causal) -> y            x: (batch, sq, sk) contiguous
  softmax_bwd(dy, y, scale) -> dx               dx = scale * y * (dy - sum(dy * y))
The C++ kernels register them as torch.ops.plm_engine.softmax_fwd / softmax_bwd (CPU and CUDA keys),
the Triton kernels as plm_engine::triton_softmax_fwd / triton_softmax_bwd. This module validates the
arguments (once, for every backend) and picks the backend.
"""

from __future__ import annotations

import math

import torch

from plm_engine.ops import backends
from plm_engine.ops.contracts import softmax as contract
from plm_engine.ops.reference import softmax_ref

backends.register_family(contract, ("softmax_fwd",), "plm_engine.ops.triton.softmax")


def fused_ops(backend: str):
    """(fwd, bwd) ops of a fused backend: 'triton', or 'cpu'/'cuda' (the same _C ops, by device)."""
    return backends.family_ops("softmax_fwd", backend, ("softmax_fwd", "softmax_bwd"))


# ---- public function ------------------------------------------------------------------------------


def _check_args(x, dim, scale, causal):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"softmax: x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"softmax: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("softmax: x must have at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"softmax: dim {dim} is out of range for a {x.dim()}-d tensor")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax: scale must be a finite positive number, got {scale}")
    if causal:
        if x.dim() < 2:
            raise ValueError(f"softmax: causal=True needs (..., sq, sk) scores, got shape {tuple(x.shape)}")
        if dim % x.dim() != x.dim() - 1:
            raise ValueError(f"softmax: causal=True normalises over the last (key) dim; got dim={dim}")


def softmax(
    x: torch.Tensor, dim: int = -1, scale: float = 1.0, causal: bool = False, *, backend: str | None = None
) -> torch.Tensor:
    """softmax(scale * x) along `dim`: same shape and dtype as x, fp32 math.

    A row of all -inf gives zeros (not NaN). causal=True: x is (..., sq, sk) attention scores and key
    j > i + (sk - sq) is masked for query i (bottom-right alignment, as with a KV prefix); a row with
    every key masked gives zeros; dim must be the last. Any other dim is moved last (one copy in, one
    copy out) and the kernels run over contiguous rows.
    backend: "triton" | "cuda" | "cpu" | "torch" | None (automatic; see plm_engine.ops.backends).
    """
    _check_args(x, dim, scale, causal)
    if x.dtype in contract.KERNEL_DTYPES and x.numel():
        kernel = backends.eager_cpu_kernel("softmax_fwd", backend, x)
        if kernel is not None:  # the eager short path (backends.eager_cpu_kernel): the same kernel
            return _run(kernel, x, dim, scale, causal)
    unsupported = {}
    if x.dtype not in contract.KERNEL_DTYPES:
        why = f"the fused kernels take float32/float16/bfloat16, got {x.dtype}"
        unsupported = dict.fromkeys(("triton", "cuda", "cpu"), why)
    chosen = backends.choose(x.device, "softmax_fwd", backend, unsupported)
    if chosen == "torch" or x.numel() == 0:
        return softmax_ref(x, dim=dim, scale=scale, causal=causal)
    return _run(fused_ops(chosen)[0], x, dim, scale, causal)


def _run(fwd, x, dim, scale, causal):
    """softmax_fwd on x's (batch, sq, sk) or (1, rows, n) view; the output in x's shape."""
    if causal:
        sq, sk = x.shape[-2], x.shape[-1]
        y = fwd(x.reshape(-1, sq, sk).contiguous(), float(scale), True)  # (batch * heads, sq, sk)
        return y.view(x.shape)
    if dim % x.dim() == x.dim() - 1:  # the common case, without the two movedim views
        return fwd(x.reshape(1, -1, x.shape[-1]).contiguous(), float(scale), False).view(x.shape)
    xm = x.movedim(dim, -1)
    y = fwd(xm.reshape(1, -1, xm.shape[-1]).contiguous(), float(scale), False)  # (1, rows, n)
    return y.view(xm.shape).movedim(-1, dim)
