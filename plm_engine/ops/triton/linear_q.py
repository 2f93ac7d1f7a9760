"""Triton y = x @ W.T + bias for a weight W kept in GGUF blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).

The contract is plm_engine/ops/contracts/linear.py's linear_q_fwd: x (M, K) fp32/fp16/bf16, qweight
(N, row_bytes) uint8 (row n holds its K values as consecutive ggml blocks), bias (N,) or None ->
y (M, N) in x's dtype. The block layouts are ops.reference.dequantize_gguf_ref's (gguf's own).

One kernel body serves both shapes of the problem:
  - GEMM (M > GEMV_MAX_ROWS, prefill): a (BLOCK_M, BLOCK_N) output tile per program; inside the K loop
    the weight's (BLOCK_K, BLOCK_N) tile is gathered as bytes, decoded in registers to x's dtype and
    fed to tl.dot with an fp32 accumulator. fp32 x keeps fp32 weights and an IEEE fp32 dot
    (input_precision="ieee", no TF32), as the contract's "fp32 math" asks.
  - split-K GEMV (M <= GEMV_MAX_ROWS, decode): the same tile loop with one 16-row tile over M, but the
    K range is cut into SPLIT_K slices so that enough programs stream the quantized bytes to fill the
    GPU. Each slice writes its fp32 partial sums to a workspace; a second small kernel adds the slices
    in a fixed order (deterministic, unlike atomics), adds the bias and rounds to x's dtype.

Blocks are byte-addressed and most are not 16-byte aligned (Q4_1: 20 bytes, Q4_K: 144, Q6_K: 210), so
every weight byte is a masked gather; an fp16 scale is two bytes combined into a uint16 and bitcast.
Element (k, n) of the tile lives in block k // VALUES of row n at position j = k % VALUES.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plm_engine.ops.backends import triton_interpreted
from plm_engine.ops.contracts import linear as contract
from plm_engine.ops.reference import GGUF_BLOCKS
from plm_engine.ops.triton.common import check_device, device_sm_count, require, round_to, signature
from plm_engine.ops.triton.guard import device_guard
from plm_engine.ops.triton.spec import KernelSpec

Q4_0, Q4_1, Q8_0, Q4_K, Q6_K = (contract.GGUF_TYPES[n] for n in ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"))

# Up to this many rows of x take the split-K GEMV (tl.dot needs 16 rows: the tile is padded).
GEMV_MAX_ROWS = 16
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Every weight element is a gather of its bytes and
# scales, so the per-thread share of the weight tile sets the registers: report-kernels measured
# spills at 32 elements per thread (e.g. 64x64 with 4 warps) for the K-quants and unaligned rows, none
# at 8-16. fp32 x runs an IEEE fp32 dot (FMA, no tensor cores), heavier still: a 32-row GEMM tile.
# BLOCK_K = 32 is one block of the 32-value types or one sub-block of the K-quants' 256.
GEMV_CONFIG = (16, 64, 32, 8, 1)
GEMM_CONFIG = {torch.float16: (64, 64, 32, 8, 2), torch.bfloat16: (64, 64, 32, 8, 2), torch.float32: (32, 64, 32, 8, 2)}
REDUCE_BLOCK = 256


# ---- decoding --------------------------------------------------------------------------------------


@triton.jit
def _half(ptrs, mask):
    """The little-endian fp16 at each of ptrs (two bytes), as fp32."""
    lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptrs + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequant_tile(QW_ptr, row_bytes, offs_k, rows, mask, QTYPE: tl.constexpr):
    """The (BLOCK_K, BLOCK_N) fp32 tile W[rows, offs_k].T, decoded from the blocks as gguf does: QW_ptr
    points at the tile's first row, rows are int32 row indices from it (the byte offsets within a tile
    fit int32 and cost half the registers of 64-bit pointers). Masked elements come out 0 (their bytes
    read as 0, which decodes to 0 in every type)."""
    # Q8_0: d, 32 int8 (34 bytes). Q4_0: d, 16 bytes of nibbles (18). Q4_1: d, m, nibbles (20).
    # Q4_K: d, dmin, 12 bytes of 6-bit scales / mins, 128 bytes of nibbles (144 bytes for 256 values).
    # Q6_K: ql (128), qh (64), 16 int8 scales, d (210 bytes for 256 values).
    VALUES: tl.constexpr = 256 if QTYPE >= 12 else 32
    NBYTES: tl.constexpr = 34 if QTYPE == 8 else 18 if QTYPE == 2 else 20 if QTYPE == 3 else 144 if QTYPE == 12 else 210
    j = (offs_k % VALUES)[:, None]
    blk = QW_ptr + ((rows * row_bytes)[None, :] + ((offs_k // VALUES) * NBYTES)[:, None])
    if QTYPE == 8:
        q = tl.load(blk + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        w = q * _half(blk, mask)
    elif QTYPE == 2 or QTYPE == 3:
        # Values 0..15 are the low nibbles of bytes 0..15, values 16..31 their high nibbles.
        NIB: tl.constexpr = 2 if QTYPE == 2 else 4
        byte = tl.load(blk + NIB + (j % 16), mask=mask, other=0).to(tl.int32)
        q = tl.where(j < 16, byte & 15, byte >> 4)
        if QTYPE == 2:
            w = _half(blk, mask) * (q - 8).to(tl.float32)
        else:
            w = _half(blk, mask) * q.to(tl.float32) + _half(blk + 2, mask)
    elif QTYPE == 12:
        # Sub-block s = j // 32 of 8: its nibbles are bytes 16 + 32 * (s // 2) + l, low for even s.
        s = j // 32
        byte = tl.load(blk + 16 + 32 * (s // 2) + (j % 32), mask=mask, other=0).to(tl.int32)
        q = tl.where(s % 2 == 0, byte & 15, byte >> 4)
        # 6-bit scale and min of s: bytes 4..15 are lo[4], mid[4], hi[4]; s < 4 uses lo/mid[s] & 63,
        # s >= 4 the hi nibbles of hi[s - 4] with the top two bits of lo/mid[s - 4].
        s4 = s % 4
        lo = tl.load(blk + 4 + s4, mask=mask, other=0).to(tl.int32)
        mid = tl.load(blk + 8 + s4, mask=mask, other=0).to(tl.int32)
        hi = tl.load(blk + 12 + s4, mask=mask, other=0).to(tl.int32)
        sc = tl.where(s < 4, lo & 63, (hi & 15) | ((lo >> 2) & 48))
        mn = tl.where(s < 4, mid & 63, (hi >> 4) | ((mid >> 2) & 48))
        d = _half(blk, mask) * sc.to(tl.float32)
        dm = _half(blk + 2, mask) * mn.to(tl.float32)
        w = d * q.to(tl.float32) - dm
    else:
        # Half h = j // 128 of the super-block; r = j % 128. Low 4 bits: byte 64 * h + r % 64 of ql,
        # low nibble for r < 64. High 2 bits: byte 128 + 32 * h + r % 32, bits 2 * (r // 32).
        h = j // 128
        r = j % 128
        ql = tl.load(blk + 64 * h + (r % 64), mask=mask, other=0).to(tl.int32)
        ql = tl.where(r < 64, ql & 15, ql >> 4)
        qh = tl.load(blk + 128 + 32 * h + (r % 32), mask=mask, other=0).to(tl.int32)
        qh = (qh >> (2 * (r // 32))) & 3
        q = (ql | (qh << 4)) - 32
        scale = tl.load(blk + 192 + j // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        w = (_half(blk + 208, mask) * scale) * q.to(tl.float32)
    return w


# ---- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _linear_q_kernel(
    X_ptr,
    QW_ptr,
    B_ptr,
    Y_ptr,
    P_ptr,
    M,
    N,
    K,
    row_bytes,
    stride_xm,
    k_per_split,
    QTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (n tile, m tile, K slice): acc = x[m tile, slice] @ W[n tile, slice].T in fp32. One slice:
    y = acc (+ bias) in x's dtype. SPLIT (several): acc goes to the fp32 workspace P[slice] for
    _splitk_reduce_kernel."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    x_rows = X_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    QW_ptr += (pid_n * BLOCK_N).to(tl.int64) * row_bytes
    rows = tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _dequant_tile(QW_ptr, row_bytes, offs_k, rows, k_mask[:, None] & n_mask[None, :], QTYPE)
        if X_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(X_ptr.dtype.element_ty), acc)

    mask = m_mask[:, None] & n_mask[None, :]
    if not SPLIT:
        if HAS_BIAS:
            acc += tl.load(B_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = Y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(y_ptrs, round_to(acc, Y_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        p_ptrs = P_ptr + (pid_k.to(tl.int64) * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(p_ptrs, acc, mask=mask)


@triton.jit
def _splitk_reduce_kernel(
    P_ptr,
    B_ptr,
    Y_ptr,
    M,
    N,
    split_k,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """y = sum of the split_k partial (M, N) slices, in slice order (+ bias), in y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(split_k):
        acc += tl.load(P_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(B_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y_ptr + offs, round_to(acc, Y_ptr.dtype.element_ty, INTERPRET), mask=mask)


# ---- launcher --------------------------------------------------------------------------------------


def split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """How many K slices the GEMV cuts a call into: about four programs per SM, each slice at least one
    BLOCK_K tile. Under the interpreter a fixed 3 (tests exercise the uneven slices and the reduce)."""
    _, block_n, block_k, _, _ = GEMV_CONFIG
    k_tiles = triton.cdiv(k, block_k)
    if device.type != "cuda":
        return min(3, k_tiles)
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, GEMV_CONFIG[0])
    return max(1, min(k_tiles, triton.cdiv(4 * device_sm_count(device), programs), 64))


def _launch(x: torch.Tensor, qweight: torch.Tensor, qtype: int, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    m, k = x.shape
    n = qweight.shape[0]
    interpret = triton_interpreted()
    if m <= GEMV_MAX_ROWS:
        block_m, block_n, block_k, warps, stages = GEMV_CONFIG
        splits = split_k(m, n, k, x.device)
    else:
        block_m, block_n, block_k, warps, stages = GEMM_CONFIG[x.dtype]
        splits = 1
    # Every slice but the last holds a whole number of BLOCK_K tiles.
    k_per_split = triton.cdiv(triton.cdiv(k, block_k), splits) * block_k
    splits = triton.cdiv(k, k_per_split)
    partial = x.new_empty((splits, m, n), dtype=torch.float32) if splits > 1 else y
    b = bias if bias is not None else y
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), splits)
    with device_guard(x):
        _linear_q_kernel[grid](
            x, qweight, b, y, partial, m, n, k, qweight.shape[1], x.stride(0), k_per_split,
            QTYPE=qtype, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=splits > 1,
            HAS_BIAS=bias is not None, INTERPRET=interpret, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        if splits > 1:
            _splitk_reduce_kernel[(triton.cdiv(m * n, REDUCE_BLOCK),)](
                partial, b, y, m, n, splits, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK,
                INTERPRET=interpret, num_warps=4,
            )  # fmt: skip


# ---- registration ----------------------------------------------------------------------------------


@torch.library.custom_op("plm_engine::triton_linear_q_fwd", mutates_args=())
def linear_q_fwd(x: torch.Tensor, qweight: torch.Tensor, qtype: int, bias: torch.Tensor | None) -> torch.Tensor:
    # Memory safety only (the public op ops.linear_q checks the argument contract).
    what = "triton_linear_q_fwd"
    check_device(x, what)
    require(qtype in GGUF_BLOCKS, what, f"unknown GGUF type id {qtype}")
    values, nbytes = GGUF_BLOCKS[qtype]
    require(x.dim() == 2 and x.dtype in contract.KERNEL_DTYPES, what, "x must be (M, K) fp32/fp16/bf16")
    m, k = x.shape
    require(
        qweight.dtype == torch.uint8
        and qweight.dim() == 2
        and k % values == 0
        and qweight.shape[1] == k // values * nbytes
        and qweight.device == x.device,
        what,
        "qweight must be (N, K / values * block bytes) uint8 on x's device",
    )
    require(
        bias is None or (bias.shape == (qweight.shape[0],) and bias.dtype == x.dtype and bias.device == x.device),
        what,
        "bias must be (N,) in x's dtype and device",
    )
    x, qweight = x.contiguous(), qweight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = x.new_empty((m, qweight.shape[0]))
    if y.numel():
        _launch(x, qweight, qtype, bias, y)
    return y


torch.library.register_fake("plm_engine::triton_linear_q_fwd")(contract.linear_q_fwd_fake)


# ---- shipped configurations for the static report --------------------------------------------------

_TT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TYPE_NAMES = {i: n for n, i in contract.GGUF_TYPES.items()}


def kernel_specs() -> list[KernelSpec]:
    """Each block type x dtype x path (GEMV with several K slices, GEMM with one), and the reduce."""
    specs = []
    for tt, dtype in _TT.items():
        sig = signature(
            _linear_q_kernel,
            {"X_ptr": f"*{tt}", "QW_ptr": "*u8", "B_ptr": f"*{tt}", "Y_ptr": f"*{tt}", "P_ptr": "*fp32"},
        )
        sig.update(M="i32", N="i32", K="i32", row_bytes="i32", stride_xm="i32", k_per_split="i32")
        for qtype, name in _TYPE_NAMES.items():
            for path, (bm, bn, bk, warps, stages), splits in (
                ("gemv", GEMV_CONFIG, True),
                ("gemm", GEMM_CONFIG[dtype], False),
            ):
                flags = {
                    "QTYPE": qtype,
                    "BLOCK_M": bm,
                    "BLOCK_N": bn,
                    "BLOCK_K": bk,
                    "SPLIT": splits,
                    "HAS_BIAS": True,
                    "INTERPRET": False,
                }
                config = f"{path},{name},{bm}x{bn}x{bk},{tt}"
                specs.append(KernelSpec(f"linear_q[{config}]", _linear_q_kernel, sig, flags, warps, stages))
        red = signature(_splitk_reduce_kernel, {"P_ptr": "*fp32", "B_ptr": f"*{tt}", "Y_ptr": f"*{tt}"})
        red.update(M="i32", N="i32", split_k="i32")
        flags = {"HAS_BIAS": True, "BLOCK": REDUCE_BLOCK, "INTERPRET": False}
        specs.append(KernelSpec(f"linear_q_splitk_reduce[{tt}]", _splitk_reduce_kernel, red, flags, 4, 1))
    return specs
