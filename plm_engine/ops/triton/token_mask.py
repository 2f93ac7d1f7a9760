"""Triton token bitmask: disallowed logits -> -inf, in place.

The contract is plm_engine/ops/contracts/token_mask.py's. One program covers BLOCK_V tokens of
one mask row: it reads BLOCK_V / 32 mask words and stores -inf where a bit is clear. The logits are never
read, and allowed tokens are never written, so the kernel moves vocab / 8 bytes of mask per row plus
the disallowed logits it writes.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from plm_engine.ops import contracts
from plm_engine.ops.contracts import token_mask as contract
from plm_engine.ops.triton.common import check_device, require, signature
from plm_engine.ops.triton.guard import device_guard
from plm_engine.ops.triton.spec import KernelSpec

# ---- jit kernels -----------------------------------------------------------------------------------


@triton.jit
def _apply_token_bitmask_kernel(
    L_ptr,
    M_ptr,
    R_ptr,
    stride_l_row,
    stride_m_row,
    vocab,
    HAS_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(R_ptr + pid_m).to(tl.int64)
    else:
        row = pid_m.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = cols < vocab
    # Each word is loaded once per token it covers; the 32 loads of one word hit the same cache line.
    words = tl.load(M_ptr + pid_m.to(tl.int64) * stride_m_row + cols // 32, mask=in_vocab, other=-1)
    allowed = (words >> (cols % 32)) & 1
    ninf = tl.full([BLOCK_V], float("-inf"), tl.float32).to(L_ptr.dtype.element_ty)
    tl.store(L_ptr + row * stride_l_row + cols, ninf, mask=in_vocab & (allowed == 0))


# ---- launch configuration ----------------------------------------------------------------------------

# Tokens per program: 4096 = 16 per thread at 8 warps; a 49k-152k vocabulary is 12-38 programs per row.
_BLOCK_V = 4096
_NUM_WARPS = 8


def _block_v(vocab: int) -> int:
    """The one place that maps the vocabulary to a tile: small vocabularies get one program per row."""
    return min(_BLOCK_V, max(32, triton.next_power_of_2(vocab)))


# ---- custom op ---------------------------------------------------------------------------------------


@torch.library.custom_op("plm_engine::triton_apply_token_bitmask_", mutates_args=("logits",))
def apply_token_bitmask_(logits: Tensor, bitmask: Tensor, rows: Tensor | None) -> None:
    """Disallowed logits of logits (n, vocab) -> -inf, per packed int32 bitmask (m, ceil(vocab / 32))
    and rows (m,) (or None: row i)."""
    what = "triton_apply_token_bitmask_"
    # Memory safety only (the public op checks the argument contract): what the kernel indexes.
    check_device(logits, what)
    require(
        logits.dim() == 2 and (logits.shape[1] <= 1 or logits.stride(1) == 1),
        what,
        "logits must be (n, vocab), rows contiguous",
    )
    words = contract.bitmask_words(logits.shape[1])
    require(
        bitmask.dim() == 2 and bitmask.shape[1] == words and (words <= 1 or bitmask.stride(1) == 1),
        what,
        f"bitmask must be (m, {words}) with contiguous rows, got {tuple(bitmask.shape)}",
    )
    m = bitmask.shape[0]
    if rows is None:
        require(m == logits.shape[0], what, f"without rows, bitmask needs one row per logits row, got {m}")
    else:
        require(rows.shape == (m,), what, f"rows must be ({m},), got {tuple(rows.shape)}")
    for t in (bitmask, rows):
        require(t is None or t.device == logits.device, what, f"every tensor must be on {logits.device}")
    vocab = logits.shape[1]
    if m == 0 or vocab == 0:
        return
    block_v = _block_v(vocab)
    with device_guard(logits):
        _apply_token_bitmask_kernel[(m, triton.cdiv(vocab, block_v))](
            logits,
            bitmask,
            rows if rows is not None else bitmask,  # never read without HAS_ROWS
            logits.stride(0),
            bitmask.stride(0),
            vocab,
            HAS_ROWS=rows is not None,
            BLOCK_V=block_v,
            num_warps=_NUM_WARPS if block_v == _BLOCK_V else 4,
        )


contracts.register(contract, "triton_")


# ---- shipped configurations, for report-kernels ----------------------------------------------------


def kernel_specs() -> list[KernelSpec]:
    """The full-size tile, with and without row indices, in bf16 and fp32."""
    specs = []
    for dt in ("bf16", "fp32"):
        types = {"L_ptr": f"*{dt}", "M_ptr": "*i32", "R_ptr": "*i64", "stride_l_row": "i32", "stride_m_row": "i32"}
        types = signature(_apply_token_bitmask_kernel, {**types, "vocab": "i32"})
        for has_rows in (False, True):
            name = f"apply_token_bitmask[BLOCK_V={_BLOCK_V},rows={has_rows},{dt}]"
            flags = dict(HAS_ROWS=has_rows, BLOCK_V=_BLOCK_V)
            specs.append(KernelSpec(name, _apply_token_bitmask_kernel, types, flags, _NUM_WARPS, 1))
    return specs
