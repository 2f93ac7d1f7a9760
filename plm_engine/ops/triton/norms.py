"""Triton LayerNorm / RMSNorm, forward and backward, with the pre-norm block's fused residual add.

The contract is plm_engine/ops/contracts/norms.py's, shared by every backend:

  forward   h    = x (+ residual, rounded to x's dtype: the value the residual stream carries on)
            mean = sum(h) / n                 (0 for RMSNorm)
            rstd = 1 / sqrt(sum((h - mean)^2) / n + eps)
            y    = (h - mean) * rstd * weight (+ bias)
  backward  xhat = (h - mean) * rstd,  wdy = weight * dy
            dx   = (wdy - xhat * c1 - c2) * rstd (+ dh),   c1 = mean(xhat * wdy),  c2 = mean(wdy) (0 for RMSNorm)
            dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy

Register budget. A program normally holds whole rows in registers, so memory sees one read of every
input and one write of every output. That stops working where the per-thread share of a row no longer
fits: a CTA has at most 1024 threads and, at 1024 threads, 64 registers each, so a 65536-wide fp32 row
cannot sit in registers at all. `report-kernels` (plm_engine/ops/report.py) compiles every shipped
configuration for sm_80 and sm_90 and fails on any spill; the limits below are what it measured with
Triton 3.6, 3.8 and 3.9, for aligned and unaligned rows:
  - forward: rows of up to 8192 columns (_FWD_MAX_REG_BLOCK) stay in registers; longer rows are
    streamed through in 4096-column pieces, three passes over the row (sum, centred sum of squares,
    output), the re-reads served by L1/L2;
  - backward: it also keeps the dweight/dbias accumulators of its rows in registers, so its whole-row
    limit is 4096 (_BWD_MAX_REG_BLOCK); longer rows first get their two coefficients c1, c2 from a
    small streaming kernel, then the main kernel works on 4096-column blocks of them.

Under TRITON_INTERPRET=1 (tests on CPU) bf16 arithmetic is wrong and fp32 -> bf16 casts truncate, so
every kernel upcasts right after loading and the INTERPRET flag rounds bf16 stores to nearest-even by
hand; the compiled kernels use the hardware conversion.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from plm_engine.ops import backends, contracts
from plm_engine.ops.contracts import norms as contract
from plm_engine.ops.contracts.norms import TRITON_MAX_N
from plm_engine.ops.triton.common import check_device, device_sm_count, require, round_to, signature
from plm_engine.ops.triton.guard import device_guard
from plm_engine.ops.triton.spec import KernelSpec

# ---- jit kernels -----------------------------------------------------------------------------------


@triton.jit
def _norm_fwd_kernel(
    X_ptr,
    R_ptr,
    W_ptr,
    B_ptr,
    Y_ptr,
    H_ptr,
    Mean_ptr,
    Rstd_ptr,
    stride_x_row,
    stride_r_row,
    stride_y_row,
    stride_h_row,
    n_rows,
    n_cols,
    inv_n,  # 1 / n_cols from the host: exact for n_cols = 1, unlike an fp32 division on the GPU
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """BLOCK_M whole rows per program, held in registers: (BLOCK_M, BLOCK_N) tile, BLOCK_N >= n_cols."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = row0 + rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    # The row base is int64 (rows * n can pass 2**31); offsets inside the tile stay int32: several
    # rows share a program only when they are short (BLOCK_M * BLOCK_N == _FWD_MIN_TILE).
    x = tl.load(X_ptr + row0 * stride_x_row + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0)
    h = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R_ptr + row0 * stride_r_row + rows[:, None] * stride_r_row + cols[None, :], mask=mask, other=0.0)
        # Round the sum to x's dtype and normalise that rounded value, as the backward will see it.
        h_out = round_to(h + r.to(tl.float32), H_ptr.dtype.element_ty, INTERPRET)
        tl.store(H_ptr + row0 * stride_h_row + rows[:, None] * stride_h_row + cols[None, :], h_out, mask=mask)
        h = h_out.to(tl.float32)

    if IS_RMS:
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        var = tl.sum(h * h, axis=1) * inv_n
    else:
        mean = tl.sum(h, axis=1) * inv_n
        # Two passes over the registers: the centred sum of squares does not cancel when |mean| >> std.
        hc = tl.where(mask, h - mean[:, None], 0.0)
        var = tl.sum(hc * hc, axis=1) * inv_n
    rstd = tl.rsqrt(var + eps)

    w = tl.load(W_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = (h - mean[:, None]) * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        b = tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y += b[None, :]
    y_ptrs = Y_ptr + row0 * stride_y_row + rows[:, None] * stride_y_row + cols[None, :]
    tl.store(y_ptrs, round_to(y, Y_ptr.dtype.element_ty, INTERPRET), mask=mask)
    if not IS_RMS:
        tl.store(Mean_ptr + row0 + rows, mean, mask=row_mask)
    tl.store(Rstd_ptr + row0 + rows, rstd, mask=row_mask)


@triton.jit
def _norm_fwd_long_kernel(
    X_ptr,
    R_ptr,
    W_ptr,
    B_ptr,
    Y_ptr,
    H_ptr,
    Mean_ptr,
    Rstd_ptr,
    stride_x_row,
    stride_r_row,
    stride_y_row,
    stride_h_row,
    n_cols,
    inv_n,
    eps,
    CHUNK: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One row per program, streamed in CHUNK-column pieces: for rows too long for registers."""
    row = tl.program_id(0).to(tl.int64)
    X_ptr += row * stride_x_row
    R_ptr += row * stride_r_row
    Y_ptr += row * stride_y_row
    H_ptr += row * stride_h_row
    offs = tl.arange(0, CHUNK)

    # Pass 1: sum (or sum of squares for RMSNorm), writing h on the way. Per-lane partial sums in fp32,
    # reduced once at the end. evict_last: the later passes read the row again.
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, n_cols, CHUNK):
        cols = start + offs
        mask = cols < n_cols
        h = tl.load(X_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            h_out = round_to(h + r, H_ptr.dtype.element_ty, INTERPRET)
            tl.store(H_ptr + cols, h_out, mask=mask, eviction_policy="evict_last")
            h = h_out.to(tl.float32)
        if IS_RMS:
            acc += h * h
        else:
            acc += h
    if HAS_RESIDUAL:
        # Later passes re-read h from memory; other threads of this CTA wrote parts of it.
        tl.debug_barrier()
        S_ptr = H_ptr
    else:
        S_ptr = X_ptr

    if IS_RMS:
        mean = 0.0
        var = tl.sum(acc, axis=0) * inv_n
    else:
        mean = tl.sum(acc, axis=0) * inv_n
        # Pass 2: centred sum of squares, for the same reason as in the whole-row kernel.
        acc = tl.zeros([CHUNK], dtype=tl.float32)
        for start in range(0, n_cols, CHUNK):
            cols = start + offs
            mask = cols < n_cols
            h = tl.load(S_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
            hc = tl.where(mask, h - mean, 0.0)
            acc += hc * hc
        var = tl.sum(acc, axis=0) * inv_n
    rstd = tl.rsqrt(var + eps)

    # Last pass: the output; nothing of the row is needed afterwards.
    for start in range(0, n_cols, CHUNK):
        cols = start + offs
        mask = cols < n_cols
        h = tl.load(S_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (h - mean) * rstd * w
        if HAS_BIAS:
            y += tl.load(B_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y_ptr + cols, round_to(y, Y_ptr.dtype.element_ty, INTERPRET), mask=mask)
    if not IS_RMS:
        tl.store(Mean_ptr + row, mean)
    tl.store(Rstd_ptr + row, rstd)


@triton.jit
def _norm_bwd_kernel(
    DY_ptr,
    DH_ptr,
    H_ptr,
    W_ptr,
    Mean_ptr,
    Rstd_ptr,
    C1_ptr,
    C2_ptr,
    DX_ptr,
    DW_ptr,
    DB_ptr,
    stride_dy_row,
    stride_dh_row,
    stride_h_row,
    stride_dx_row,
    n_rows,
    n_cols,
    inv_n,
    rows_per_program,
    BLOCK_N: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DH: tl.constexpr,
    LOAD_COEFFS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (g, j): rows [g * rows_per_program, ...) x columns [j * BLOCK_N, ...).

    dx row by row; the program's dweight/dbias partial sums stay in fp32 registers across its rows and
    are written once to row g of the (G, n) partial buffers (summed by the launcher): no atomics, and a
    result independent of scheduling. Without LOAD_COEFFS one column block covers the whole row and the
    row reductions c1, c2 are computed here; with it they come from _norm_bwd_coeffs_kernel.
    """
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    # int64 bounds make the row index, and so every row offset, int64.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        h = tl.load(H_ptr + row * stride_h_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + row * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd_ptr + row)
        if IS_RMS:
            xhat = h * rstd
        else:
            xhat = (h - tl.load(Mean_ptr + row)) * rstd
        # Masked columns have w = dy = 0, so they add nothing to the sums below.
        wdy = w * dy
        if LOAD_COEFFS:
            c1 = tl.load(C1_ptr + row)
        else:
            c1 = tl.sum(xhat * wdy, axis=0) * inv_n
        if IS_RMS:
            # Same value as (wdy - xhat * c1) * rstd; that form makes ptxas spill a register for fp32 on
            # sm_80 (seen with Triton 3.8/3.9 in report-kernels).
            dx = wdy * rstd - xhat * (c1 * rstd)
        else:
            if LOAD_COEFFS:
                c2 = tl.load(C2_ptr + row)
            else:
                c2 = tl.sum(wdy, axis=0) * inv_n
            dx = (wdy - xhat * c1 - c2) * rstd
        if HAS_DH:
            dx += tl.load(DH_ptr + row * stride_dh_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX_ptr + row * stride_dx_row + cols, round_to(dx, DX_ptr.dtype.element_ty, INTERPRET), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    part = pid.to(tl.int64) * n_cols  # the (G, n) partial buffers' row g
    tl.store(DW_ptr + part + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_ptr + part + cols, db, mask=mask)


@triton.jit
def _norm_bwd_coeffs_kernel(
    DY_ptr,
    H_ptr,
    W_ptr,
    Mean_ptr,
    Rstd_ptr,
    C1_ptr,
    C2_ptr,
    stride_dy_row,
    stride_h_row,
    n_cols,
    inv_n,
    CHUNK: tl.constexpr,
    IS_RMS: tl.constexpr,
):
    """c1 = mean(xhat * weight * dy), c2 = mean(weight * dy) of one long row, streamed in CHUNKs."""
    row = tl.program_id(0).to(tl.int64)
    H_ptr += row * stride_h_row
    DY_ptr += row * stride_dy_row
    rstd = tl.load(Rstd_ptr + row)
    if IS_RMS:
        mean = 0.0
    else:
        mean = tl.load(Mean_ptr + row)
    offs = tl.arange(0, CHUNK)
    acc1 = tl.zeros([CHUNK], dtype=tl.float32)
    acc2 = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, n_cols, CHUNK):
        cols = start + offs
        mask = cols < n_cols
        h = tl.load(H_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        wdy = w * dy
        acc1 += (h - mean) * rstd * wdy
        if not IS_RMS:
            acc2 += wdy
    tl.store(C1_ptr + row, tl.sum(acc1, axis=0) * inv_n)
    if not IS_RMS:
        tl.store(C2_ptr + row, tl.sum(acc2, axis=0) * inv_n)


# ---- launch configuration (shared by the launchers and kernel_specs) -------------------------------

# Longest BLOCK_N whose whole row fits in registers in the forward. At 16384 a thread may hold only
# 4 registers per element of its share whatever the warp count (65536 registers per SM), and
# unaligned rows spill there (Triton 3.8/3.9).
_FWD_MAX_REG_BLOCK = 8192
# The backward also carries dweight/dbias accumulators across rows: half the forward's limit (8192
# spills with Triton 3.6 at 16 and 32 warps).
_BWD_MAX_REG_BLOCK = 4096
# Columns per step (forward) or per column block (backward) on rows longer than those limits.
_LONG_CHUNK = 4096
# A forward program covers at least this many elements: several rows per program on short rows, so
# that its 4 warps still have 8 elements per thread to load.
_FWD_MIN_TILE = 1024


@dataclass(frozen=True)
class LaunchConfig:
    """How one launch is laid out for rows whose next power of two is block_n.

    long_row: the forward streams the row through `chunk`-wide pieces (_norm_fwd_long_kernel); the
      backward splits it into `chunk`-wide column blocks after _norm_bwd_coeffs_kernel.
    block_m: rows per forward program (whole-row forward only; 1 otherwise).
    """

    block_n: int
    num_warps: int
    num_stages: int
    long_row: bool = False
    block_m: int = 1
    chunk: int = 0

    @property
    def cols_per_program(self) -> int:
        return self.chunk if self.long_row else self.block_n


def _num_warps(elements: int, min_warps: int) -> int:
    """Warps giving each thread 8 elements of a program's tile, clamped to [min_warps, 16].

    8 values per array per thread is one 16-byte load of a 16-bit row, and leaves the backward room for
    its two accumulators per element. More than 16 warps would only lower each thread's register
    ceiling (65536 per SM); the 8192-wide forward therefore runs 16 per thread.
    """
    return max(min_warps, min(16, elements // (32 * 8)))


def launch_config(direction: str, block_n: int) -> LaunchConfig:
    """The one place that maps (direction "fwd" | "bwd", BLOCK_N) to a launch layout.

    Forward: at least 4 warps; short rows are packed several to a program. Backward: from 1 warp for
    tiny rows (reductions are then warp shuffles only). Rows above the register limits use the same
    rule on _LONG_CHUNK columns. num_stages is 1: these kernels have no loads the software pipeliner
    stages. Every configuration returned here is compiled for sm_80/sm_90 by report-kernels.
    """
    if block_n < 1 or block_n & (block_n - 1) or block_n > TRITON_MAX_N:
        raise ValueError(f"block_n must be a power of two in [1, {TRITON_MAX_N}], got {block_n}")
    if direction == "fwd":
        if block_n > _FWD_MAX_REG_BLOCK:
            return LaunchConfig(block_n, _num_warps(_LONG_CHUNK, 4), 1, long_row=True, chunk=_LONG_CHUNK)
        block_m = max(1, _FWD_MIN_TILE // block_n)
        return LaunchConfig(block_n, _num_warps(block_m * block_n, 4), 1, block_m=block_m)
    if direction == "bwd":
        if block_n > _BWD_MAX_REG_BLOCK:
            return LaunchConfig(block_n, _num_warps(_LONG_CHUNK, 1), 1, long_row=True, chunk=_LONG_CHUNK)
        return LaunchConfig(block_n, _num_warps(block_n, 1), 1)
    raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")


# ---- launchers -------------------------------------------------------------------------------------


def _launch_options(cfg: LaunchConfig) -> dict:
    # FMA contraction pinned on (the accuracy tests assume it; Triton 3.10 turns the default off).
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)


def _bwd_row_groups(device: torch.device, rows: int, warps_per_group: int) -> int:
    """How many row groups G the backward splits the rows into (one partial dweight row each).

    On a GPU: about 16 warps per SM in all, which fits in one wave whenever a thread needs <= 128
    registers (report-kernels shows every shipped backward does) while other programs hide each one's
    memory latency. Under the interpreter a few programs keep tests fast (each costs a fixed slice of Python
    time: benchmarks/results/NOTES.md).
    """
    if device.type == "cuda":
        groups = device_sm_count(device)
        groups *= max(1, 16 // warps_per_group)
    else:
        groups = 4
    return max(1, min(rows, groups))


def _check_rows(t: Tensor, name: str, what: str) -> None:
    # Memory safety only (the public op checks the argument contract): what the kernels index.
    check_device(t, what)
    require(
        t.dim() == 2 and t.is_contiguous(), what, f"{name} must be 2-D (rows, n) and contiguous, got {tuple(t.shape)}"
    )
    require(t.shape[1] <= TRITON_MAX_N, what, f"rows longer than {TRITON_MAX_N} are not supported, got {t.shape[1]}")


def _check_like(t: Tensor, name: str, shape: tuple, ref: Tensor, what: str) -> None:
    require(
        tuple(t.shape) == tuple(shape) and t.is_contiguous() and t.device == ref.device,
        what,
        f"{name} must have shape {tuple(shape)}, be contiguous and on {ref.device}; got {tuple(t.shape)} on {t.device}",
    )


def _launch_norm_fwd(x, weight, bias, residual, eps, is_rms):
    what = "triton_norm_fwd"
    _check_rows(x, "x", what)
    rows, n = x.shape
    for name, t, shape in (("weight", weight, (n,)), ("bias", bias, (n,)), ("residual", residual, x.shape)):
        if t is not None:
            _check_like(t, name, shape, x, what)

    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    mean = x.new_empty((0 if is_rms else rows,), dtype=torch.float32)
    rstd = x.new_empty((rows,), dtype=torch.float32)
    if rows == 0 or n == 0:
        if n == 0:  # an empty row has mean 0 and variance 0, as in the C++ kernels
            mean.zero_()
            rstd.fill_(torch.tensor(eps, dtype=torch.float32).rsqrt().item())  # inf for eps == 0
        return y, h, mean, rstd

    cfg = launch_config("fwd", triton.next_power_of_2(n))
    # Absent optional tensors are never read or written (constexpr flags); any pointer stands in.
    args = (
        x,
        residual if residual is not None else x,
        weight,
        bias if bias is not None else weight,
        y,
        h if residual is not None else y,
        rstd if is_rms else mean,
        rstd,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        y.stride(0),
        h.stride(0) if residual is not None else 0,
    )
    flags = dict(
        IS_RMS=is_rms,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        INTERPRET=backends.triton_interpreted(),
        **_launch_options(cfg),
    )
    if cfg.long_row:
        with device_guard(x):
            _norm_fwd_long_kernel[(rows,)](*args, n, 1.0 / n, eps, CHUNK=cfg.chunk, **flags)
    else:
        grid = (triton.cdiv(rows, cfg.block_m),)
        with device_guard(x):
            _norm_fwd_kernel[grid](*args, rows, n, 1.0 / n, eps, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags)
    return y, h, mean, rstd


def _launch_norm_bwd(dy, dh, h, weight, mean, rstd, has_bias, is_rms):
    what = "triton_norm_bwd"
    _check_rows(h, "h", what)
    rows, n = h.shape
    mean = None if is_rms else mean  # RMSNorm's is empty and never read
    for name, t, shape in (
        ("dy", dy, h.shape),
        ("dh", dh, h.shape),
        ("weight", weight, (n,)),
        ("rstd", rstd, (rows,)),
        ("mean", mean, (rows,)),
    ):
        if t is not None:
            _check_like(t, name, shape, h, what)

    dx = torch.empty_like(h)
    empty_db = weight.new_empty((0,))
    if rows == 0 or n == 0:
        return dx, torch.zeros_like(weight), (torch.zeros_like(weight) if has_bias else empty_db)

    cfg = launch_config("bwd", triton.next_power_of_2(n))
    interpret = backends.triton_interpreted()
    col_blocks = triton.cdiv(n, cfg.cols_per_program)
    rows_per_program = triton.cdiv(rows, _bwd_row_groups(h.device, rows, cfg.num_warps * col_blocks))
    groups = triton.cdiv(rows, rows_per_program)  # no program without rows
    dw_partial = torch.empty((groups, n), dtype=torch.float32, device=h.device)
    db_partial = torch.empty((groups, n), dtype=torch.float32, device=h.device) if has_bias else dw_partial
    stat_mean = rstd if is_rms else mean
    if cfg.long_row:
        c1 = torch.empty((rows,), dtype=torch.float32, device=h.device)
        c2 = c1 if is_rms else torch.empty_like(c1)
        with device_guard(h):
            _norm_bwd_coeffs_kernel[(rows,)](
                dy,
                h,
                weight,
                stat_mean,
                rstd,
                c1,
                c2,
                dy.stride(0),
                h.stride(0),
                n,
                1.0 / n,
                CHUNK=cfg.chunk,
                IS_RMS=is_rms,
                **_launch_options(cfg),
            )
    else:
        c1 = c2 = rstd  # not read: the kernel computes the coefficients itself
    grid = (groups, col_blocks)
    with device_guard(h):
        _norm_bwd_kernel[grid](
            dy,
            dh if dh is not None else dy,
            h,
            weight,
            stat_mean,
            rstd,
            c1,
            c2,
            dx,
            dw_partial,
            db_partial,
            dy.stride(0),
            dh.stride(0) if dh is not None else 0,
            h.stride(0),
            dx.stride(0),
            rows,
            n,
            1.0 / n,
            rows_per_program,
            BLOCK_N=cfg.cols_per_program,
            IS_RMS=is_rms,
            HAS_BIAS=has_bias,
            HAS_DH=dh is not None,
            LOAD_COEFFS=cfg.long_row,
            INTERPRET=interpret,
            **_launch_options(cfg),
        )
    dw = dw_partial.sum(0).to(weight.dtype)
    db = db_partial.sum(0).to(weight.dtype) if has_bias else empty_db
    return dx, dw, db


# ---- custom ops: registration and the public callables ---------------------------------------------


@torch.library.custom_op("plm_engine::triton_norm_fwd", mutates_args=())
def norm_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float, is_rms: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LayerNorm / RMSNorm forward of x: (rows, n) contiguous -> (y, h, mean, rstd) as in contracts/norms.py.

    weight, bias: (n,) in x's dtype or float32. h: x + residual in x's dtype, or an empty tensor when
    residual is None. mean: (rows,) float32, empty for RMSNorm. rstd: (rows,) float32.
    """
    return _launch_norm_fwd(x, weight, bias, residual, eps, is_rms)


@torch.library.custom_op("plm_engine::triton_norm_bwd", mutates_args=())
def norm_bwd(
    dy: Tensor,
    dh: Optional[Tensor],
    h: Tensor,
    weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    has_bias: bool,
    is_rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of norm_fwd: dy, dh (optional gradient of the h output), h: (rows, n) -> (dx, dweight, dbias).

    dx in h's dtype (dh added in), dweight and dbias (n,) in weight's dtype; dbias is empty (0,) when
    has_bias is False. mean/rstd are norm_fwd's.
    """
    return _launch_norm_bwd(dy, dh, h, weight, mean, rstd, has_bias, is_rms)


contracts.register(contract, "triton_")


# ---- shipped configurations, for report-kernels ----------------------------------------------------


def _spec_types(dt: str) -> tuple[dict[str, str], dict[str, str]]:
    """Argument types of the forward and backward kernels for data type dt (weights in dt too)."""
    f32 = "*fp32"
    fwd = {
        "X_ptr": f"*{dt}",
        "R_ptr": f"*{dt}",
        "W_ptr": f"*{dt}",
        "B_ptr": f"*{dt}",
        "Y_ptr": f"*{dt}",
        "H_ptr": f"*{dt}",
        "Mean_ptr": f32,
        "Rstd_ptr": f32,
        "stride_x_row": "i32",
        "stride_r_row": "i32",
        "stride_y_row": "i32",
        "stride_h_row": "i32",
        "n_rows": "i32",
        "n_cols": "i32",
        "inv_n": "fp32",
        "eps": "fp32",
    }
    bwd = {
        "DY_ptr": f"*{dt}",
        "DH_ptr": f"*{dt}",
        "H_ptr": f"*{dt}",
        "W_ptr": f"*{dt}",
        "Mean_ptr": f32,
        "Rstd_ptr": f32,
        "C1_ptr": f32,
        "C2_ptr": f32,
        "DX_ptr": f"*{dt}",
        "DW_ptr": f32,
        "DB_ptr": f32,
        "stride_dy_row": "i32",
        "stride_dh_row": "i32",
        "stride_h_row": "i32",
        "stride_dx_row": "i32",
        "n_rows": "i32",
        "n_cols": "i32",
        "inv_n": "fp32",
        "rows_per_program": "i32",
    }
    return fwd, bwd


def kernel_specs() -> list[KernelSpec]:
    """Every configuration the launchers can pick (launch_config for each power-of-two BLOCK_N up to
    TRITON_MAX_N), at the heaviest flags, in bf16 and fp32.

    fp16 compiles like bf16. LayerNorm with bias and residual (forward) or bias and dh (backward) holds
    the most per element; the RMSNorm variants are listed too, as ptxas allocates them differently.
    """
    specs: dict[str, KernelSpec] = {}  # by name: one long-row kernel serves every long BLOCK_N

    def add(name, fn, types, constexprs, cfg):
        specs.setdefault(name, KernelSpec(name, fn, signature(fn, types), constexprs, cfg.num_warps, cfg.num_stages))

    for dt in ("bf16", "fp32"):
        fwd_types, bwd_types = _spec_types(dt)
        for kind in ("layer", "rms"):
            rms = kind == "rms"
            fwd_flags = dict(IS_RMS=rms, HAS_BIAS=not rms, HAS_RESIDUAL=True, INTERPRET=False)
            bwd_flags = dict(IS_RMS=rms, HAS_BIAS=not rms, HAS_DH=True, INTERPRET=False)
            for log2 in range(TRITON_MAX_N.bit_length()):
                block_n = 1 << log2
                cfg = launch_config("fwd", block_n)
                if cfg.long_row:
                    add(
                        f"norm_fwd_long[{kind},CHUNK={cfg.chunk},{dt}]",
                        _norm_fwd_long_kernel,
                        fwd_types,
                        dict(CHUNK=cfg.chunk, **fwd_flags),
                        cfg,
                    )
                else:
                    add(
                        f"norm_fwd[{kind},BLOCK_N={block_n},BLOCK_M={cfg.block_m},{dt}]",
                        _norm_fwd_kernel,
                        fwd_types,
                        dict(BLOCK_M=cfg.block_m, BLOCK_N=block_n, **fwd_flags),
                        cfg,
                    )
                cfg = launch_config("bwd", block_n)
                name = "norm_bwd_split" if cfg.long_row else "norm_bwd"
                add(
                    f"{name}[{kind},BLOCK_N={cfg.cols_per_program},{dt}]",
                    _norm_bwd_kernel,
                    bwd_types,
                    dict(BLOCK_N=cfg.cols_per_program, LOAD_COEFFS=cfg.long_row, **bwd_flags),
                    cfg,
                )
                if cfg.long_row:
                    add(
                        f"norm_bwd_coeffs[{kind},CHUNK={cfg.chunk},{dt}]",
                        _norm_bwd_coeffs_kernel,
                        bwd_types,
                        dict(CHUNK=cfg.chunk, IS_RMS=rms),
                        cfg,
                    )
    return list(specs.values())
