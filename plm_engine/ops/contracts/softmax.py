"""The softmax family's contract: softmax with a scale and an optional bottom-right causal mask.

Backend ops (csrc/softmax.h says the same for C++):
  softmax_fwd(x, scale, causal) -> y            x: (batch, sq, sk) contiguous, y like x, fp32 math
  softmax_bwd(dy, y, scale) -> dx               dx = scale * y * (dy - sum(dy * y))
A row whose unmasked entries are all -inf (or that has none) gives zeros, never NaN.
"""

from __future__ import annotations

import torch

from plm_engine.ops.contracts import op, qualname

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def softmax_fwd_fake(x, scale, causal):
    return torch.empty_like(x)


def softmax_bwd_fake(dy, y, scale):
    return torch.empty_like(y)


FAKES = {"softmax_fwd": softmax_fwd_fake, "softmax_bwd": softmax_bwd_fake}


def register_autograd(prefix: str) -> None:
    """<prefix>softmax_bwd as the backward of <prefix>softmax_fwd.

    The backward needs only the output y: masked keys and -inf entries have y = 0, so their gradient
    is 0 without the mask being stored.
    """
    bwd_op = op(prefix, "softmax_bwd")

    def setup_context(ctx, inputs, output):
        _, scale, _ = inputs
        ctx.save_for_backward(output)
        ctx.scale = scale

    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return bwd_op(dy.contiguous(), y, ctx.scale), None, None

    torch.library.register_autograd(qualname(prefix, "softmax_fwd"), backward, setup_context=setup_context)
