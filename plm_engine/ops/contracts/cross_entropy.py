"""The cross-entropy family's contract: each token's loss and its gradient in one pass over the logits.

Backend ops (csrc/cross_entropy.h says the same for C++), on (N, V) contiguous logits and (N,) int64
targets:
  cross_entropy_fwd(logits, target, ignore_index, label_smoothing) -> (loss, dlogits)
  cross_entropy_fwd_inplace(logits!, target, ignore_index, label_smoothing) -> loss
loss is each row's fp32 loss and dlogits the gradient of that row's loss alone (in the logits' dtype);
the in-place op writes dlogits over the logits. Ignored rows get loss 0 and a zero gradient row.
"""

from __future__ import annotations

import torch

from plm_engine.ops.contracts import qualname

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cross_entropy_fwd_fake(logits, target, ignore_index, label_smoothing):
    return logits.new_empty((logits.shape[0],), dtype=torch.float32), torch.empty_like(logits)


def cross_entropy_fwd_inplace_fake(logits, target, ignore_index, label_smoothing):
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


FAKES = {"cross_entropy_fwd": cross_entropy_fwd_fake, "cross_entropy_fwd_inplace": cross_entropy_fwd_inplace_fake}


def register_autograd(prefix: str) -> None:
    """Makes <prefix>cross_entropy_fwd differentiable in the logits: grad = dlogits * dloss.

    This is the traceable, out-of-place form used when the op is called directly (torch.compile,
    opcheck). plm_engine.ops.cross_entropy goes through its own autograd.Function, which scales the
    saved buffer in place instead and so never allocates a second (N, V) tensor.
    """

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])

    def backward(ctx, dloss, _ddlogits):
        (dlogits,) = ctx.saved_tensors
        if dloss is None:
            return torch.zeros_like(dlogits), None, None, None
        return (dlogits * dloss.unsqueeze(1)).to(dlogits.dtype), None, None, None

    torch.library.register_autograd(qualname(prefix, "cross_entropy_fwd"), backward, setup_context=setup_context)
