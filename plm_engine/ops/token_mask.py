"""Structured output's token mask: disallowed logits -> -inf, in place, on every backend.

A grammar engine (llguidance, see plm_engine/generation/structured.py) fills one packed bitmask row per
constrained sequence on the host; the sampler copies the rows to the device once per step and this op
applies them to the step's logits. The backend op and its layout: plm_engine/ops/contracts/token_mask.py.
This module checks the arguments (once, for every backend) and picks the backend.

_C registers plm_engine::apply_token_bitmask_ (CPU), Triton plm_engine::triton_apply_token_bitmask_
(GPU; CPU tensors under TRITON_INTERPRET=1). No CUDA C++ kernel: on a GPU the Triton kernel runs.
"""

from __future__ import annotations

import torch

from plm_engine.ops import backends, checks
from plm_engine.ops.contracts import token_mask as contract
from plm_engine.ops.contracts.token_mask import bitmask_words
from plm_engine.ops.reference import apply_token_bitmask_ref

__all__ = ["apply_token_bitmask_", "bitmask_words"]

_OP = "apply_token_bitmask_"
backends.register_family(contract, (_OP,), "plm_engine.ops.triton.token_mask")


def _check_args(fn: str, logits, bitmask, rows) -> None:
    """The argument contract, metadata only (never reads tensor values)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be a 2-D (n, vocab) tensor, got {getattr(logits, 'shape', logits)!r}")
    if logits.dtype not in contract.KERNEL_DTYPES:
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


def apply_token_bitmask_(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    rows: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Sets the logits of disallowed tokens to -inf, in place; returns logits.

    logits: (n, vocab); bitmask: (m, ceil(vocab / 32)) int32 packed allow-bits; rows: (m,) logits row
    of each mask row, or None (m == n). See the module docstring for the layout.
    backend: "triton" | "cpu" | "torch" | None (automatic; see plm_engine.ops.backends).
    """
    fn = "apply_token_bitmask_"
    _check_args(fn, logits, bitmask, rows)
    if rows is not None and rows.numel() and checks.value_checks():
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= logits.shape[0]:
            raise ValueError(f"{fn}: rows must be in [0, {logits.shape[0]}), got values in [{lo}, {hi}]")
    chosen = backends.choose(logits.device, _OP, backend)
    if chosen == "torch" or bitmask.shape[0] == 0 or logits.shape[1] == 0:
        return apply_token_bitmask_ref(logits, bitmask, rows)
    backends.family_ops(_OP, chosen, (_OP,))[0](logits, bitmask, rows)
    return logits
