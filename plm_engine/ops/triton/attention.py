"""Triton FlashAttention-2: dense and variable-length (packed) attention, forward and backward.

The contract is plm_engine/ops/contracts/attention.py's (layouts, GQA head mapping h -> h // group, bottom-right
causal alignment, lse in natural-log units, fully masked query rows -> zeros and lse = -inf).

Forward (_attn_fwd_kernel): one program per (query block of BLOCK_M rows, head, sequence). It streams
the key/value blocks of its sequence through an online softmax in fp32: scores are pre-multiplied by
softmax_scale * log2(e) so that every exponential is an exp2, the running max m and sum l rescale the
output accumulator when the max grows, and P is cast to the input dtype for the P @ V tensor-core dot
(FlashAttention-2 practice; the accumulator stays fp32). It saves lse = (m + log2 l) * ln 2 per row.

Backward: recomputation from q, k, v, out, lse, with no (seqlen x seqlen) buffer anywhere.
  1. _attn_bwd_preprocess_kernel: delta = rowsum(dO * O), fp32, laid out like lse.
  2. _attn_bwd_dkdv_kernel: one program per (key block, kv head, sequence) keeps its dK and dV in fp32
     registers and walks over the query blocks that see it, for every query head of its GQA group in
     turn: dV += P^T dO, dK += dS^T Q, dS = P * (dO V^T - delta). The group's sum is formed inside the
     kernel, so K/V are never repeated and no fp32 partials are written and reduced afterwards.
  3. _attn_bwd_dq_kernel: one program per (query block, head, sequence) walks over the key blocks it
     sees: dQ += dS K.
  Two kernels rather than FlashAttention-2's single kernel with an atomic fp32 dQ: no atomics, a
  result independent of scheduling, no extra fp32 dQ buffer and conversion pass; the price is that
  Q K^T and dO V^T are computed twice (once per kernel), about 20% more FLOPs in the backward.

Causal: key j is visible to query i iff j <= i + (seqlen_k - seqlen_q). Loop bounds skip the blocks
that are fully masked; each loop is split into a part over fully visible blocks, which applies no
mask at all, and a part over the diagonal (and ragged last) blocks, which masks. The causal forward
and dQ grids run the heaviest query blocks (the last ones) first, to shorten the tail of the launch.

Variable length: the same kernels with IS_VARLEN: a sequence's rows start at cu_seqlens[b] instead of
b * stride_batch, the grid is sized by max_seqlen and programs past their sequence's end return.

Relative position bias (T5; HAS_BIAS): every kernel that forms scores adds bias[h, clamp(key - query
position, -max_distance, max_distance)], one fp32 row per head of table[bucket, h] * log2(e) that the
launcher builds from the bucket table and lookup (plm_engine/ops/position_bias.py): a gather from a
row of a few hundred floats per score, no (seqlen x seqlen) bias. dtable: see _bwd. Without a bias the
bias arguments are None, which Triton turns into constexprs: the plain kernels compile as before.

head_dim: any multiple of 8 up to 256; the kernels work on BLOCK_D = next_pow2(head_dim) (>= 16, the
smallest tl.dot size) columns and mask the rest. Strides are passed for every tensor; only the last
dimension has to be contiguous, so a q sliced out of a fused QKV projection is read in place.

Launch configurations come from one function (launch_config), used by the launchers and
kernel_specs(), which lists every shipped configuration for report-kernels' zero-spill check. There is
no autotuning: the tables are what compiles without spills for sm_80 and sm_90; under the interpreter
(tests on CPU) small blocks keep the runtime down. There are two GPU tables because Triton specialises
on 16-divisibility: when every data pointer is 16-byte aligned and every tile stride a multiple of 16
elements ("aligned", the usual case), a row of a tile loads as 16-byte vectors; otherwise (e.g. 3 heads
of 40: row stride 120) each element is a scalar load with its own address, which needs many more
registers, so unaligned launches get smaller tiles.

Under TRITON_INTERPRET=1 the fp32 -> bf16 cast truncates instead of rounding, so the INTERPRET flag
rounds to nearest-even by hand (for P, dS and the stored outputs); tests/conftest.py patches the
interpreter's bf16 tl.dot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from plm_engine.ops import backends, contracts
from plm_engine.ops.contracts import attention as contract
from plm_engine.ops.contracts.attention import MAX_HEAD_DIM
from plm_engine.ops.triton.common import check_device, require, round_to, signature
from plm_engine.ops.triton.guard import device_guard
from plm_engine.ops.triton.spec import KernelSpec

LOG2E = math.log2(math.e)  # host side; the kernels spell it out (no globals in @triton.jit)

# ---- jit helpers -------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (rows, BLOCK_D) tile; rows >= n_rows (with MASK_ROWS) and columns >= HEAD_DIM read as 0."""
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    x = round_to(x, ptrs.dtype.element_ty, INTERPRET)
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, x, mask=(rows < n_rows)[:, None])
    else:
        tl.store(ptrs, x, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _seq_range(Cu_ptr, b, seqlen, IS_VARLEN: tl.constexpr):
    """(first row as int64, length) of sequence b: from cu_seqlens, or row 0 and the dense length."""
    if IS_VARLEN:
        start = tl.load(Cu_ptr + b)
        length = tl.load(Cu_ptr + b + 1) - start
        start = start.to(tl.int64)
    else:
        start = tl.zeros([], dtype=tl.int64)
        length = seqlen
    return start, length


@triton.jit
def _key_range(m0, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys that query rows [m0, m0 + BLOCK_M) see: [0, full_end) visible to every row of the block
    (no mask needed; a multiple of BLOCK_N) and [full_end, hi) that need the causal / length mask."""
    if CAUSAL:
        shift = seqlen_k - seqlen_q
        hi = tl.minimum(seqlen_k, tl.maximum(m0 + BLOCK_M + shift, 0))
        full_end = tl.minimum(hi, tl.maximum(m0 + shift + 1, 0)) // BLOCK_N * BLOCK_N
    else:
        hi = seqlen_k
        full_end = seqlen_k // BLOCK_N * BLOCK_N
    return full_end, hi


@triton.jit
def _rel_pos(key_pos, query_pos, max_distance):
    """key - query position clamped to [-max_distance, max_distance]: an index into the bias row and
    the bucket lookup, both centred on relative position 0 (T5's buckets are flat beyond the clamp)."""
    return tl.minimum(tl.maximum(key_pos - query_pos, -max_distance), max_distance)


# ---- forward -----------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    stride_kn,
    stride_vn,
    m0,
    lo,
    hi,
    seqlen_q,
    seqlen_k,
    qk_scale,
    offs_m,
    offs_n,
    offs_d,
    Bias,
    max_distance,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi): MASKED applies the key-length and causal masks.
    HAS_BIAS adds the head's relative position bias row (log2 units, centred at Bias) to the scores."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        # The block's first row as int64 (row * stride can pass 2**31 on long sequences); rows inside it
        # stay int32.
        n64 = tl.cast(start_n, tl.int64)
        k = _load_tile(
            K + n64 * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :],
            cols,
            seqlen_k,
            offs_d,
            MASKED,
            HEAD_DIM,
            BLOCK_D,
        )
        s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
        if HAS_BIAS:
            s += tl.load(Bias + _rel_pos(cols[None, :], (m0 + offs_m)[:, None] + (seqlen_k - seqlen_q), max_distance))
        if MASKED:
            keep = cols[None, :] < seqlen_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= (m0 + offs_m)[:, None] + (seqlen_k - seqlen_q))
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # A row with every key masked so far keeps m = -inf; subtracting 0 instead makes exp2 give 0
            # rather than exp2(-inf + inf) = NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(
            V + n64 * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :],
            cols,
            seqlen_k,
            offs_d,
            MASKED,
            HEAD_DIM,
            BLOCK_D,
        )
        acc = tl.dot(round_to(p, v.dtype, INTERPRET), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    CuQ,
    CuK,
    Bias,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_om,
    stride_oh,
    stride_lb,
    stride_lh,
    seqlen_q,
    seqlen_k,
    group,
    qk_scale,
    max_distance,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INTERPRET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # the last query blocks see the most keys: start them first
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q = _seq_range(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, seqlen_k = _seq_range(CuK, b, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    kvh = h // group
    b64, h64, kvh64 = b.to(tl.int64), h.to(tl.int64), kvh.to(tl.int64)
    # 64-bit base offsets: batch * stride, and head * stride on a (b, h, s, d) view (stride s * d),
    # can pass 2**31; offsets inside a tile stay 32-bit.
    Q += b64 * stride_qb + (q_start + m0) * stride_qm + h64 * stride_qh
    Out += b64 * stride_ob + (q_start + m0) * stride_om + h64 * stride_oh
    K += b64 * stride_kb + k_start * stride_kn + kvh64 * stride_kh
    V += b64 * stride_vb + k_start * stride_vn + kvh64 * stride_vh
    Lse += b64 * stride_lb + h64 * stride_lh + q_start + m0
    if HAS_BIAS:  # this head's bias row (2 * max_distance + 1 values), at relative position 0
        Bias += h64 * (2 * max_distance + 1) + max_distance

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_left = seqlen_q - m0
    q = _load_tile(
        Q + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, rows_left, offs_d, True, HEAD_DIM, BLOCK_D
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_end, hi = _key_range(m0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K,
        V,
        stride_kn,
        stride_vn,
        m0,
        0,
        full_end,
        seqlen_q,
        seqlen_k,
        qk_scale,
        offs_m,
        offs_n,
        offs_d,
        Bias,
        max_distance,
        False,
        CAUSAL,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        INTERPRET,
        HAS_BIAS,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        K,
        V,
        stride_kn,
        stride_vn,
        m0,
        full_end,
        hi,
        seqlen_q,
        seqlen_k,
        qk_scale,
        offs_m,
        offs_n,
        offs_d,
        Bias,
        max_distance,
        True,
        CAUSAL,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        INTERPRET,
        HAS_BIAS,
    )

    # l = 0 exactly when every key of the row is masked (otherwise its max contributes exp2(0) = 1):
    # zeros out and lse = -inf, as the reference.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    _store_tile(
        Out + offs_m[:, None] * stride_om + offs_d[None, :],
        out,
        offs_m,
        rows_left,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        INTERPRET,
    )
    tl.store(Lse + offs_m, lse, mask=offs_m < rows_left)


# ---- backward ----------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out,
    DO,
    Delta,
    CuQ,
    stride_ob,
    stride_om,
    stride_oh,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_lb,
    stride_lh,
    seqlen_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32: the softmax-backward term shared by every key of a row."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q = _seq_range(CuQ, b, seqlen_q, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_left = seqlen_q - m0
    Out += b64 * stride_ob + (q_start + m0) * stride_om + h64 * stride_oh
    DO += b64 * stride_dob + (q_start + m0) * stride_dom + h64 * stride_doh
    o = _load_tile(
        Out + offs_m[:, None] * stride_om + offs_d[None, :], offs_m, rows_left, offs_d, True, HEAD_DIM, BLOCK_D
    ).to(tl.float32)
    do = _load_tile(
        DO + offs_m[:, None] * stride_dom + offs_d[None, :], offs_m, rows_left, offs_d, True, HEAD_DIM, BLOCK_D
    ).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + q_start + m0 + offs_m, delta, mask=offs_m < rows_left)


@triton.jit
def _lse_log2(Lse_ptrs, mask):
    """lse in log2 units; +inf for fully masked rows (and rows past the end), so exp2(s - lse) = 0."""
    lse = tl.load(Lse_ptrs, mask=mask, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    Q,
    DO,
    Lse,
    Delta,
    stride_qm,
    stride_dom,
    n0,
    lo,
    hi,
    seqlen_q,
    seqlen_k,
    qk_scale,
    offs_m,
    offs_n,
    offs_d,
    Bias,
    max_distance,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INTERPRET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """dK, dV of one key block from query blocks [lo, hi) of one head, in the transposed orientation
    (keys x queries) so that P^T and dS^T come out of the dots without a transpose."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen_q
        m64 = tl.cast(start_m, tl.int64)
        q = _load_tile(
            Q + m64 * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :],
            rows,
            seqlen_q,
            offs_d,
            True,
            HEAD_DIM,
            BLOCK_D,
        )
        lse2 = _lse_log2(Lse + rows, row_ok)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale
        if HAS_BIAS:
            s_t += tl.load(Bias + _rel_pos((n0 + offs_n)[:, None], rows[None, :] + (seqlen_k - seqlen_q), max_distance))
        p_t = tl.exp2(s_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(rows[None, :] + (seqlen_k - seqlen_q) >= (n0 + offs_n)[:, None], p_t, 0.0)
        do = _load_tile(
            DO + m64 * stride_dom + offs_m[:, None] * stride_dom + offs_d[None, :],
            rows,
            seqlen_q,
            offs_d,
            True,
            HEAD_DIM,
            BLOCK_D,
        )
        dv = tl.dot(round_to(p_t, do.dtype, INTERPRET), do, dv)
        delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(round_to(ds_t, q.dtype, INTERPRET), q, dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    CuQ,
    CuK,
    Bias,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    stride_dvb,
    stride_dvn,
    stride_dvh,
    stride_lb,
    stride_lh,
    seqlen_q,
    seqlen_k,
    group,
    sm_scale,
    qk_scale,
    max_distance,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INTERPRET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q = _seq_range(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, seqlen_k = _seq_range(CuK, b, seqlen_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols_left = seqlen_k - n0
    kvh64 = kvh.to(tl.int64)
    K += b64 * stride_kb + (k_start + n0) * stride_kn + kvh64 * stride_kh
    V += b64 * stride_vb + (k_start + n0) * stride_vn + kvh64 * stride_vh
    DK += b64 * stride_dkb + (k_start + n0) * stride_dkn + kvh64 * stride_dkh
    DV += b64 * stride_dvb + (k_start + n0) * stride_dvn + kvh64 * stride_dvh
    # Keys past the end load as 0. Their dK/dV rows may end up holding anything, but they are never
    # stored, and a key row's gradients do not depend on the other keys': the loop needs no key mask.
    k = _load_tile(
        K + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, cols_left, offs_d, True, HEAD_DIM, BLOCK_D
    )
    v = _load_tile(
        V + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, cols_left, offs_d, True, HEAD_DIM, BLOCK_D
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        # Query i sees key j iff i >= j - shift. Blocks before m_lo see none of these keys; blocks
        # from m_full on see all of them; the ones in between straddle the diagonal.
        shift = seqlen_k - seqlen_q
        m_lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
        m_full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        m_full = 0
    for g in range(group):
        h = kvh64 * group + g
        Qh = Q + b64 * stride_qb + q_start * stride_qm + h * stride_qh
        DOh = DO + b64 * stride_dob + q_start * stride_dom + h * stride_doh
        Lh = Lse + b64 * stride_lb + h * stride_lh + q_start
        Dh = Delta + b64 * stride_lb + h * stride_lh + q_start
        Bh = Bias
        if HAS_BIAS:
            Bh = Bias + h * (2 * max_distance + 1) + max_distance
        if CAUSAL:
            dk, dv = _attn_bwd_dkdv_inner(
                dk,
                dv,
                k,
                v,
                Qh,
                DOh,
                Lh,
                Dh,
                stride_qm,
                stride_dom,
                n0,
                m_lo,
                tl.minimum(m_full, seqlen_q),
                seqlen_q,
                seqlen_k,
                qk_scale,
                offs_m,
                offs_n,
                offs_d,
                Bh,
                max_distance,
                True,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_M,
                INTERPRET,
                HAS_BIAS,
            )
        dk, dv = _attn_bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            Qh,
            DOh,
            Lh,
            Dh,
            stride_qm,
            stride_dom,
            n0,
            m_full,
            seqlen_q,
            seqlen_q,
            seqlen_k,
            qk_scale,
            offs_m,
            offs_n,
            offs_d,
            Bh,
            max_distance,
            False,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_M,
            INTERPRET,
            HAS_BIAS,
        )
    # s = sm_scale * q.k, so dK picks up sm_scale once; dV = P^T dO has no scale.
    _store_tile(
        DK + offs_n[:, None] * stride_dkn + offs_d[None, :],
        dk * sm_scale,
        offs_n,
        cols_left,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        INTERPRET,
    )
    _store_tile(
        DV + offs_n[:, None] * stride_dvn + offs_d[None, :], dv, offs_n, cols_left, offs_d, HEAD_DIM, BLOCK_D, INTERPRET
    )


@triton.jit
def _attn_bwd_dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
    K,
    V,
    stride_kn,
    stride_vn,
    m0,
    lo,
    hi,
    seqlen_q,
    seqlen_k,
    qk_scale,
    offs_m,
    offs_n,
    offs_d,
    Bias,
    Buckets,
    DBias,
    max_distance,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dQ of one query block from key blocks [lo, hi). HAS_BIAS also sums dS into DBias, the head's
    fp32 row of bias gradients per clamped relative position (see _bwd for why and how)."""
    shift = seqlen_k - seqlen_q
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n64 = tl.cast(start_n, tl.int64)
        k = _load_tile(
            K + n64 * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :],
            cols,
            seqlen_k,
            offs_d,
            MASKED,
            HEAD_DIM,
            BLOCK_D,
        )
        v = _load_tile(
            V + n64 * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :],
            cols,
            seqlen_k,
            offs_d,
            MASKED,
            HEAD_DIM,
            BLOCK_D,
        )
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if HAS_BIAS:
            rel = _rel_pos(cols[None, :], (m0 + offs_m)[:, None] + shift, max_distance)
            s += tl.load(Bias + rel)
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            keep = cols[None, :] < seqlen_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= (m0 + offs_m)[:, None] + (seqlen_k - seqlen_q))
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(round_to(ds, k.dtype, INTERPRET), k, dq)
        if HAS_BIAS:
            # The tile's relative positions span [first, last]. Buckets are monotone on each side of 0
            # and the two sides' bucket ranges are disjoint, so equal buckets at both ends mean one
            # bucket for the whole tile: one atomic of the tile's sum (on any position of that
            # bucket; _bwd sums positions into buckets). Otherwise one atomic per element (dS is 0
            # outside the sequence, so those are masked off), on per-position addresses: at most
            # min(BLOCK_M, BLOCK_N) elements of a tile share one.
            first = _rel_pos(start_n, m0 + BLOCK_M - 1 + shift, max_distance)
            last = _rel_pos(start_n + BLOCK_N - 1, m0 + shift, max_distance)
            if tl.load(Buckets + first) == tl.load(Buckets + last):
                tl.atomic_add(DBias + first, tl.sum(tl.sum(ds, 1), 0), sem="relaxed")
            else:
                ok = ((m0 + offs_m)[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
                tl.atomic_add(DBias + rel, ds, mask=ok, sem="relaxed")
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DQ,
    CuQ,
    CuK,
    Bias,
    Buckets,
    DBias,
    stride_qb,
    stride_qm,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_dob,
    stride_dom,
    stride_doh,
    stride_dqb,
    stride_dqm,
    stride_dqh,
    stride_lb,
    stride_lh,
    seqlen_q,
    seqlen_k,
    group,
    sm_scale,
    qk_scale,
    max_distance,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INTERPRET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q = _seq_range(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, seqlen_k = _seq_range(CuK, b, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    kvh = h // group
    b64, h64, kvh64 = b.to(tl.int64), h.to(tl.int64), kvh.to(tl.int64)
    Q += b64 * stride_qb + (q_start + m0) * stride_qm + h64 * stride_qh
    DO += b64 * stride_dob + (q_start + m0) * stride_dom + h64 * stride_doh
    DQ += b64 * stride_dqb + (q_start + m0) * stride_dqm + h64 * stride_dqh
    K += b64 * stride_kb + k_start * stride_kn + kvh64 * stride_kh
    V += b64 * stride_vb + k_start * stride_vn + kvh64 * stride_vh
    row_off = b64 * stride_lb + h64 * stride_lh + q_start + m0
    if HAS_BIAS:  # the head's rows of bias and bias gradients, and the lookup, at relative position 0
        Bias += h64 * (2 * max_distance + 1) + max_distance
        DBias += h64 * (2 * max_distance + 1) + max_distance
        Buckets += max_distance

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_left = seqlen_q - m0
    q = _load_tile(
        Q + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, rows_left, offs_d, True, HEAD_DIM, BLOCK_D
    )
    do = _load_tile(
        DO + offs_m[:, None] * stride_dom + offs_d[None, :], offs_m, rows_left, offs_d, True, HEAD_DIM, BLOCK_D
    )
    lse2 = _lse_log2(Lse + row_off + offs_m, offs_m < rows_left)
    delta = tl.load(Delta + row_off + offs_m, mask=offs_m < rows_left, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    full_end, hi = _key_range(m0, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        K,
        V,
        stride_kn,
        stride_vn,
        m0,
        0,
        full_end,
        seqlen_q,
        seqlen_k,
        qk_scale,
        offs_m,
        offs_n,
        offs_d,
        Bias,
        Buckets,
        DBias,
        max_distance,
        False,
        CAUSAL,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        INTERPRET,
        HAS_BIAS,
        BLOCK_M,
    )
    dq = _attn_bwd_dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        K,
        V,
        stride_kn,
        stride_vn,
        m0,
        full_end,
        hi,
        seqlen_q,
        seqlen_k,
        qk_scale,
        offs_m,
        offs_n,
        offs_d,
        Bias,
        Buckets,
        DBias,
        max_distance,
        True,
        CAUSAL,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        INTERPRET,
        HAS_BIAS,
        BLOCK_M,
    )
    _store_tile(
        DQ + offs_m[:, None] * stride_dqm + offs_d[None, :],
        dq * sm_scale,
        offs_m,
        rows_left,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        INTERPRET,
    )


# ---- launch configuration (shared by the launchers and kernel_specs) -----------------------------------

KERNELS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")
BLOCK_DS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class AttnConfig:
    """Tile sizes of one kernel: BLOCK_M query rows x BLOCK_N key rows (the dK/dV kernel holds a
    BLOCK_N key block and streams BLOCK_M query blocks; the dQ kernel the reverse)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# GPU table, per BLOCK_D, picked by compiling candidates for sm_80 and sm_90 (report-kernels) and
# keeping register headroom, since a spilled tile costs more than a smaller tile. Forward: a 128-row
# query tile amortises each K/V load; the fp32 accumulator (BLOCK_M x BLOCK_D) and scores (BLOCK_M x
# BLOCK_N) live in registers, which caps BLOCK_N at 64 for head_dim 128 (128 x 128 spills on sm_80)
# and BLOCK_M at 64 for 256. dK/dV is the tightest kernel: it keeps K, V and two fp32 accumulators of
# BLOCK_N x BLOCK_D for its whole life, so its streamed query tile is narrow (16 rows at head_dim 128;
# 32 x 64 reached 255 registers) and head_dim 256 gives up pipelining (num_stages 2 spills). dQ keeps
# Q, dO and one accumulator. 8 warps everywhere but the tiny preprocess: half the registers per thread
# of 4 warps for the same tile, and two warpgroups for Hopper's wgmma on 128-row tiles.
# head_dim 16 keeps BLOCK_N 64: 128 x 128 spilled on sm_80 once the head offsets became 64-bit.
_GPU_CONFIGS = {
    "fwd": {
        16: AttnConfig(128, 64, 8, 3),
        32: AttnConfig(128, 128, 8, 3),
        64: AttnConfig(128, 128, 8, 3),
        128: AttnConfig(128, 64, 8, 3),
        256: AttnConfig(64, 64, 8, 2),
    },
    "bwd_preprocess": {d: AttnConfig(128, 0, 4, 1) for d in (16, 32, 64)}
    | {128: AttnConfig(64, 0, 4, 1), 256: AttnConfig(32, 0, 4, 1)},
    "bwd_dkdv": {
        16: AttnConfig(32, 128, 8, 3),
        32: AttnConfig(32, 128, 8, 3),
        64: AttnConfig(32, 128, 8, 3),
        128: AttnConfig(16, 64, 8, 2),
        256: AttnConfig(32, 32, 8, 1),
    },
    "bwd_dq": {
        16: AttnConfig(128, 32, 8, 3),
        32: AttnConfig(128, 32, 8, 3),
        64: AttnConfig(128, 32, 8, 3),
        128: AttnConfig(128, 32, 8, 2),
        256: AttnConfig(64, 32, 8, 2),
    },
}
# Unaligned launches (see _aligned): the same kernels with scalar loads, whose 64-bit addresses take
# the registers the aligned table spends on tile size. Smaller tiles, same 8 warps (4 warps doubles the
# registers per thread and spilled from head_dim 64 up; 16 warps caps them at 128 and spills too);
# compiled as report-kernels' align1; head_dim 128 streams 16-key blocks (64 x 32 sat at 255
# registers and spilled on sm_90 with 64-bit head offsets; 64 x 16 leaves 15-70 spare). The backward
# has no BLOCK_D 256 entry: dK/dV's four 16 x 256 tiles plus the scalar addresses spill even at
# 16 x 16, so _bwd copies such inputs into aligned buffers (_realigned) and runs the aligned table.
_GPU_CONFIGS_UNALIGNED = {
    "fwd": {
        16: AttnConfig(128, 128, 8, 3),
        32: AttnConfig(128, 128, 8, 3),
        64: AttnConfig(64, 64, 8, 2),
        128: AttnConfig(64, 16, 8, 2),
        256: AttnConfig(32, 16, 8, 1),
    },
    "bwd_preprocess": {d: _GPU_CONFIGS["bwd_preprocess"][d] for d in (16, 32, 64, 128)},
    "bwd_dkdv": {
        16: AttnConfig(32, 128, 8, 3),
        32: AttnConfig(16, 64, 8, 2),
        64: AttnConfig(16, 64, 8, 2),
        128: AttnConfig(16, 32, 8, 1),
    },
    "bwd_dq": {
        16: AttnConfig(128, 32, 8, 3),
        32: AttnConfig(64, 32, 8, 2),
        64: AttnConfig(64, 32, 8, 2),
        128: AttnConfig(32, 32, 8, 1),
    },
}
# Interpreter (CPU tests): a program instance costs a fixed slice of Python time and numpy's work on a
# tile little, so mid-sized tiles are fastest (see benchmarks/results/NOTES.md). BLOCK_M != BLOCK_N, both ways
# round, so the tests cover diagonal blocks that are not square.
_INTERPRET_CONFIGS = {
    "fwd": AttnConfig(64, 32, 4, 1),
    "bwd_preprocess": AttnConfig(64, 0, 4, 1),
    "bwd_dkdv": AttnConfig(32, 64, 4, 1),
    "bwd_dq": AttnConfig(64, 32, 4, 1),
}


# Relative position bias variants (HAS_BIAS), aligned launches only (the launchers realign other
# inputs). Each (BLOCK_M x BLOCK_N) score tile also gathers as many bias values, through as many
# 64-bit addresses, and dQ issues the dtable atomics: the plain tiles reach 255 registers or spill, so
# these are the largest that report-kernels compiles for sm_80 and sm_90 at <= 240 registers with no
# spill. Forward: half the keys per tile (or half the queries where the halved keys still did not
# fit); dQ: 64-row query tiles; dK/dV: two pipeline stages instead of three (three reached 255 even
# at 16 x 64 for head_dim 32) and half the keys, from head_dim 128 one stage (no room for a second
# K/V tile in flight). BLOCK_D 16 keeps the plain forward and dQ tiles.
_BIAS_CONFIGS = {
    "fwd": {
        16: _GPU_CONFIGS["fwd"][16],
        32: AttnConfig(128, 64, 8, 3),
        64: AttnConfig(64, 64, 8, 3),
        128: AttnConfig(64, 64, 8, 3),
        256: AttnConfig(32, 32, 8, 2),
    },
    "bwd_dq": {
        16: _GPU_CONFIGS["bwd_dq"][16],
        32: AttnConfig(64, 32, 8, 3),
        64: AttnConfig(64, 16, 8, 3),
        128: AttnConfig(64, 32, 8, 2),
        256: AttnConfig(32, 32, 8, 2),
    },
    "bwd_dkdv": {
        16: AttnConfig(32, 64, 8, 2),
        32: AttnConfig(32, 64, 8, 2),
        64: AttnConfig(32, 32, 8, 2),
        128: AttnConfig(16, 32, 8, 1),
        256: AttnConfig(16, 16, 8, 1),
    },
}


def block_d_for(head_dim: int) -> int:
    """The power-of-two width the kernels work on for head_dim (>= 16: tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(head_dim))


def launch_config(
    kernel: str, head_dim: int, interpret: bool = False, aligned: bool = True, bias: bool = False
) -> AttnConfig:
    """The one place that maps (kernel, head_dim, alignment, bias) to tile sizes, warps and pipeline stages.

    aligned: whether the launch is 16-divisible in everything that shapes its tile loads (_aligned);
    report-kernels compiles the aligned table as align16 and the unaligned one as align1. bias: the
    relative-position-bias variant (HAS_BIAS), aligned only: _BIAS_CONFIGS."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if head_dim % 8 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {head_dim}")
    if interpret:
        return _INTERPRET_CONFIGS[kernel]
    if bias and kernel in _BIAS_CONFIGS:
        if not aligned:
            raise ValueError(f"the bias variant of {kernel} runs aligned only (the launchers realign its inputs)")
        return _BIAS_CONFIGS[kernel][block_d_for(head_dim)]
    table = (_GPU_CONFIGS if aligned else _GPU_CONFIGS_UNALIGNED)[kernel]
    if block_d_for(head_dim) not in table:
        raise ValueError(f"no unaligned {kernel} configuration for head_dim {head_dim}: launch it aligned")
    return table[block_d_for(head_dim)]


def _config(kernel: str, head_dim: int, interpret: bool, aligned: bool, bias: bool) -> AttnConfig:
    """launch_config, asked for the bias variant only when there is a bias."""
    if bias:
        return launch_config(kernel, head_dim, interpret, aligned, bias=True)
    return launch_config(kernel, head_dim, interpret, aligned)


# ---- launchers ---------------------------------------------------------------------------------------


_GRID_YZ_LIMIT = 65535  # CUDA's limit on gridDim.y / gridDim.z (heads, batch)


def _check_qkv(what: str, q: Tensor, k: Tensor, v: Tensor, n_lead: int) -> None:
    # Memory safety only (the public op checks the argument contract): what the kernels index and launch.
    check_device(q, what)
    for name, t in (("q", q), ("k", k), ("v", v)):
        require(t.dim() == n_lead + 2, what, f"{name} must have {n_lead + 2} dims, got shape {tuple(t.shape)}")
        require(t.device == q.device, what, f"{name} is on {t.device}, q is on {q.device}")
    require(k.shape == v.shape, what, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    h, d, hkv = q.shape[-2], q.shape[-1], k.shape[-2]
    require(k.shape[-1] == d, what, f"q head_dim {d} != k head_dim {k.shape[-1]}")
    require(hkv > 0 and h % hkv == 0, what, f"n_heads ({h}) must be a multiple of n_kv_heads ({hkv})")
    require(d <= MAX_HEAD_DIM, what, f"head_dim must be at most {MAX_HEAD_DIM}, got {d}")
    require(h <= _GRID_YZ_LIMIT, what, f"at most {_GRID_YZ_LIMIT} heads, got {h}")


def _rows_contiguous(t: Tensor) -> Tensor:
    """t itself when its last dim is contiguous (any other strides are passed to the kernels)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _out_buffer(out: Tensor) -> Tensor:
    """Where a kernel writes `out` (allocated like the fakes, empty_like of an input): out itself, or
    a contiguous stand-in to copy back when that layout has a strided last dim (a rare input layout)."""
    return out if out.stride(-1) == 1 else torch.empty(out.shape, dtype=out.dtype, device=out.device)


def _finish(out: Tensor, buf: Tensor) -> Tensor:
    if buf is not out:
        out.copy_(buf)
    return out


def _strides(t: Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, row, head) strides; varlen tensors have no batch dim (rows start at cu_seqlens)."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse: Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of lse / delta: (b, h, sq) dense, (h, total_q) varlen; rows contiguous."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _aligned(tensors, strides) -> bool:
    """Whether Triton's JIT gives this launch the 16-divisibility that the aligned table was compiled
    for, where it shapes the tile loads: every data pointer 16-byte aligned and every tile stride (row,
    head, batch of q/k/v/out and their gradients) a multiple of 16 elements. Sequence lengths, the GQA
    group and the lse strides only touch per-row vectors and loop bounds, so they do not count."""
    return all(t.data_ptr() % 16 == 0 for t in tensors) and all(s % 16 == 0 for s in strides)


def _realigned(t: Tensor, copy: bool = True) -> Tensor:
    """t (a copy of it, or with copy=False an uninitialised stand-in) in a fresh buffer whose head_dim
    is padded to a multiple of 16 elements: a 16-byte aligned pointer and every stride a multiple of
    16, so the launch is aligned. Same shape as t; _finish copies a stand-in back."""
    d = t.shape[-1]
    view = torch.empty((*t.shape[:-1], triton.cdiv(d, 16) * 16), dtype=t.dtype, device=t.device)[..., :d]
    return view.copy_(t) if copy else view


def _flags(head_dim: int, cfg: AttnConfig, causal: bool, varlen: bool, interpret: bool, bias: bool = False) -> dict:
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d_for(head_dim),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        CAUSAL=causal,
        IS_VARLEN=varlen,
        INTERPRET=interpret,
        HAS_BIAS=bias,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


@dataclass(frozen=True)
class _Bias:
    """A relative position bias as the kernels take it: rows (n_heads, 2 * max_distance + 1) fp32 of
    table[buckets[r], h] * log2(e) (scores are in log2 units) per clamped relative position r, and the
    int32 bucket lookup itself (the backward's per-tile bucket test)."""

    rows: Tensor
    buckets: Tensor
    max_distance: int

    @staticmethod
    def of(table: Tensor, buckets: Tensor) -> _Bias:
        rows = (table.t()[:, buckets.long()] * LOG2E).contiguous()
        return _Bias(rows, buckets.contiguous(), (buckets.numel() - 1) // 2)


def _fwd(q, k, v, cu_q, cu_k, batch, max_q, max_k, causal, scale, varlen, bias: _Bias | None = None):
    """Shared forward launcher: q (b, sq, h, d) / k, v (b, sk, hkv, d), or packed (total, heads, d)."""
    out = torch.empty_like(q)
    h, d = q.shape[-2], q.shape[-1]
    lse_shape = (h, q.shape[0]) if varlen else (batch, h, max_q)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
    out_buf = _out_buffer(out)
    interpret = backends.triton_interpreted()
    strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out_buf, varlen))
    aligned = _aligned((q, k, v, out_buf, lse), strides)
    if bias is not None and not aligned:
        # The bias variants ship aligned configurations only (the unaligned loads' 64-bit addresses
        # and the bias gather do not fit in registers together): run them on 16-aligned copies.
        q, k, v = (_realigned(t) for t in (q, k, v))
        out_buf = _realigned(out, copy=False)
        strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out_buf, varlen))
        aligned = True
    cfg = _config("fwd", d, interpret, aligned, bias is not None)
    grid = (triton.cdiv(max_q, cfg.block_m), h, batch)
    cu_q = cu_q if varlen else q  # dense: never read
    cu_k = cu_k if varlen else q
    with device_guard(q):
        _attn_fwd_kernel[grid](
            q,
            k,
            v,
            out_buf,
            lse,
            cu_q,
            cu_k,
            None if bias is None else bias.rows,
            *strides,
            *_lse_strides(lse, varlen),
            max_q,
            max_k,
            h // k.shape[-2],
            scale * LOG2E,
            None if bias is None else bias.max_distance,
            **_flags(d, cfg, causal, varlen, interpret, bias is not None),
        )
    return _finish(out, out_buf), lse


def _bwd(dout, q, k, v, out, lse, cu_q, cu_k, batch, max_q, max_k, causal, scale, varlen, bias: _Bias | None = None):
    """Shared backward launcher: (dq, dk, dv) like (q, k, v); with a bias also dbias, fp32 (n_heads,
    2 * max_distance + 1): dS summed per head and clamped relative position (the caller sums those
    into buckets).

    dbias: the dQ kernel, which visits every (query, key) pair of a head once, adds its dS tiles into
    dbias with fp32 atomics: a tile within one bucket as a single atomic of its sum, a tile across
    bucket edges (near the diagonal; every bucket edge lies within max_distance of it) element-wise.
    Atomics rather than per-program partial sums and a reduction pass: a program's tiles cover
    seqlen_k relative positions, far too many to keep in registers, and scattering a tile into a
    handful of buckets inside registers needs a one-hot pass per bucket. The price is a summation
    order that depends on scheduling (dtable varies in the last bits between runs); dq, dk, dv stay
    deterministic."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = None if bias is None else torch.zeros_like(bias.rows)
    if dk.numel() == 0:  # no keys: nothing to attend to, every gradient is zero
        return dq.zero_(), dk, dv, dbias
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_(), dbias
    h, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    q, k, v, out, dout = (_rows_contiguous(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    dq_buf, dk_buf, dv_buf = _out_buffer(dq), _out_buffer(dk), _out_buffer(dv)

    tiles = (q, k, v, out, dout, dq_buf, dk_buf, dv_buf)
    aligned = _aligned((*tiles, lse), [s for t in tiles for s in _strides(t, varlen)])
    has_bias = bias is not None
    if not aligned and (has_bias or block_d_for(d) not in _GPU_CONFIGS_UNALIGNED["bwd_dkdv"]):
        # No unaligned configuration fits (or, with a bias, ships): run the aligned one on 16-aligned
        # copies instead.
        q, k, v, out, dout = (_realigned(t) for t in (q, k, v, out, dout))
        dq_buf, dk_buf, dv_buf = (_realigned(t, copy=False) for t in (dq, dk, dv))
        lse = lse if lse.data_ptr() % 16 == 0 else lse.clone()
        aligned = True
    delta = torch.empty_like(lse)
    interpret = backends.triton_interpreted()
    cu_q = cu_q if varlen else q
    cu_k = cu_k if varlen else q
    lse_strides = _lse_strides(lse, varlen)
    group = h // hkv
    common = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen))

    with device_guard(q):
        cfg = launch_config("bwd_preprocess", d, interpret, aligned)
        _attn_bwd_preprocess_kernel[(triton.cdiv(max_q, cfg.block_m), h, batch)](
            out,
            dout,
            delta,
            cu_q,
            *_strides(out, varlen),
            *_strides(dout, varlen),
            *lse_strides,
            max_q,
            HEAD_DIM=d,
            BLOCK_D=block_d_for(d),
            BLOCK_M=cfg.block_m,
            IS_VARLEN=varlen,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

        cfg = _config("bwd_dkdv", d, interpret, aligned, has_bias)
        _attn_bwd_dkdv_kernel[(triton.cdiv(max_k, cfg.block_n), hkv, batch)](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dk_buf,
            dv_buf,
            cu_q,
            cu_k,
            bias.rows if bias is not None else None,
            *common,
            *_strides(dk_buf, varlen),
            *_strides(dv_buf, varlen),
            *lse_strides,
            max_q,
            max_k,
            group,
            scale,
            scale * LOG2E,
            bias.max_distance if bias is not None else None,
            **_flags(d, cfg, causal, varlen, interpret, has_bias),
        )

        cfg = _config("bwd_dq", d, interpret, aligned, has_bias)
        _attn_bwd_dq_kernel[(triton.cdiv(max_q, cfg.block_m), h, batch)](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dq_buf,
            cu_q,
            cu_k,
            bias.rows if bias is not None else None,
            bias.buckets if bias is not None else None,
            dbias,
            *common,
            *_strides(dq_buf, varlen),
            *lse_strides,
            max_q,
            max_k,
            group,
            scale,
            scale * LOG2E,
            bias.max_distance if bias is not None else None,
            **_flags(d, cfg, causal, varlen, interpret, has_bias),
        )
    return _finish(dq, dq_buf), _finish(dk, dk_buf), _finish(dv, dv_buf), dbias


def _check_dense(what, q, k, v):
    _check_qkv(what, q, k, v, n_lead=2)
    require(k.shape[0] == q.shape[0], what, f"batch of k ({k.shape[0]}) != batch of q ({q.shape[0]})")
    require(q.shape[0] <= _GRID_YZ_LIMIT, what, f"batch at most {_GRID_YZ_LIMIT}, got {q.shape[0]}")


def _check_varlen(what, q, k, v, cu_q, cu_k):
    _check_qkv(what, q, k, v, n_lead=1)
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        require(
            cu.dim() == 1 and cu.numel() >= 1 and cu.device == q.device,
            what,
            f"{name} must be a 1-d tensor on {q.device}, got {tuple(cu.shape)} on {cu.device}",
        )
    require(
        cu_q.numel() == cu_k.numel(),
        what,
        f"cu_seqlens_q ({cu_q.numel()}) and cu_seqlens_k ({cu_k.numel()}) lengths differ",
    )
    require(cu_q.numel() - 1 <= _GRID_YZ_LIMIT, what, f"at most {_GRID_YZ_LIMIT} sequences, got {cu_q.numel() - 1}")


def _check_grad_inputs(what, dout, out, lse, q, lse_shape):
    require(
        dout.shape == q.shape and out.shape == q.shape,
        what,
        f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape {tuple(q.shape)}",
    )
    require(
        tuple(lse.shape) == tuple(lse_shape), what, f"lse must have shape {tuple(lse_shape)}, got {tuple(lse.shape)}"
    )


# ---- custom ops: registration --------------------------------------------------------------------------


@torch.library.custom_op("plm_engine::triton_attn_fwd", mutates_args=())
def triton_attn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """q: (batch, seqlen_q, n_heads, head_dim), k/v: (batch, seqlen_k, n_kv_heads, head_dim), last dim
    contiguous -> (out like q, lse (batch, n_heads, seqlen_q) fp32)."""
    _check_dense("triton_attn_fwd", q, k, v)
    return _fwd(q, k, v, None, None, q.shape[0], q.shape[1], k.shape[1], causal, scale, varlen=False)


@torch.library.custom_op("plm_engine::triton_attn_bwd", mutates_args=())
def triton_attn_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of triton_attn_fwd from dout (like q) and the forward's out and lse."""
    what = "triton_attn_bwd"
    _check_dense(what, q, k, v)
    b, sq, h, _ = q.shape
    _check_grad_inputs(what, dout, out, lse, q, (b, h, sq))
    return _bwd(dout, q, k, v, out, lse, None, None, b, sq, k.shape[1], causal, scale, varlen=False)[:3]


@torch.library.custom_op("plm_engine::triton_attn_varlen_fwd", mutates_args=())
def triton_attn_varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Packed q: (total_q, n_heads, head_dim), k/v: (total_k, n_kv_heads, head_dim), cu_seqlens int32
    (batch + 1,) -> (out like q, lse (n_heads, total_q) fp32). max_seqlen_* must bound every sequence."""
    _check_varlen("triton_attn_varlen_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k)
    return _fwd(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        cu_seqlens_q.numel() - 1,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        scale,
        varlen=True,
    )


@torch.library.custom_op("plm_engine::triton_attn_varlen_bwd", mutates_args=())
def triton_attn_varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of triton_attn_varlen_fwd."""
    what = "triton_attn_varlen_bwd"
    _check_varlen(what, q, k, v, cu_seqlens_q, cu_seqlens_k)
    _check_grad_inputs(what, dout, out, lse, q, (q.shape[1], q.shape[0]))
    return _bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        cu_seqlens_q.numel() - 1,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        scale,
        varlen=True,
    )[:3]


def _check_bias(what: str, table: Tensor, buckets: Tensor, q: Tensor) -> None:
    """table fp32 (num_buckets, n_heads) and the int32 lookup of 2 * max_distance + 1 buckets in range
    (checked by plm_engine.ops.position_bias, which builds it; here only what the kernels rely on)."""
    if table.dtype != torch.float32 or table.dim() != 2 or table.shape[1] != q.shape[-2] or table.device != q.device:
        raise ValueError(
            f"{what}: table must be float32 (num_buckets, {q.shape[-2]}) on {q.device}, got {table.dtype} "
            f"{tuple(table.shape)} on {table.device}"
        )
    n = buckets.numel()
    if buckets.dtype != torch.int32 or buckets.dim() != 1 or n % 2 == 0 or buckets.device != q.device:
        raise ValueError(
            f"{what}: buckets must be int32 (2 * max_distance + 1,) on {q.device}, got {buckets.dtype} "
            f"{tuple(buckets.shape)} on {buckets.device}"
        )


def _dtable(dbias: Tensor, table: Tensor, buckets: Tensor) -> Tensor:
    """Per-position bias gradients (n_heads, 2 * max_distance + 1) summed into table cells (num_buckets,
    n_heads)."""
    return torch.zeros_like(table).index_add_(0, buckets.long(), dbias.t())


@torch.library.custom_op("plm_engine::triton_attn_rpb_fwd", mutates_args=())
def triton_attn_rpb_fwd(
    q: Tensor, k: Tensor, v: Tensor, table: Tensor, buckets: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """triton_attn_fwd with T5's relative position bias: table fp32 (num_buckets, n_heads), buckets
    int32 (2 * max_distance + 1,) lookup (plm_engine/ops/position_bias.py)."""
    what = "triton_attn_rpb_fwd"
    _check_dense(what, q, k, v)
    _check_bias(what, table, buckets, q)
    bias = _Bias.of(table, buckets)
    return _fwd(q, k, v, None, None, q.shape[0], q.shape[1], k.shape[1], causal, scale, False, bias)


@torch.library.custom_op("plm_engine::triton_attn_rpb_bwd", mutates_args=())
def triton_attn_rpb_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    table: Tensor,
    buckets: Tensor,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dtable) of triton_attn_rpb_fwd; dtable fp32 like table."""
    what = "triton_attn_rpb_bwd"
    _check_dense(what, q, k, v)
    _check_bias(what, table, buckets, q)
    b, sq, h, _ = q.shape
    _check_grad_inputs(what, dout, out, lse, q, (b, h, sq))
    bias = _Bias.of(table, buckets)
    dq, dk, dv, dbias = _bwd(dout, q, k, v, out, lse, None, None, b, sq, k.shape[1], causal, scale, False, bias)
    return dq, dk, dv, _dtable(dbias, table, buckets)


@torch.library.custom_op("plm_engine::triton_attn_varlen_rpb_fwd", mutates_args=())
def triton_attn_varlen_rpb_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: Tensor,
    buckets: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """triton_attn_varlen_fwd with T5's relative position bias (positions within each sequence)."""
    what = "triton_attn_varlen_rpb_fwd"
    _check_varlen(what, q, k, v, cu_seqlens_q, cu_seqlens_k)
    _check_bias(what, table, buckets, q)
    batch = cu_seqlens_q.numel() - 1
    bias = _Bias.of(table, buckets)
    return _fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, batch, max_seqlen_q, max_seqlen_k, causal, scale, True, bias)


@torch.library.custom_op("plm_engine::triton_attn_varlen_rpb_bwd", mutates_args=())
def triton_attn_varlen_rpb_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    table: Tensor,
    buckets: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dtable) of triton_attn_varlen_rpb_fwd."""
    what = "triton_attn_varlen_rpb_bwd"
    _check_varlen(what, q, k, v, cu_seqlens_q, cu_seqlens_k)
    _check_bias(what, table, buckets, q)
    _check_grad_inputs(what, dout, out, lse, q, (q.shape[1], q.shape[0]))
    bias = _Bias.of(table, buckets)
    batch = cu_seqlens_q.numel() - 1
    dq, dk, dv, dbias = _bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        batch,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        scale,
        True,
        bias,
    )
    return dq, dk, dv, _dtable(dbias, table, buckets)


contracts.register(contract, "triton_")


# ---- shipped configurations, for report-kernels ----------------------------------------------------------


_BIAS_ARGS = {"Bias": "*fp32", "Buckets": "*i32", "DBias": "*fp32", "max_distance": "i32"}


def _types(dt: str, bias: bool = False) -> dict[str, str]:
    """Argument types; without a bias the bias arguments are None, which Triton makes constexpr."""
    ptr, f32 = f"*{dt}", "*fp32"
    types = {name: ptr for name in ("Q", "K", "V", "Out", "DO", "DK", "DV", "DQ")}
    types |= {"Lse": f32, "Delta": f32, "CuQ": "*i32", "CuK": "*i32", "qk_scale": "fp32", "sm_scale": "fp32"}
    ints = ["seqlen_q", "seqlen_k", "group", "stride_lb", "stride_lh"]
    for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
        m = "n" if t in ("k", "v", "dk", "dv") else "m"
        ints += [f"stride_{t}b", f"stride_{t}{m}", f"stride_{t}h"]
    return types | dict.fromkeys(ints, "i32") | (_BIAS_ARGS if bias else {})


def kernel_specs() -> list[KernelSpec]:
    """Every GPU configuration the launchers can pick, in bf16 (fp16 compiles the same way): the
    aligned table's under report-kernels' align16 specialisation, the unaligned table's under align1.

    Per BLOCK_D: HEAD_DIM = BLOCK_D (no column mask), every causal x varlen variant for 64 and 128,
    the two extremes (dense non-causal, varlen causal) for the other widths, and the column-masked
    head_dims 80 and 192 (dense causal), whose masked loads are laid out differently. The relative
    position bias variants (HAS_BIAS): T5's two uses, varlen non-causal (encoder) and dense causal
    (decoder), per BLOCK_D, and every causal x varlen variant for 64 (T5's head_dim) and 128.
    """
    kernels = {"fwd": _attn_fwd_kernel, "bwd_dkdv": _attn_bwd_dkdv_kernel, "bwd_dq": _attn_bwd_dq_kernel}
    variants = []  # (head_dim, causal, varlen, bias)
    for block_d in BLOCK_DS:
        if block_d in (64, 128):
            variants += [(block_d, c, vl, False) for c in (False, True) for vl in (False, True)]
            variants += [(block_d, c, vl, True) for c in (False, True) for vl in (False, True)]
        else:
            variants += [(block_d, False, False, False), (block_d, True, True, False)]
            variants += [(block_d, False, True, True), (block_d, True, False, True)]
    variants += [(80, True, False, False), (192, True, False, False)]

    specs = []
    for aligned, alignment in ((True, 16), (False, 1)):
        for head_dim, causal, varlen, bias in variants:
            if bias and not aligned:  # the launchers realign such inputs (_fwd, _bwd)
                continue
            types = _types("bf16", bias)
            for kernel, fn in kernels.items():
                if not aligned and block_d_for(head_dim) not in _GPU_CONFIGS_UNALIGNED[kernel]:
                    continue
                cfg = launch_config(kernel, head_dim, aligned=aligned, bias=bias)
                flags = _flags(head_dim, cfg, causal, varlen, interpret=False, bias=bias)
                flags |= {name: None for name in _BIAS_ARGS if name in fn.arg_names and not bias}
                warps, stages = flags.pop("num_warps"), flags.pop("num_stages")
                name = (
                    f"attn_{kernel}[hd={head_dim},BLOCK_M={cfg.block_m},BLOCK_N={cfg.block_n},"
                    f"{'causal' if causal else 'full'},{'varlen' if varlen else 'dense'},"
                    f"{'bias,' if bias else ''}bf16]"
                )
                specs.append(KernelSpec(name, fn, signature(fn, types), flags, warps, stages, (alignment,)))
        types = _types("bf16")
        for block_d in BLOCK_DS:
            if not aligned and block_d not in _GPU_CONFIGS_UNALIGNED["bwd_preprocess"]:
                continue
            for varlen in (False, True):
                cfg = launch_config("bwd_preprocess", block_d, aligned=aligned)
                specs.append(
                    KernelSpec(
                        f"attn_bwd_preprocess[hd={block_d},BLOCK_M={cfg.block_m},"
                        f"{'varlen' if varlen else 'dense'},bf16]",
                        _attn_bwd_preprocess_kernel,
                        signature(_attn_bwd_preprocess_kernel, types),
                        dict(HEAD_DIM=block_d, BLOCK_D=block_d, BLOCK_M=cfg.block_m, IS_VARLEN=varlen),
                        cfg.num_warps,
                        cfg.num_stages,
                        (alignment,),
                    )
                )
    return specs
