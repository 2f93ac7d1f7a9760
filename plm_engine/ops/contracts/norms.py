"""The norm family's contract: LayerNorm and RMSNorm with the pre-norm block's fused residual add.

Backend ops (one pair for both norms, `is_rms` picks; csrc/norms.h says the same for C++):
  norm_fwd(x, weight, bias?, residual?, eps, is_rms) -> (y, h, mean, rstd)
      x, residual (rows, n) contiguous; weight, bias (n,) in x's dtype or float32.
      h = x + residual in x's dtype (empty when residual is None); mean (rows,) fp32, empty for RMSNorm;
      rstd (rows,) fp32.
  norm_bwd(dy, dh?, h, weight, mean, rstd, has_bias, is_rms) -> (dx, dweight, dbias)
      dx in h's dtype (dh added in; also the residual's gradient); dweight, dbias (n,) in weight's
      dtype, dbias empty when has_bias is False.
"""

from __future__ import annotations

import torch

from plm_engine.ops.contracts import op, qualname

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# One Triton program holds a whole row in registers; longer rows go to the other backends.
TRITON_MAX_N = 65536


def norm_fwd_fake(x, weight, bias, residual, eps, is_rms):
    rows = x.shape[0]
    h = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    mean = x.new_empty((0 if is_rms else rows,), dtype=torch.float32)
    rstd = x.new_empty((rows,), dtype=torch.float32)
    return torch.empty_like(x), h, mean, rstd


def norm_bwd_fake(dy, dh, h, weight, mean, rstd, has_bias, is_rms):
    db = torch.empty_like(weight) if has_bias else weight.new_empty((0,))
    return torch.empty_like(h), torch.empty_like(weight), db


FAKES = {"norm_fwd": norm_fwd_fake, "norm_bwd": norm_bwd_fake}


def register_autograd(prefix: str) -> None:
    """<prefix>norm_bwd as the backward of <prefix>norm_fwd."""
    bwd_op = op(prefix, "norm_bwd")

    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, eps, is_rms = inputs
        _, h, mean, rstd = output
        ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
        ctx.has_bias, ctx.has_residual, ctx.is_rms = bias is not None, residual is not None, is_rms

    def backward(ctx, dy, dh, _dmean, _drstd):
        h, weight, mean, rstd = ctx.saved_tensors
        dy = torch.zeros_like(h) if dy is None else dy.contiguous()
        dh = dh.contiguous() if (ctx.has_residual and dh is not None) else None
        dx, dw, db = bwd_op(dy, dh, h, weight, mean, rstd, ctx.has_bias, ctx.is_rms)
        return dx, dw, (db if ctx.has_bias else None), (dx if ctx.has_residual else None), None, None

    torch.library.register_autograd(qualname(prefix, "norm_fwd"), backward, setup_context=setup_context)
