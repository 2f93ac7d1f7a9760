"""The activation family's contract: fused SwiGLU and GELU, forward and backward.

Backend ops (csrc/activations.h says the same for C++), on 2-D (rows, n) tensors with a unit last stride
and any row stride (so the gate and up halves of one fused projection are passed as views, without a
copy), all of one shape, dtype and device; outputs contiguous in the input dtype, fp32 math:
  swiglu_fwd(gate, up) -> y                     y = silu(gate) * up
  swiglu_bwd(dy, gate, up) -> (dgate, dup)
  gelu_fwd(x, approximate) -> y                 approximate: "none" (exact, erf) or "tanh"
  gelu_bwd(dy, x, approximate) -> dx
"""

from __future__ import annotations

import torch

from plm_engine.ops.contracts import op, qualname

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GELU_APPROXIMATIONS = ("none", "tanh")


def swiglu_fwd_fake(gate, up):
    return gate.new_empty(gate.shape)


def swiglu_bwd_fake(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def gelu_fwd_fake(x, approximate):
    return x.new_empty(x.shape)


def gelu_bwd_fake(dy, x, approximate):
    return x.new_empty(x.shape)


FAKES = {
    "swiglu_fwd": swiglu_fwd_fake,
    "swiglu_bwd": swiglu_bwd_fake,
    "gelu_fwd": gelu_fwd_fake,
    "gelu_bwd": gelu_bwd_fake,
}


def row_major(t: torch.Tensor) -> torch.Tensor:
    """t (rows, n) with a unit last stride (any row stride), copying only if needed."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def register_autograd(prefix: str) -> None:
    """<prefix>swiglu_bwd / gelu_bwd as the backward of <prefix>swiglu_fwd / gelu_fwd."""
    swiglu_bwd, gelu_bwd = op(prefix, "swiglu_bwd"), op(prefix, "gelu_bwd")

    def swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def swiglu_backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(row_major(dy), gate, up)

    def gelu_setup(ctx, inputs, output):
        x, approximate = inputs
        ctx.save_for_backward(x)
        ctx.approximate = approximate

    def gelu_backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return gelu_bwd(row_major(dy), x, ctx.approximate), None

    torch.library.register_autograd(qualname(prefix, "swiglu_fwd"), swiglu_backward, setup_context=swiglu_setup)
    torch.library.register_autograd(qualname(prefix, "gelu_fwd"), gelu_backward, setup_context=gelu_setup)
