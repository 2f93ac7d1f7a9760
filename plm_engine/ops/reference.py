"""Pure-PyTorch references: the executable specification of every op.

They are the test oracle (run in fp64 or fp32), the `torch` backend, and the last-resort fallback.
Written for clarity, not speed: math in fp32 (or fp64 for fp64 inputs), cast to the input dtype at the
end, exactly as the fused kernels are specified to do.
"""

from __future__ import annotations

import torch


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _add_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    # The sum is rounded to x's dtype before normalising: that rounded h is what the pre-norm block
    # carries on, so the norm must see the same value.
    return x if residual is None else x + residual


def layer_norm_ref(x, weight, bias=None, eps=1e-5, residual=None):
    """y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias over the last dim, h = x (+ residual).

    Returns y, or (y, h) when residual is given.
    """
    h = _add_residual(x, residual)
    acc = _acc_dtype(x)
    hf = h.to(acc)
    mean = hf.mean(dim=-1, keepdim=True)
    var = (hf - mean).square().mean(dim=-1, keepdim=True)
    y = (hf - mean) * torch.rsqrt(var + eps) * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm_ref(x, weight, eps=1e-6, residual=None):
    """y = h / sqrt(mean(h^2) + eps) * weight over the last dim, h = x (+ residual).

    Returns y, or (y, h) when residual is given.
    """
    h = _add_residual(x, residual)
    acc = _acc_dtype(x)
    hf = h.to(acc)
    y = hf * torch.rsqrt(hf.square().mean(dim=-1, keepdim=True) + eps) * weight.to(acc)
    y = y.to(x.dtype)
    return y if residual is None else (y, h)
