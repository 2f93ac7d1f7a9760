"""The RoPE family's contract: rotary position embedding of q and k, out of place and in place.

Backend ops (csrc/rope.h says the same for C++), on 4-D (batch, seqlen, heads, head_dim) q/k of one
dtype whose last dim is contiguous (other strides free, so views of a fused qkv tensor work in place):
  rope(q, k, cos, sin, positions?, interleaved, conjugate) -> (q_out, k_out)     out of place
  rope_(q!, k!, cos, sin, positions?, interleaved, conjugate) -> ()              in place
cos/sin (max_seqlen, rotary_dim / 2), rotary_dim <= head_dim, float32 or q's dtype, one stride pattern;
positions int64 (batch, seqlen) contiguous, or None (position = index in the sequence). `conjugate`
rotates by the negative angle, which is the backward of the rotation, so each op is its own backward.
"""

from __future__ import annotations

import torch

from plm_engine.ops.contracts import op, qualname

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# One Triton program holds BLOCK_H x next_pow2(rotary_dim / 2) pairs; wider rotations go elsewhere.
TRITON_MAX_HALF = 1024


def rope_fake(q, k, cos, sin, positions, interleaved, conjugate):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def rope_inplace_fake(q, k, cos, sin, positions, interleaved, conjugate):
    return None


FAKES = {"rope": rope_fake, "rope_": rope_inplace_fake}


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def grads_or_zeros(ctx, dq, dk):
    """Autograd passes None for an output that did not reach the loss; the kernels want a tensor."""
    if dq is None:
        dq = torch.zeros(ctx.q_shape, dtype=dk.dtype, device=dk.device)
    if dk is None:
        dk = torch.zeros(ctx.k_shape, dtype=dq.dtype, device=dq.device)
    return last_dim_contiguous(dq), last_dim_contiguous(dk)


def register_autograd(prefix: str) -> None:
    """The backward of the out-of-place <prefix>rope: the same op by the negative angle. (The in-place op
    cannot carry autograd through torch.library; plm_engine.ops.rope wraps it in an autograd.Function.)"""
    rope_op = op(prefix, "rope")

    def setup_context(ctx, inputs, output):
        q, k, cos, sin, positions, interleaved, conjugate = inputs
        ctx.save_for_backward(cos, sin, positions)
        ctx.interleaved, ctx.conjugate = interleaved, conjugate
        ctx.q_shape, ctx.k_shape = q.shape, k.shape

    def backward(ctx, dq, dk):
        cos, sin, positions = ctx.saved_tensors
        dq, dk = grads_or_zeros(ctx, dq, dk)
        dq, dk = rope_op(dq, dk, cos, sin, positions, ctx.interleaved, not ctx.conjugate)
        return dq, dk, None, None, None, None, None

    torch.library.register_autograd(qualname(prefix, "rope"), backward, setup_context=setup_context)
