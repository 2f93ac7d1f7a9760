"""The token-mask family's contract: structured output's allow-list applied to logits, in place.

Backend op (csrc/token_mask.h says the same for C++):
  apply_token_bitmask_(logits!, bitmask, rows?) -> ()
logits (n, vocab) fp32/fp16/bf16 with a unit last stride (any row stride), changed in place; bitmask
(m, ceil(vocab / 32)) int32 with a unit last stride (any row stride, so it may be a view into a packed
host-to-device buffer): token j of mask row i is allowed iff bit j % 32 of word j // 32 is set (least
significant bit first, the layout llguidance and xgrammar fill); rows (m,) int32/int64: the logits row
of each mask row, or None for m == n and row i -> i. Rows not listed and allowed tokens are untouched;
a row listed twice gets the intersection of its masks. No gradient: it runs on sampling logits.
"""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bitmask_words(vocab_size: int) -> int:
    """int32 words per mask row for a vocabulary of vocab_size tokens."""
    return (vocab_size + 31) // 32


def apply_token_bitmask_fake(logits, bitmask, rows):
    return None


FAKES = {"apply_token_bitmask_": apply_token_bitmask_fake}


def register_autograd(prefix: str) -> None:
    """Nothing to wire: the mask is applied to sampling logits, never differentiated."""
