"""Triton decode attention over a paged KV cache (flash-decoding), and the KV-cache write.

Contract: plm_engine/ops/contracts/paged_attention.py (paged_attn, write_kv_cache).

paged_attn. Program (b, kv head [x row tile], split) computes the attention of every query row of its kv
head's group against one contiguous range of the sequence's keys:
  - Rows. A tile row m is (query token i = m // group, head kvh * group + m % group): all the query heads
    that share a kv head, for all seqlen_q queries, are one (BLOCK_M, head_dim) operand of tl.dot, so each
    K/V tile is read once per group instead of once per head. A group larger than BLOCK_M (e.g. MQA with
    16 queries) gets several row tiles, each re-reading the keys.
  - Keys. The program walks its key range in BLOCK_N-token tiles. Token t lives in logical block
    t >> log2(block_size), physical block block_table[b, t >> log2(block_size)], slot t & (block_size - 1):
    every row of a tile is gathered through the block table, so a tile may straddle pages of any size
    (block_size is a runtime value, a power of two) and the tables may be shuffled.
  - Splits (flash-decoding). The keys of sequence b are cut into num_splits ranges of equal length
    (rounded up to whole tiles); each program keeps an online softmax in base 2 (scores pre-scaled by
    scale * log2(e)) and writes its normalised partial output and log2-sum-exp in fp32. A second kernel
    merges the splits with the log-sum-exp trick. A split with no visible key (short sequence, or keys
    all after its queries) has lse = -inf and zero output; its weight is exactly 0, so no NaN reaches the
    result. With one split the first kernel writes the output directly and the merge is skipped.
    num_splits comes from the grid size vs the SM count, so one long sequence still fills the GPU.
  - Causal, bottom-right: query i of a sequence of L cached tokens sees keys t <= L - seqlen_q + i. The
    key range stops after the last key the tile's last query sees.
  - Relative position bias (T5's decoder, HAS_BIAS): each row adds its head's bias row, indexed by the
    key's position relative to the query's clamped to [-max_distance, max_distance] (one fp32 vector
    of 2 * max_distance + 1 values per head, table[bucket, h] * log2(e), built by the launcher from
    the bucket table and lookup). Without a bias the bias arguments are None, which Triton makes
    constexpr: the plain kernel compiles exactly as it would without them.

write_kv_cache: one program per token copies its (n_kv_heads, head_dim) rows to flat slot
slot_mapping[t] (block * block_size + offset), cast to the cache dtype; negative slots are padding.

Under TRITON_INTERPRET=1 (tests on CPU) bf16 arithmetic and bf16 tl.dot are wrong and fp32 -> bf16 casts
truncate: the kernels upcast after loading and round bf16 stores to nearest-even by hand (INTERPRET,
triton/common.py's round_to).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from plm_engine.ops import backends, contracts
from plm_engine.ops.contracts import paged_attention as contract
from plm_engine.ops.contracts.paged_attention import MAX_BLOCK_SIZE, MAX_HEAD_DIM
from plm_engine.ops.triton.common import check_device, device_sm_count, require, round_to, signature
from plm_engine.ops.triton.guard import device_guard
from plm_engine.ops.triton.spec import KernelSpec

LOG2E = 1.4426950408889634
# Test-only: forces the number of KV splits (e.g. to compare many splits with one).
SPLITS_ENV = "PLM_ENGINE_PAGED_ATTN_SPLITS"

# ---- jit kernels -----------------------------------------------------------------------------------


@triton.jit
def _paged_attn_split_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,
    BT_ptr,
    Lens_ptr,
    O_ptr,
    PO_ptr,
    PLSE_ptr,
    Bias_ptr,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_kblock,
    stride_kslot,
    stride_khead,
    stride_bt,
    seqlen_q,
    group,
    m_tiles,
    n_heads,
    head_dim,
    page_shift,
    num_splits,
    qk_scale,
    max_distance,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (b, kvh * m_tiles + row tile, split), over the n_rows = group * seqlen_q query rows of a kv
    head (derived here rather than passed: one less argument for the launcher to keep consistent)."""
    n_rows = group * seqlen_q
    b = tl.program_id(0)
    kvh = tl.program_id(1) // m_tiles
    row0 = (tl.program_id(1) % m_tiles) * BLOCK_M
    split = tl.program_id(2)
    seqlen = tl.load(Lens_ptr + b)

    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    qi = rows // group  # query token within the seqlen_q new ones
    head = kvh * group + rows % group
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < head_dim
    q_mask = row_ok[:, None] & d_ok[None, :]
    # Last key each row may see (bottom-right causal).
    last_key = seqlen - seqlen_q + qi

    # This split's keys: equal shares of the sequence, whole tiles, cut after the tile's last visible key.
    per_split = (((seqlen + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    start = split * per_split
    last_row = tl.minimum(row0 + BLOCK_M, n_rows) - 1
    end = tl.minimum(start + per_split, seqlen - seqlen_q + last_row // group + 1)

    b64 = b.to(tl.int64)
    # Per-row 64-bit offsets of the query/output rows (a long chunked prefill's qi * stride can pass 2**31).
    qi64 = qi.to(tl.int64)
    q = tl.load(
        Q_ptr + b64 * stride_qb + qi64[:, None] * stride_qs + head[:, None] * stride_qh + dims[None, :],
        mask=q_mask,
        other=0.0,
    )
    if INTERPRET:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    page_mask = (1 << page_shift) - 1
    bt_row = BT_ptr + b64 * stride_bt
    kv_off = kvh.to(tl.int64) * stride_khead
    if HAS_BIAS:  # each row's head's bias row, at relative position 0
        bias_rows = Bias_ptr + head * (2 * max_distance + 1) + max_distance
    for t0 in range(start, end, BLOCK_N):
        t = t0 + offs_n
        t_ok = t < end
        block = tl.load(bt_row + (t >> page_shift), mask=t_ok, other=0)
        # int64: block * stride_kblock passes 2**31 on caches over 4 GiB. Every cache stride is a
        # multiple of head_dim, itself a multiple of 8: telling the compiler lets it load 16 bytes per
        # access whatever the runtime values' divisibility by 16.
        row_off = block.to(tl.int64) * stride_kblock + (t & page_mask) * stride_kslot + kv_off
        row_off = tl.multiple_of(row_off, 8)
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(K_ptr + row_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_ptr + row_off[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if INTERPRET:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 units
        if HAS_BIAS:
            rel = tl.minimum(tl.maximum(t[None, :] - last_key[:, None], -max_distance), max_distance)
            s += tl.load(bias_rows[:, None] + rel, mask=row_ok[:, None], other=0.0)
        s = tl.where((t[None, :] <= last_key[:, None]) & t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with no visible key yet keeps m = -inf: subtract 0 so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if num_splits == 1:
        o_ptrs = O_ptr + b64 * stride_ob + qi64[:, None] * stride_os + head[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptrs, round_to(out, O_ptr.dtype.element_ty, INTERPRET), mask=q_mask)
    else:
        # Partials: (batch, seqlen_q, n_heads, num_splits[, head_dim]) fp32, lse in log2 units.
        part = ((b64 * seqlen_q + qi) * n_heads + head) * num_splits + split
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(PO_ptr + part[:, None] * head_dim + dims[None, :], out, mask=q_mask)
        tl.store(PLSE_ptr + part, lse, mask=row_ok)


@triton.jit
def _paged_attn_combine_kernel(
    PO_ptr,
    PLSE_ptr,
    O_ptr,
    stride_ob,
    stride_os,
    stride_oh,
    seqlen_q,
    n_heads,
    head_dim,
    num_splits,
    BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program r = (b * seqlen_q + i) * n_heads + h merges the num_splits partials of one query row."""
    r = tl.program_id(0).to(tl.int64)
    h = r % n_heads
    i = (r // n_heads) % seqlen_q
    b = r // (n_heads * seqlen_q)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < head_dim
    m = float("-inf")
    den = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        lse = tl.load(PLSE_ptr + r * num_splits + s)
        m_new = tl.maximum(m, lse)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        w = tl.exp2(lse - m_ref)  # exactly 0 for an empty split
        o = tl.load(PO_ptr + (r * num_splits + s) * head_dim + dims, mask=d_ok, other=0.0)
        acc = acc * alpha + w * o
        den = den * alpha + w
        m = m_new
    out = acc / tl.where(den > 0, den, 1.0)
    tl.store(
        O_ptr + b * stride_ob + i * stride_os + h * stride_oh + dims,
        round_to(out, O_ptr.dtype.element_ty, INTERPRET),
        mask=d_ok,
    )


@triton.jit
def _write_kv_cache_kernel(
    K_ptr,
    V_ptr,
    KC_ptr,
    VC_ptr,
    Slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    n_kv_heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program t copies token t's (n_kv_heads, head_dim) K and V rows into cache slot slot_mapping[t]."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slot_ptr + t).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        # A cache slot holds n_kv_heads * head_dim contiguous elements.
        dst = slot * (n_kv_heads * head_dim)
        for h0 in range(0, n_kv_heads, BLOCK_H):
            h = h0 + heads
            mask = (h < n_kv_heads)[:, None] & (dims < head_dim)[None, :]
            k = tl.load(K_ptr + t * stride_kt + h[:, None] * stride_kh + dims[None, :], mask=mask)
            v = tl.load(V_ptr + t * stride_vt + h[:, None] * stride_vh + dims[None, :], mask=mask)
            offs = dst + h[:, None] * head_dim + dims[None, :]
            tl.store(KC_ptr + offs, round_to(k, KC_ptr.dtype.element_ty, INTERPRET), mask=mask)
            tl.store(VC_ptr + offs, round_to(v, VC_ptr.dtype.element_ty, INTERPRET), mask=mask)


# ---- launch configuration (shared by the launchers and kernel_specs) -------------------------------

# Query-row tiles: decode with GQA groups up to 16 needs one tile; 4 speculative tokens x group 16 fits 64
# (32 for head_dim 256). Larger groups take several tiles.
ROW_TILES = (16, 32, 64)
# On a GPU, aim for this many split programs per SM (4 warps each), and give each split at least
# _MIN_SPLIT_TOKENS keys so that the partial writes and the merge stay small next to the K/V reads.
_PROGRAMS_PER_SM = 4
_MIN_SPLIT_TOKENS = 256
MAX_SPLITS = 64
# Under the interpreter: two splits, so the tests run the merge, and small tiles (interpreter costs:
# benchmarks/results/NOTES.md).
_INTERPRET_SPLITS = 2
_INTERPRET_BLOCK_N = 16
# Tokens per program of write_kv_cache: BLOCK_H * BLOCK_D elements, 8 per thread of 4 warps.
_WRITE_TILE = 1024


@dataclass(frozen=True)
class PagedConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def paged_config(n_rows: int, head_dim: int, interpret: bool = False, bias: bool = False) -> PagedConfig:
    """The one place that maps (query rows per kv head = group * seqlen_q, head_dim) to a launch layout.

    BLOCK_D is head_dim's next power of two (>= 16, tl.dot's minimum). A thread holds its share of the
    q tile, the fp32 accumulator (BLOCK_M x BLOCK_D) and a K/V tile; the sizes below are the largest
    that report-kernels compiles without spills on sm_80 and sm_90 in both specialisations, including
    the one with no 16-byte alignment (scalar loads, one 64-bit address per element): 8 warps from
    head_dim 128 (or 64 rows), fewer keys per tile as BLOCK_M x BLOCK_D grows, and at most 32 rows
    of head_dim 256 per tile. Two pipeline stages keep the next tile's gathered K/V loads in flight
    while the current one is multiplied (the kernel is bound by those reads). bias: the relative
    position bias variant (HAS_BIAS), which gathers one more (BLOCK_M x BLOCK_N) tile; see
    _BIAS_BLOCK_N.
    """
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    tiles = ROW_TILES if block_d < 256 else tuple(m for m in ROW_TILES if m <= 32)
    if bias:
        tiles = tuple(m for m in tiles if m <= _BIAS_MAX_BLOCK_M.get(block_d, m))
    block_m = next((m for m in tiles if m >= n_rows), tiles[-1])
    if interpret:
        return PagedConfig(block_m, _INTERPRET_BLOCK_N, block_d, 4, 1)
    if block_d <= 32 or (block_d == 64 and block_m <= 32):
        cfg = PagedConfig(block_m, 64, block_d, 4, 2)
    elif block_d == 64:
        cfg = PagedConfig(block_m, 32, block_d, 8, 2)
    elif block_d == 128:
        cfg = PagedConfig(block_m, 16 if block_m >= 64 else 32, block_d, 8, 2)
    else:
        cfg = PagedConfig(block_m, 16, block_d, 8, 2)
    if bias and (block_d, block_m) in _BIAS_TILES:
        block_n, stages = _BIAS_TILES[block_d, block_m]
        cfg = PagedConfig(block_m, block_n, block_d, cfg.num_warps, stages)
    return cfg


# The bias variant gathers a (BLOCK_M x BLOCK_N) tile of bias values through as many 64-bit addresses:
# where the plain tiles then pass 240 registers (or spill) in report-kernels' align1 specialisation,
# fewer keys per tile, fewer pipeline stages at head_dim 256, and at most 32 (head_dim 128) or 16
# (head_dim 256) query rows per tile (16 keys is tl.dot's minimum; larger groups take more row tiles).
_BIAS_MAX_BLOCK_M = {128: 32, 256: 16}
_BIAS_TILES = {  # (BLOCK_D, BLOCK_M) -> (BLOCK_N, num_stages)
    (16, 64): (32, 2),
    (32, 32): (32, 2),
    (32, 64): (16, 2),
    (64, 16): (32, 2),
    (64, 32): (16, 2),
    (64, 64): (16, 2),
    (128, 32): (16, 2),
    (256, 16): (16, 1),
}


def write_config(n_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps) of write_kv_cache."""
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(n_kv_heads), max(1, _WRITE_TILE // block_d))
    return block_h, block_d, 4


# ---- launchers -------------------------------------------------------------------------------------


def choose_num_splits(device: torch.device, programs: int, capacity_tokens: int) -> int:
    """KV splits per sequence for a grid of `programs` (batch x kv heads x row tiles) programs per split.

    On a GPU: enough splits for about _PROGRAMS_PER_SM programs per SM, but none shorter than
    _MIN_SPLIT_TOKENS of the block table's capacity (read without a device sync; shorter sequences just
    leave their last splits empty). Under the interpreter a fixed two.
    """
    env = os.environ.get(SPLITS_ENV)
    if env:
        return max(1, min(MAX_SPLITS, int(env)))
    if device.type != "cuda":
        return _INTERPRET_SPLITS
    want = triton.cdiv(device_sm_count(device) * _PROGRAMS_PER_SM, max(1, programs))
    return max(1, min(want, MAX_SPLITS, triton.cdiv(capacity_tokens, _MIN_SPLIT_TOKENS)))


def _check_caches(k_cache: Tensor, v_cache: Tensor, what: str) -> None:
    # Memory safety only (the public op checks the argument contract): what the kernels index.
    check_device(k_cache, what)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        require(
            t.dim() == 4 and t.is_contiguous() and t.shape == k_cache.shape and t.device == k_cache.device,
            what,
            f"{name} must be a contiguous (num_blocks, block_size, n_kv_heads, head_dim) tensor like k_cache "
            f"{tuple(k_cache.shape)} on {k_cache.device}, got {tuple(t.shape)} on {t.device}",
        )
    bs = k_cache.shape[1]  # addresses are computed with shifts: a power of two
    require(0 < bs <= MAX_BLOCK_SIZE and not bs & (bs - 1), what, f"block_size must be a power of two, got {bs}")


def _check_vector(t: Tensor, name: str, shape: tuple, ref: Tensor, what: str) -> None:
    require(
        tuple(t.shape) == shape and t.stride(-1) == 1 and t.device == ref.device,
        what,
        f"{name} must be {shape}, contiguous in its last dim, on {ref.device}; got {tuple(t.shape)} on {t.device}",
    )


def launch_paged_attn(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    cache_seqlens: Tensor,
    scale: float,
    num_splits: int | None = None,
    table: Tensor | None = None,
    buckets: Tensor | None = None,
) -> Tensor:
    """paged_attn's launcher; num_splits (tests only) overrides choose_num_splits. table (num_buckets,
    n_heads) fp32 and buckets (the int32 lookup of plm_engine/ops/position_bias.py): T5's relative
    position bias (paged_attn_rpb)."""
    what = "triton_paged_attn" if table is None else "triton_paged_attn_rpb"
    _check_caches(k_cache, v_cache, what)
    _, block_size, n_kv_heads, cache_head_dim = k_cache.shape
    require(q.dim() == 4, what, f"q must be (batch, seqlen_q, n_heads, head_dim), got {tuple(q.shape)}")
    batch, seqlen_q, n_heads, head_dim = q.shape
    _check_vector(q, "q", tuple(q.shape), k_cache, what)
    require(
        cache_head_dim == head_dim and n_kv_heads > 0 and n_heads % n_kv_heads == 0,
        what,
        f"q has {n_heads} heads of {head_dim}; the caches have {n_kv_heads} kv heads of {cache_head_dim} "
        "(n_heads must be a multiple of n_kv_heads)",
    )
    require(block_table.dim() == 2, what, f"block_table must be (batch, max_blocks), got {tuple(block_table.shape)}")
    _check_vector(block_table, "block_table", (batch, block_table.shape[1]), q, what)
    _check_vector(cache_seqlens, "cache_seqlens", (batch,), q, what)

    if table is not None:
        if table.dtype != torch.float32 or tuple(table.shape[1:]) != (n_heads,) or table.device != q.device:
            raise ValueError(
                f"{what}: table must be float32 (num_buckets, {n_heads}) on {q.device}, got {table.dtype} "
                f"{tuple(table.shape)} on {table.device}"
            )
        if buckets is None or buckets.dtype != torch.int32 or buckets.dim() != 1 or buckets.numel() % 2 == 0:
            raise ValueError(f"{what}: buckets must be an int32 (2 * max_distance + 1,) lookup")

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    bias_rows = max_distance = None
    if table is not None:
        assert buckets is not None  # checked with table above
        bias_rows = (table.t()[:, buckets.long()] * LOG2E).contiguous()  # (n_heads, 2 * max_distance + 1)
        max_distance = (buckets.numel() - 1) // 2
    group = n_heads // n_kv_heads
    n_rows = group * seqlen_q
    interpret = q.device.type != "cuda"
    cfg = paged_config(n_rows, head_dim, interpret, bias=table is not None)
    m_tiles = triton.cdiv(n_rows, cfg.block_m)
    programs = batch * n_kv_heads * m_tiles
    if num_splits is None:
        num_splits = choose_num_splits(q.device, programs, block_table.shape[1] * block_size)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"{what}: num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    if num_splits > 1:
        part_out = torch.empty((batch, seqlen_q, n_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, seqlen_q, n_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        # Not touched; one element rather than none, so the launcher always gets a real device pointer.
        part_out = part_lse = torch.empty((1,), dtype=torch.float32, device=q.device)
    with device_guard(q):
        _paged_attn_split_kernel[(batch, n_kv_heads * m_tiles, num_splits)](
            q,
            k_cache,
            v_cache,
            block_table,
            cache_seqlens,
            out,
            part_out,
            part_lse,
            bias_rows,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            block_table.stride(0),
            seqlen_q,
            group,
            m_tiles,
            n_heads,
            head_dim,
            block_size.bit_length() - 1,
            num_splits,
            scale * LOG2E,
            max_distance,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_D=cfg.block_d,
            INTERPRET=backends.triton_interpreted(),
            HAS_BIAS=table is not None,
            # fp32 caches get full fp32 dots, not TF32 (Triton's default): decode reads memory, so the
            # exact products cost nothing, and an fp32 model's attention stays fp32.
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    if num_splits > 1:
        with device_guard(q):
            _paged_attn_combine_kernel[(batch * seqlen_q * n_heads,)](
                part_out,
                part_lse,
                out,
                out.stride(0),
                out.stride(1),
                out.stride(2),
                seqlen_q,
                n_heads,
                head_dim,
                num_splits,
                BLOCK_D=cfg.block_d,
                INTERPRET=backends.triton_interpreted(),
                num_warps=_combine_warps(cfg.block_d),
            )
    return out


def _combine_warps(block_d: int) -> int:
    return 1 if block_d <= 64 else 2


def launch_write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    what = "triton_write_kv_cache"
    _check_caches(k_cache, v_cache, what)
    _, _, n_kv_heads, head_dim = k_cache.shape
    require(k.dim() == 3, what, f"k must be (num_tokens, {n_kv_heads}, {head_dim}), got {tuple(k.shape)}")
    for name, t in (("k", k), ("v", v)):
        _check_vector(t, name, (k.shape[0], n_kv_heads, head_dim), k_cache, what)
    _check_vector(slot_mapping, "slot_mapping", (k.shape[0],), k_cache, what)
    if k.shape[0] == 0:
        return
    block_h, block_d, num_warps = write_config(n_kv_heads, head_dim)
    with device_guard(k_cache):
        _write_kv_cache_kernel[(k.shape[0],)](
            k,
            v,
            k_cache,
            v_cache,
            slot_mapping,
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            n_kv_heads,
            head_dim,
            BLOCK_H=block_h,
            BLOCK_D=block_d,
            INTERPRET=backends.triton_interpreted(),
            num_warps=num_warps,
        )


# ---- custom ops ------------------------------------------------------------------------------------


@torch.library.custom_op("plm_engine::triton_paged_attn", mutates_args=())
def paged_attn(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, scale: float
) -> Tensor:
    """q (batch, seqlen_q, n_heads, head_dim) over k/v caches (num_blocks, block_size, n_kv_heads, head_dim),
    block_table (batch, max_blocks) int32, cache_seqlens (batch,) int32 -> out like q (contiguous)."""
    return launch_paged_attn(q, k_cache, v_cache, block_table, cache_seqlens, scale)


@torch.library.custom_op("plm_engine::triton_write_kv_cache", mutates_args=("k_cache", "v_cache"))
def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k, v (num_tokens, n_kv_heads, head_dim) -> cache slots slot_mapping (num_tokens,); negative = skip."""
    launch_write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


@torch.library.custom_op("plm_engine::triton_paged_attn_rpb", mutates_args=())
def paged_attn_rpb(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    cache_seqlens: Tensor,
    table: Tensor,
    buckets: Tensor,
    scale: float,
) -> Tensor:
    """paged_attn with T5's relative position bias: table fp32 (num_buckets, n_heads), buckets int32
    (2 * max_distance + 1,) lookup (plm_engine/ops/position_bias.py); query i of sequence b sits at
    cache_seqlens[b] - seqlen_q + i."""
    return launch_paged_attn(q, k_cache, v_cache, block_table, cache_seqlens, scale, table=table, buckets=buckets)


contracts.register(contract, "triton_")


# ---- shipped configurations, for report-kernels ----------------------------------------------------


def kernel_specs() -> list[KernelSpec]:
    """Every configuration paged_config / write_config can pick on a GPU, in bf16 (fp16 compiles alike).

    The row tiles cover seqlen_q groups (decode: group * 1; speculative: group * up to 16 in tiles of
    64); block_size is a runtime argument, so one compiled kernel serves every page size.
    """
    dt = "*bf16"
    i32, f32 = "i32", "fp32"
    split_types = {
        "Q_ptr": dt,
        "K_ptr": dt,
        "V_ptr": dt,
        "BT_ptr": "*i32",
        "Lens_ptr": "*i32",
        "O_ptr": dt,
        "PO_ptr": "*fp32",
        "PLSE_ptr": "*fp32",
        "qk_scale": f32,
    }
    for name in (
        "stride_qb",
        "stride_qs",
        "stride_qh",
        "stride_ob",
        "stride_os",
        "stride_oh",
        "stride_kblock",
        "stride_kslot",
        "stride_khead",
        "stride_bt",
        "seqlen_q",
        "group",
        "m_tiles",
        "n_heads",
        "head_dim",
        "page_shift",
        "num_splits",
    ):
        split_types[name] = i32
    combine_types = {
        "PO_ptr": "*fp32",
        "PLSE_ptr": "*fp32",
        "O_ptr": dt,
        "stride_ob": i32,
        "stride_os": i32,
        "stride_oh": i32,
        "seqlen_q": i32,
        "n_heads": i32,
        "head_dim": i32,
        "num_splits": i32,
    }
    write_types = {
        "K_ptr": dt,
        "V_ptr": dt,
        "KC_ptr": dt,
        "VC_ptr": dt,
        "Slot_ptr": "*i32",
        "stride_kt": i32,
        "stride_kh": i32,
        "stride_vt": i32,
        "stride_vh": i32,
        "n_kv_heads": i32,
        "head_dim": i32,
    }
    bias_types = split_types | {"Bias_ptr": "*fp32", "max_distance": i32}
    specs = []
    for head_dim in (16, 32, 64, 128, 256):
        for bias in (False, True):
            for block_m in sorted({paged_config(m, head_dim, bias=bias).block_m for m in ROW_TILES}):
                cfg = paged_config(block_m, head_dim, bias=bias)
                flags: dict[str, object] = dict(
                    BLOCK_M=cfg.block_m,
                    BLOCK_N=cfg.block_n,
                    BLOCK_D=cfg.block_d,
                    INTERPRET=False,
                    HAS_BIAS=bias,
                    DOT_PRECISION="tf32",
                )
                if not bias:
                    flags |= dict(Bias_ptr=None, max_distance=None)
                specs.append(
                    KernelSpec(
                        f"paged_attn_split[BLOCK_M={cfg.block_m},BLOCK_N={cfg.block_n},BLOCK_D={cfg.block_d},"
                        f"{'bias,' if bias else ''}bf16]",
                        _paged_attn_split_kernel,
                        signature(_paged_attn_split_kernel, bias_types if bias else split_types),
                        flags,
                        cfg.num_warps,
                        cfg.num_stages,
                    )
                )
        block_d = paged_config(1, head_dim).block_d
        specs.append(
            KernelSpec(
                f"paged_attn_combine[BLOCK_D={block_d},bf16]",
                _paged_attn_combine_kernel,
                signature(_paged_attn_combine_kernel, combine_types),
                dict(BLOCK_D=block_d, INTERPRET=False),
                _combine_warps(block_d),
                1,
            )
        )
        # The largest tile per head_dim (8 kv heads or more); fewer heads give smaller BLOCK_H.
        block_h, wd, warps = write_config(8, head_dim)
        specs.append(
            KernelSpec(
                f"write_kv_cache[BLOCK_H={block_h},BLOCK_D={wd},bf16]",
                _write_kv_cache_kernel,
                signature(_write_kv_cache_kernel, write_types),
                dict(BLOCK_H=block_h, BLOCK_D=wd, INTERPRET=False),
                warps,
                1,
            )
        )
    return specs
