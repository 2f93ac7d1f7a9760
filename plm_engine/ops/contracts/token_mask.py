"""The token-mask family's contract (structured output): disallowed logits -> -inf, in place.

Backend op (csrc/token_mask.h says the same for C++; plm_engine/ops/token_mask.py documents the layout):
  apply_token_bitmask_(logits!, bitmask, rows?) -> ()
_C registers plm_engine::apply_token_bitmask_ (CPU), Triton plm_engine::triton_apply_token_bitmask_.
"""

from __future__ import annotations

import torch

OP = "apply_token_bitmask_"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def apply_token_bitmask_fake(logits, bitmask, rows):
    return None


def bitmask_words(vocab_size: int) -> int:
    """int32 words per mask row for a vocabulary of vocab_size tokens."""
    return (vocab_size + 31) // 32


def check_args(fn: str, logits, bitmask, rows) -> None:
    """Metadata checks of every backend's arguments (never reads tensor values)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be a 2-D (n, vocab) tensor, got {getattr(logits, 'shape', logits)!r}")
    if logits.dtype not in KERNEL_DTYPES:
        raise ValueError(f"{fn}: logits must be float32/float16/bfloat16, got {logits.dtype}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"{fn}: logits must be contiguous in its last dim, got strides {logits.stride()}")
    words = bitmask_words(logits.shape[1])
    if (
        not isinstance(bitmask, torch.Tensor)
        or bitmask.dtype != torch.int32
        or bitmask.dim() != 2
        or bitmask.shape[1] != words
    ):
        raise ValueError(
            f"{fn}: bitmask must be int32 (m, {words}) for a vocabulary of {logits.shape[1]}, got "
            f"{getattr(bitmask, 'dtype', type(bitmask).__name__)} {tuple(getattr(bitmask, 'shape', ()))}"
        )
    if bitmask.shape[1] > 1 and bitmask.stride(1) != 1:
        raise ValueError(f"{fn}: bitmask must be contiguous in its last dim, got strides {bitmask.stride()}")
    if bitmask.device != logits.device:
        raise ValueError(f"{fn}: bitmask is on {bitmask.device} but logits are on {logits.device}")
    m = bitmask.shape[0]
    if rows is None:
        if m != logits.shape[0]:
            raise ValueError(f"{fn}: without rows, bitmask needs one row per logits row ({logits.shape[0]}), got {m}")
        return
    if (
        not isinstance(rows, torch.Tensor)
        or rows.dtype not in (torch.int32, torch.int64)
        or rows.dim() != 1
        or rows.shape[0] != m
    ):
        raise ValueError(
            f"{fn}: rows must be ({m},) int32/int64, one per bitmask row, got "
            f"{getattr(rows, 'dtype', type(rows).__name__)} {tuple(getattr(rows, 'shape', ()))}"
        )
    if rows.device != logits.device:
        raise ValueError(f"{fn}: rows are on {rows.device} but logits are on {logits.device}")


FAKES = {"apply_token_bitmask_": apply_token_bitmask_fake}


def register_autograd(prefix: str) -> None:
    """An in-place mask of sampling logits: no gradient to wire."""
