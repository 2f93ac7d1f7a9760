"""The linear family's contract: y = x @ weight.T + bias for few rows (the decode case), C++ on the CPU only.

Backend op (csrc/linear.h says the same for C++):
  linear_fwd(x, weight, bias?) -> y    x (M, K), weight (N, K), bias (N,) or None, all of one dtype
                                       (fp32, fp16, bf16) -> y (M, N) in that dtype, fp32 math
"""

from __future__ import annotations

import torch

from plm_engine.ops.contracts import qualname

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear_fwd_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


FAKES = {"linear_fwd": linear_fwd_fake}


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    """Plain matmuls in the inputs' dtype: dx = dy @ W, dW = dy^T x, db = sum of dy over the rows."""
    x, weight = ctx.saved_tensors
    dx = dy @ weight if ctx.needs_input_grad[0] else None
    dw = dy.t() @ x if ctx.needs_input_grad[1] else None
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


def register_autograd(prefix: str) -> None:
    torch.library.register_autograd(qualname(prefix, "linear_fwd"), _backward, setup_context=_setup_context)
