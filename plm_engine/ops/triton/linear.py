"""Triton kernels for y = x @ W.T (+ bias) with W kept in GGUF blocks: the dequantization happens in
registers, inside the loop over K, so only the quantized bytes are read from memory.

The contract is plm_engine/ops/contracts/linear.py's linear_q_fwd: x (M, K) fp32/fp16/bf16, qweight
(N, row_bytes) uint8 rows of ggml blocks (ops.reference.GGUF_BLOCKS), bias (N,) or None -> y (M, N) in
x's dtype. Q8_0, Q4_0 and Q4_1 blocks hold 32 values: an fp16 scale d (Q4_1: then an fp16 minimum m),
then the quants: Q8_0 int8 q (value d * q); Q4_0 / Q4_1 16 bytes of nibbles, value j in the low nibble of
byte j and value j + 16 in the high one (Q4_0: d * (q - 8); Q4_1: d * q + m). The K-quants' super-blocks
hold 256 values as 8 sub-blocks of 32, each with its own scales (Q4_K: 6-bit scale and min, Q6_K: two
int8 scales), decoded by _subblock_values.

Two kernels:
  decode (M <= GEMV_MAX_ROWS): a split-K GEMV. Program (column block, K slice, row) multiplies its
    slice of BLOCK_N weight rows by one x row in fp32 and writes a partial sum; the partials are summed
    in a fixed order afterwards (deterministic, no atomics). Enough K slices to fill the GPU even when
    N is small, which a decode step's matrices are.
  prefill (more rows): a tiled GEMM. Each (BLOCK_M, BLOCK_N) tile walks K one ggml block at a time,
    decodes the (BLOCK_N, 32) weight tile to x's dtype and accumulates two K = 16 tl.dot in fp32 (fp32
    x: full fp32 dots, "ieee", not TF32: the quantized values carry more than TF32's 10 mantissa bits).
Both step through K 32 values (one block, or one K-quant sub-block) at a time: a row's scales are then
one load per step, and the quants give values 0..15 and 16..31 as two tiles that meet x's two halves,
with no gather. Blocks are byte-addressed (34, 18, 20, 144, 210 bytes: mostly not 16-byte aligned).

Under TRITON_INTERPRET=1 (tests on CPU) bf16 tl.dot is wrong (ops/triton/interpreter.py), so there the
GEMM's operands are fp32.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from plm_engine.ops import backends
from plm_engine.ops.contracts import linear as contract
from plm_engine.ops.triton.common import check_device, device_sm_count, require, round_to
from plm_engine.ops.triton.guard import device_guard
from plm_engine.ops.triton.spec import KernelSpec

# The block types with Triton kernels, by ggml type id, and the bytes of one block: 32 values for Q8_0,
# Q4_0, Q4_1; a super-block of 256 values (8 sub-blocks of 32) for Q4_K and Q6_K (ggml's layouts;
# ops.reference.GGUF_BLOCKS has them too).
TRITON_TYPES = {contract.GGUF_TYPES[name]: name for name in ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")}
BLOCK_BYTES = {
    contract.GGUF_TYPES["Q8_0"]: 34,
    contract.GGUF_TYPES["Q4_0"]: 18,
    contract.GGUF_TYPES["Q4_1"]: 20,
    contract.GGUF_TYPES["Q4_K"]: 144,
    contract.GGUF_TYPES["Q6_K"]: 210,
}
BLOCK_VALUES = {qtype: 256 if name.endswith("_K") else 32 for qtype, name in TRITON_TYPES.items()}
GEMV_MAX_ROWS = 8  # up to this many rows of x: the split-K GEMV; more: the GEMM


# ---- jit kernels -----------------------------------------------------------------------------------


@triton.jit
def _fp16_at(ptr):
    """The fp16 stored little-endian at the byte pointers `ptr` (any shape), as fp32."""
    lo = tl.load(ptr).to(tl.uint16)
    hi = tl.load(ptr + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _block_values(blocks, QTYPE: tl.constexpr):
    """One block of each row: `blocks` (BLOCK_N,) byte pointers to the blocks' starts -> its values 0..15 and
    16..31 as two fp32 (BLOCK_N, 16) tiles (a Q4 byte holds value j in its low nibble, j + 16 in its high
    one, so the two halves come from one load of the 16 quant bytes)."""
    r16 = tl.arange(0, 16)
    d = _fp16_at(blocks)[:, None]
    if QTYPE == 8:  # Q8_0: [d][32 x int8]
        lo = tl.load(blocks[:, None] + 2 + r16[None, :]).to(tl.int8, bitcast=True).to(tl.float32) * d
        hi = tl.load(blocks[:, None] + 18 + r16[None, :]).to(tl.int8, bitcast=True).to(tl.float32) * d
    elif QTYPE == 2:  # Q4_0: [d][16 bytes], value d * (q - 8)
        q = tl.load(blocks[:, None] + 2 + r16[None, :]).to(tl.int32)
        lo = ((q & 0xF) - 8).to(tl.float32) * d
        hi = ((q >> 4) - 8).to(tl.float32) * d
    else:  # Q4_1: [d][m][16 bytes], value d * q + m
        m = _fp16_at(blocks + 2)[:, None]
        q = tl.load(blocks[:, None] + 4 + r16[None, :]).to(tl.int32)
        lo = (q & 0xF).to(tl.float32) * d + m
        hi = (q >> 4).to(tl.float32) * d + m
    return lo, hi


@triton.jit
def _subblock_values(blocks, s, QTYPE: tl.constexpr):
    """Sub-block s (0..7, 32 values) of one K-quant super-block per row: `blocks` (BLOCK_N,) byte pointers to
    the super-blocks' starts -> its values 0..15 and 16..31 as two fp32 (BLOCK_N, 16) tiles, computed as
    gguf's dequantize does (ops.reference.dequantize_gguf_ref)."""
    r16 = tl.arange(0, 16)
    if QTYPE == 12:
        # Q4_K: [d][dmin][12 bytes: 6-bit scales and mins][128 bytes of nibbles]. Sub-block s reads the low
        # (even s) or high (odd s) nibbles of bytes 32 * (s // 2) .. + 31. Its scale / min: s < 4 the low 6
        # bits of byte s / s + 4 of the 12; s >= 4 the nibbles of byte s + 4 with the top 2 bits of
        # bytes s - 4 / s as their bits 4-5.
        s4 = s % 4
        b_lo = tl.load(blocks + 4 + s4).to(tl.int32)
        b_mid = tl.load(blocks + 8 + s4).to(tl.int32)
        b_hi = tl.load(blocks + 12 + s4).to(tl.int32)
        sc = tl.where(s < 4, b_lo & 63, (b_hi & 15) | ((b_lo >> 2) & 48)).to(tl.float32)
        mn = tl.where(s < 4, b_mid & 63, (b_hi >> 4) | ((b_mid >> 2) & 48)).to(tl.float32)
        d = (_fp16_at(blocks) * sc)[:, None]
        dm = (_fp16_at(blocks + 2) * mn)[:, None]
        quants = blocks[:, None] + 16 + 32 * (s // 2) + r16[None, :]
        shift = 4 * (s % 2)
        lo = d * ((tl.load(quants).to(tl.int32) >> shift) & 15).to(tl.float32) - dm
        hi = d * ((tl.load(quants + 16).to(tl.int32) >> shift) & 15).to(tl.float32) - dm
    else:
        # Q6_K: [ql: 128 bytes][qh: 64 bytes][16 int8 scales][d]. Half h = s // 4 of the super-block, u = s % 4:
        # the low 4 bits are the low (u < 2) or high nibbles of ql bytes 64 h + 32 (u % 2) + l, the high 2
        # bits are bits 2u, 2u + 1 of qh byte 32 h + l; value d * scale[2 s (+1 for l >= 16)] * (q - 32).
        h = s // 4
        u = s % 4
        ql = blocks[:, None] + 64 * h + 32 * (u % 2) + r16[None, :]
        qh = blocks[:, None] + 128 + 32 * h + r16[None, :]
        lshift = 4 * (u // 2)
        q_lo = ((tl.load(ql).to(tl.int32) >> lshift) & 15) | (((tl.load(qh).to(tl.int32) >> (2 * u)) & 3) << 4)
        q_hi = ((tl.load(ql + 16).to(tl.int32) >> lshift) & 15) | (
            ((tl.load(qh + 16).to(tl.int32) >> (2 * u)) & 3) << 4
        )
        d = _fp16_at(blocks + 208)
        sc_lo = tl.load(blocks + 192 + 2 * s).to(tl.int8, bitcast=True).to(tl.float32)
        sc_hi = tl.load(blocks + 193 + 2 * s).to(tl.int8, bitcast=True).to(tl.float32)
        lo = (d * sc_lo)[:, None] * (q_lo - 32).to(tl.float32)
        hi = (d * sc_hi)[:, None] * (q_hi - 32).to(tl.float32)
    return lo, hi


@triton.jit
def _unit_values(row_start, b, QTYPE: tl.constexpr):
    """The b-th 32 values of K of each row (`row_start`: (BLOCK_N,) byte pointers to the rows) as two fp32
    (BLOCK_N, 16) tiles: a whole block of Q8_0 / Q4_0 / Q4_1, a sub-block of Q4_K / Q6_K."""
    if QTYPE == 12 or QTYPE == 14:
        super_bytes: tl.constexpr = 144 if QTYPE == 12 else 210
        lo, hi = _subblock_values(row_start + (b // 8) * super_bytes, b % 8, QTYPE)
    else:
        block_bytes: tl.constexpr = 34 if QTYPE == 8 else (18 if QTYPE == 2 else 20)
        lo, hi = _block_values(row_start + b * block_bytes, QTYPE)
    return lo, hi


@triton.jit
def _gemv_kernel(
    X_ptr,
    W_ptr,
    P_ptr,
    M,
    N,
    K,
    stride_xm,
    row_bytes,
    blocks_per_split,
    QTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (column block, K slice, x row): P[split, m, cols] = sum over the slice of W[cols, k] x[m, k]."""
    pid_n, split, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # Rows past N read row 0 (always there) and are not stored.
    row_start = W_ptr + tl.where(row_ok, rows, 0).to(tl.int64) * row_bytes
    x_row = X_ptr + m.to(tl.int64) * stride_xm
    r16 = tl.arange(0, 16)
    b_begin = split * blocks_per_split
    b_end = tl.minimum(b_begin + blocks_per_split, K // 32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for b in range(b_begin, b_end):
        lo, hi = _unit_values(row_start, b, QTYPE)
        x_lo = tl.load(x_row + b * 32 + r16).to(tl.float32)
        x_hi = tl.load(x_row + b * 32 + 16 + r16).to(tl.float32)
        acc += tl.sum(lo * x_lo[None, :] + hi * x_hi[None, :], axis=1)
    tl.store(P_ptr + (split * M + m).to(tl.int64) * N + rows, acc, mask=row_ok)


@triton.jit
def _gemm_kernel(
    X_ptr,
    W_ptr,
    B_ptr,
    Y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    row_bytes,
    QTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (row block, column block): Y tile = X tile @ dequant(W tile)^T (+ bias), fp32 accumulator,
    one ggml block (32 values of K: a sub-block of the K-quants) per step, as two K = 16 dots."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    row_start = W_ptr + tl.where(n_ok, rn, 0).to(tl.int64) * row_bytes
    x_rows = X_ptr + rm[:, None].to(tl.int64) * stride_xm
    r16 = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(0, K // 32):
        lo, hi = _unit_values(row_start, b, QTYPE)
        x_lo = tl.load(x_rows + b * 32 + r16[None, :], mask=m_ok[:, None], other=0.0)
        x_hi = tl.load(x_rows + b * 32 + 16 + r16[None, :], mask=m_ok[:, None], other=0.0)
        if INTERPRET or X_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(x_lo.to(tl.float32), tl.trans(lo), acc, input_precision="ieee")
            acc = tl.dot(x_hi.to(tl.float32), tl.trans(hi), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_lo, tl.trans(lo.to(X_ptr.dtype.element_ty)), acc)
            acc = tl.dot(x_hi, tl.trans(hi.to(X_ptr.dtype.element_ty)), acc)
    if HAS_BIAS:
        acc += tl.load(B_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y_ptrs, round_to(acc, Y_ptr.dtype.element_ty, INTERPRET), mask=m_ok[:, None] & n_ok[None, :])


# ---- launch configuration (shared by the launcher and kernel_specs) --------------------------------

GEMV_BLOCK_N, GEMV_WARPS = 64, 4
GEMM_BLOCK_N, GEMM_WARPS = 64, 4


def gemm_block_m(rows: int) -> int:
    # 16 or 64 rows (a 32-row tile made ptxas spill for Q4_1 in fp32, report-kernels with Triton 3.8).
    return 16 if rows <= 16 else 64


def gemv_blocks_per_split(n: int, k: int, device: torch.device) -> int:
    """ggml blocks (32 values of K) per K slice of the GEMV: enough slices for ~4 programs per SM, each
    slice at least 4 blocks."""
    sms = device_sm_count(device) if device.type == "cuda" else 4  # cached: this runs on every decode call
    splits = max(1, triton.cdiv(4 * sms, triton.cdiv(n, GEMV_BLOCK_N)))
    return max(4, triton.cdiv(k // 32, splits))


# ---- launcher and custom op ------------------------------------------------------------------------


def _check(x, qweight, qtype, bias, what):
    # Memory safety only (the public op checks the argument contract): what the kernels index.
    check_device(x, what)
    require(qtype in TRITON_TYPES, what, f"no Triton kernel for GGUF type id {qtype}")
    values, nbytes = BLOCK_VALUES[qtype], BLOCK_BYTES[qtype]
    require(x.dim() == 2 and x.stride(1) == 1, what, f"x must be (M, K) with unit last stride, got {tuple(x.shape)}")
    k = x.shape[1]
    require(
        qweight.dtype == torch.uint8
        and qweight.dim() == 2
        and qweight.is_contiguous()
        and k % values == 0
        and qweight.shape[1] == k // values * nbytes,
        what,
        f"qweight must be contiguous uint8 (N, {k // values * nbytes}) for K = {k}, got {tuple(qweight.shape)}",
    )
    for t in (qweight,) + ((bias,) if bias is not None else ()):
        require(t.device == x.device, what, f"every tensor must be on {x.device}, got one on {t.device}")
    if bias is not None:
        require(bias.shape == (qweight.shape[0],) and bias.is_contiguous(), what, "bias must be contiguous (N,)")


@torch.library.custom_op("plm_engine::triton_linear_q_fwd", mutates_args=())
def linear_q_fwd(x: Tensor, qweight: Tensor, qtype: int, bias: Optional[Tensor]) -> Tensor:
    """x (M, K) @ the (N, K) weight in GGUF blocks qweight (N, row_bytes) uint8 of ggml type qtype, + bias."""
    _check(x, qweight, qtype, bias, "triton_linear_q_fwd")
    (m, k), n = x.shape, qweight.shape[0]
    if m == 0 or n == 0 or k == 0:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
        return (y + bias if bias is not None else y).to(x.dtype)
    if m <= GEMV_MAX_ROWS:
        per_split = gemv_blocks_per_split(n, k, x.device)
        splits = triton.cdiv(k // 32, per_split)
        partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        with device_guard(x):
            _gemv_kernel[(triton.cdiv(n, GEMV_BLOCK_N), splits, m)](
                x,
                qweight,
                partial,
                m,
                n,
                k,
                x.stride(0),
                qweight.shape[1],
                per_split,
                QTYPE=qtype,
                BLOCK_N=GEMV_BLOCK_N,
                num_warps=GEMV_WARPS,
            )
        y = partial.sum(0) if splits > 1 else partial[0]
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = gemm_block_m(m)
    with device_guard(x):
        _gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, GEMM_BLOCK_N))](
            x,
            qweight,
            bias if bias is not None else x,
            y,
            m,
            n,
            k,
            x.stride(0),
            y.stride(0),
            qweight.shape[1],
            QTYPE=qtype,
            HAS_BIAS=bias is not None,
            BLOCK_M=block_m,
            BLOCK_N=GEMM_BLOCK_N,
            INTERPRET=backends.triton_interpreted(),
            num_warps=GEMM_WARPS,
        )
    return y


torch.library.register_fake("plm_engine::triton_linear_q_fwd")(contract.linear_q_fwd_fake)


# ---- shipped configurations, for report-kernels ----------------------------------------------------


def kernel_specs() -> list[KernelSpec]:
    """The GEMV and every GEMM row tile, for each block type, bf16 and fp32 x (fp16 compiles like bf16)."""
    specs = []
    for qtype, name in TRITON_TYPES.items():
        for dt in ("bf16", "fp32"):
            gemv = {"X_ptr": f"*{dt}", "W_ptr": "*u8", "P_ptr": "*fp32"}
            gemv |= {a: "i32" for a in ("M", "N", "K", "stride_xm", "row_bytes", "blocks_per_split")}
            sig = {a: gemv.get(a, "constexpr") for a in _gemv_kernel.arg_names}
            specs.append(
                KernelSpec(
                    f"linear_q_gemv[{name},{dt}]",
                    _gemv_kernel,
                    sig,
                    dict(QTYPE=qtype, BLOCK_N=GEMV_BLOCK_N),
                    GEMV_WARPS,
                    1,
                )
            )
            gemm = {"X_ptr": f"*{dt}", "W_ptr": "*u8", "B_ptr": f"*{dt}", "Y_ptr": f"*{dt}"}
            gemm |= {a: "i32" for a in ("M", "N", "K", "stride_xm", "stride_ym", "row_bytes")}
            sig = {a: gemm.get(a, "constexpr") for a in _gemm_kernel.arg_names}
            for block_m in (16, 64):
                specs.append(
                    KernelSpec(
                        f"linear_q_gemm[{name},BLOCK_M={block_m},{dt}]",
                        _gemm_kernel,
                        sig,
                        dict(
                            QTYPE=qtype,
                            HAS_BIAS=True,
                            BLOCK_M=block_m,
                            BLOCK_N=GEMM_BLOCK_N,
                            INTERPRET=False,
                        ),
                        GEMM_WARPS,
                        1,
                    )
                )
    return specs
