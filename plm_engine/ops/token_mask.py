"""Structured output's token mask: disallowed logits -> -inf, in place, on every backend.

A grammar engine (llguidance, see plm_engine/generation/structured.py) fills one packed bitmask row per
constrained sequence on the host; the sampler copies the rows to the device once per step and this op
applies them to the step's logits. The contract (csrc/token_mask.h), shared by every backend:
  apply_token_bitmask_(logits!, bitmask, rows?) -> ()
logits (n, vocab) fp32/fp16/bf16 with a unit last stride (any row stride), changed in place; bitmask
(m, ceil(vocab / 32)) int32 with a unit last stride (any row stride, so it may be a view into a packed
host-to-device buffer): token j of mask row i is allowed iff bit j % 32 of word j // 32 is set (least
significant bit first, the layout llguidance and xgrammar fill); rows (m,) int32/int64: the logits row
of each mask row, or None for m == n and row i -> i. Rows not listed and allowed tokens are untouched;
a row listed twice gets the intersection of its masks.

_C registers plm_engine::apply_token_bitmask_ (CPU), Triton plm_engine::triton_apply_token_bitmask_
(GPU; CPU tensors under TRITON_INTERPRET=1). No CUDA C++ kernel: on a GPU the Triton kernel runs.
"""

from __future__ import annotations

from plm_engine.ops import backends, checks
from plm_engine.ops.contracts import token_mask as contract
from plm_engine.ops.reference import apply_token_bitmask_ref

backends.register_family(contract, (contract.OP,), "plm_engine.ops.triton.token_mask")
bitmask_words = contract.bitmask_words
check_args = contract.check_args


def apply_token_bitmask_(logits, bitmask, rows=None, *, backend=None):
    """Sets the logits of disallowed tokens to -inf, in place; returns logits.

    logits: (n, vocab); bitmask: (m, ceil(vocab / 32)) int32 packed allow-bits; rows: (m,) logits row
    of each mask row, or None (m == n). See the module docstring for the layout.
    backend: "triton" | "cpu" | "torch" | None (automatic; see plm_engine.ops.backends).
    """
    fn = "apply_token_bitmask_"
    check_args(fn, logits, bitmask, rows)
    if rows is not None and rows.numel() and checks.value_checks():
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= logits.shape[0]:
            raise ValueError(f"{fn}: rows must be in [0, {logits.shape[0]}), got values in [{lo}, {hi}]")
    chosen = backends.choose(logits.device, contract.OP, backend)
    if chosen == "torch" or bitmask.shape[0] == 0 or logits.shape[1] == 0:
        return apply_token_bitmask_ref(logits, bitmask, rows)
    backends.family_ops(contract.OP, chosen, (contract.OP,))[0](logits, bitmask, rows)
    return logits
