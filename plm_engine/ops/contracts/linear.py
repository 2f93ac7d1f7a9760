"""The linear family's contract: y = x @ weight.T + bias for few rows (the decode case), C++ on the CPU only.

Backend op (csrc/linear.h says the same for C++):
  linear_fwd(x, weight, bias?) -> y    x (M, K), weight (N, K), bias (N,) or None, all of one dtype
                                       (fp32, fp16, bf16) -> y (M, N) in that dtype, fp32 math
  linear_q_fwd(x, qweight, qtype, bias?) -> y
                                       the same with a GGUF-quantized weight: qweight (N, row_bytes) uint8
                                       rows of ggml blocks of type qtype (GGUF_TYPES); no autograd (the
                                       public op takes the differentiable torch path when x needs a grad)
"""

from __future__ import annotations

import torch

from plm_engine.ops.contracts import qualname

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The GGUF block types linear_q_fwd reads: name -> ggml type id (csrc/linear.h: GgmlType).
GGUF_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}


def linear_fwd_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def linear_q_fwd_fake(x, qweight, qtype, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


FAKES = {"linear_fwd": linear_fwd_fake, "linear_q_fwd": linear_q_fwd_fake}


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
