"""LayerNorm and RMSNorm, with the pre-norm block's fused residual add, on every backend.

Every fused backend implements the same pair of ops (one family for both norms, `is_rms` picks):
  norm_fwd(x, weight, bias?, residual?, eps, is_rms) -> (y, h, mean, rstd)
  norm_bwd(dy, dh?, h, weight, mean, rstd, has_bias, is_rms) -> (dx, dweight, dbias)
on 2-D contiguous (rows, n) inputs (plm_engine/ops/contracts/norms.py: the contract, fake impls and
autograd). The C++ kernels register them as torch.ops.plm_engine.norm_fwd / norm_bwd (CPU and CUDA
keys), the Triton kernels as plm_engine::triton_norm_fwd / triton_norm_bwd. This module validates the
arguments (once, for every backend) and picks the backend.
"""

from __future__ import annotations

import torch

from plm_engine.ops import backends
from plm_engine.ops.contracts import norms as contract
from plm_engine.ops.reference import layer_norm_ref, rms_norm_ref

backends.register_family(contract, ("norm_fwd",), "plm_engine.ops.triton.norms")


def fused_ops(backend: str):
    """(fwd, bwd) ops of a fused backend: 'triton', or 'cpu'/'cuda' (the same _C ops, by device)."""
    return backends.family_ops("norm_fwd", backend, ("norm_fwd", "norm_bwd"))


# ---- public functions -----------------------------------------------------------------------------


def _check_args(name, x, weight, bias, residual, eps):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: x and weight must be tensors")
    if not x.is_floating_point():
        raise ValueError(f"{name}: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name}: x must have at least one dimension")
    n = x.shape[-1]
    for label, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.shape != (n,):
            raise ValueError(f"{name}: {label} must have shape ({n},) to match x's last dim, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name}: {label} is on {t.device} but x is on {x.device}")
        if t.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"{name}: {label} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(f"{name}: bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    if residual is not None:
        for what, r, want in (("shape", tuple(residual.shape), tuple(x.shape)), ("dtype", residual.dtype, x.dtype)):
            if r != want:
                raise ValueError(f"{name}: residual {what} {r} differs from x {what} {want}")
        if residual.device != x.device:
            raise ValueError(f"{name}: residual is on {residual.device} but x is on {x.device}")
    if not eps >= 0:
        raise ValueError(f"{name}: eps must be >= 0, got {eps}")


def _unsupported(x: torch.Tensor) -> dict[str, str]:
    out = {}
    if x.dtype not in contract.KERNEL_DTYPES:
        why = f"the fused kernels take float32/float16/bfloat16, got {x.dtype}"
        out = dict.fromkeys(("triton", "cuda", "cpu"), why)
    elif x.shape[-1] > contract.TRITON_MAX_N:
        out["triton"] = f"rows longer than {contract.TRITON_MAX_N} do not fit one Triton program (got {x.shape[-1]})"
    return out


def _norm(name, is_rms, x, weight, bias, eps, residual, backend):
    _check_args(name, x, weight, bias, residual, eps)
    if x.dtype in contract.KERNEL_DTYPES:
        kernel = backends.eager_cpu_kernel("norm_fwd", backend, x, weight, bias, residual)
        if kernel is not None:  # the eager short path (backends.eager_cpu_kernel): the same kernel
            return _run(kernel, x, weight, bias, eps, residual, is_rms)
    chosen = backends.choose(x.device, "norm_fwd", backend, _unsupported(x))
    if chosen == "torch":
        if is_rms:
            return rms_norm_ref(x, weight, eps=eps, residual=residual)
        return layer_norm_ref(x, weight, bias, eps=eps, residual=residual)
    return _run(fused_ops(chosen)[0], x, weight, bias, eps, residual, is_rms)


def _run(fwd, x, weight, bias, eps, residual, is_rms):
    """norm_fwd on x's (rows, n) view; the outputs in x's shape."""
    shape, n = x.shape, x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()  # (rows, n)
    r2 = residual.reshape(-1, n).contiguous() if residual is not None else None
    y, h, _, _ = fwd(x2, weight.contiguous(), bias.contiguous() if bias is not None else None, r2, float(eps), is_rms)
    y = y.view(shape)
    return y if residual is None else (y, h.view(shape))


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of x: (..., n) -> (..., n), fp32 statistics.

    With residual (same shape and dtype as x) computes h = x + residual first and returns (norm(h), h),
    the pre-norm transformer block's fused add + norm. weight/bias: (n,), x's dtype or float32.
    backend: "triton" | "cuda" | "cpu" | "torch" | None (automatic; see plm_engine.ops.backends).
    """
    return _norm("layer_norm", False, x, weight, bias, eps, residual, backend)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of x: (..., n) -> (..., n), fp32 statistics.

    With residual returns (norm(x + residual), x + residual). weight: (n,), x's dtype or float32.
    """
    return _norm("rms_norm", True, x, weight, None, eps, residual, backend)
