"""Triton softmax (scale, optional bottom-right causal mask): forward and backward.

One program per row. A row that fits one block (n <= SINGLE_MAX_N) is loaded once, kept in registers,
and written once. Longer rows (up to any length; 131072 and beyond) loop over column blocks: pass 1
keeps an online (max, sum of exp) pair, rescaling the sum when the max grows, pass 2 recomputes
exp(v - max) / sum and writes it, so a row costs two reads and one write whatever its length.
Contract: plm_engine/ops/contracts/softmax.py (x: (batch, sq, sk) contiguous; masked keys and all -inf
rows give zeros).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plm_engine.ops import contracts
from plm_engine.ops.contracts import softmax as contract
from plm_engine.ops.triton.common import check_device, require, signature
from plm_engine.ops.triton.guard import device_guard
from plm_engine.ops.triton.spec import KernelSpec

# Longest row one program holds in registers; 16384 fp32 over 16 warps is 32 values per thread.
SINGLE_MAX_N = 16384
LOOP_BLOCK_N = 4096
MIN_BLOCK_N = 128


def softmax_config(n_cols: int) -> tuple[int, int, bool]:
    """(BLOCK_N, num_warps, single_block) for rows of n_cols: the launchers and kernel_specs use it."""
    block = max(MIN_BLOCK_N, triton.next_power_of_2(max(n_cols, 1)))
    if block <= SINGLE_MAX_N:
        # About 16-32 values per thread: enough loads in flight without spilling.
        return block, max(1, min(16, block // 512)), True
    return LOOP_BLOCK_N, 8, False


# ---- kernels ----------------------------------------------------------------------------------------


@triton.jit
def _softmax_fwd_kernel(
    X_ptr,
    Y_ptr,
    n_cols,
    seqlen_q,
    causal_shift,
    scale,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X_ptr + row * n_cols
    y_row = Y_ptr + row * n_cols
    if CAUSAL:
        # Query i sees keys j <= i + (sk - sq); causal_shift = sk - sq.
        valid = tl.minimum(tl.maximum((row % seqlen_q) + causal_shift + 1, 0), n_cols)
    else:
        valid = n_cols
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        x = tl.load(x_row + cols, mask=cols < valid, other=float("-inf")).to(tl.float32) * scale
        m = tl.max(x, axis=0)
        # All -inf (or fully masked): subtract 0 so exp gives 0, not exp(-inf + inf) = NaN.
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(x - m)
        s = tl.sum(e, axis=0)
        inv = tl.where(s > 0, 1.0 / tl.maximum(s, 1.0), 0.0)  # s >= 1 unless the row is empty
        tl.store(y_row + cols, (e * inv).to(Y_ptr.dtype.element_ty), mask=cols < n_cols)
    else:
        m = float("-inf")
        s = 0.0
        for start in range(0, valid, BLOCK_N):
            offs = start + cols
            x = tl.load(x_row + offs, mask=offs < valid, other=float("-inf")).to(tl.float32) * scale
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
            m = m_new
        m = tl.where(m == float("-inf"), 0.0, m)
        inv = tl.where(s > 0, 1.0 / tl.maximum(s, 1.0), 0.0)  # s >= 1 unless the row is empty
        for start in range(0, n_cols, BLOCK_N):
            offs = start + cols
            x = tl.load(x_row + offs, mask=offs < valid, other=float("-inf")).to(tl.float32) * scale
            tl.store(y_row + offs, (tl.exp(x - m) * inv).to(Y_ptr.dtype.element_ty), mask=offs < n_cols)


@triton.jit
def _softmax_bwd_kernel(DY_ptr, Y_ptr, DX_ptr, n_cols, scale, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    dy_row = DY_ptr + row * n_cols
    y_row = Y_ptr + row * n_cols
    dx_row = DX_ptr + row * n_cols
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        mask = cols < n_cols
        y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(y * dy, axis=0)
        tl.store(dx_row + cols, (scale * y * (dy - dot)).to(DX_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            offs = start + cols
            y = tl.load(y_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
            acc += y * dy
        dot = tl.sum(acc, axis=0)
        for start in range(0, n_cols, BLOCK_N):
            offs = start + cols
            y = tl.load(y_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
            tl.store(dx_row + offs, (scale * y * (dy - dot)).to(DX_ptr.dtype.element_ty), mask=offs < n_cols)


# ---- launchers --------------------------------------------------------------------------------------


def _check(what: str, t: torch.Tensor, *others: torch.Tensor) -> None:
    # Memory safety only (the public op checks the argument contract).
    check_device(t, what)
    for u in (t, *others):
        require(
            u.dim() == 3 and u.shape == t.shape and u.is_contiguous() and u.device == t.device,
            what,
            f"inputs must be contiguous (batch, sq, sk) tensors of one shape and device, got {tuple(u.shape)}",
        )


def _launch_fwd(x: torch.Tensor, y: torch.Tensor, scale: float, causal: bool) -> None:
    batch, sq, sk = x.shape
    block, warps, single = softmax_config(sk)
    with device_guard(x):
        _softmax_fwd_kernel[(batch * sq,)](
            x, y, sk, sq, sk - sq, scale, CAUSAL=causal, BLOCK_N=block, SINGLE=single, num_warps=warps
        )


def _launch_bwd(dy: torch.Tensor, y: torch.Tensor, dx: torch.Tensor, scale: float) -> None:
    batch, sq, sk = y.shape
    block, warps, single = softmax_config(sk)
    with device_guard(y):
        _softmax_bwd_kernel[(batch * sq,)](dy, y, dx, sk, scale, BLOCK_N=block, SINGLE=single, num_warps=warps)


# ---- registration -----------------------------------------------------------------------------------


@torch.library.custom_op("plm_engine::triton_softmax_fwd", mutates_args=())
def softmax_fwd(x: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    _check("triton_softmax_fwd", x)
    y = torch.empty_like(x)
    if y.numel():
        _launch_fwd(x, y, scale, causal)
    return y


@torch.library.custom_op("plm_engine::triton_softmax_bwd", mutates_args=())
def softmax_bwd(dy: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    _check("triton_softmax_bwd", y, dy)
    dx = torch.empty_like(y)
    if dx.numel():
        _launch_bwd(dy, y, dx, scale)
    return dx


contracts.register(contract, "triton_")


# ---- shipped configurations for the static report ---------------------------------------------------

_TT = ("fp32", "fp16", "bf16")


def kernel_specs() -> list[KernelSpec]:
    """Every (kernel, config) softmax_config can pick: each single-block size and the looped path."""
    sizes = [MIN_BLOCK_N << i for i in range((SINGLE_MAX_N // MIN_BLOCK_N).bit_length())] + [SINGLE_MAX_N * 2]
    specs = []
    for tt in _TT:
        fwd = signature(_softmax_fwd_kernel, {"X_ptr": f"*{tt}", "Y_ptr": f"*{tt}", "n_cols": "i32", "scale": "fp32"})
        fwd.update(seqlen_q="i32", causal_shift="i32")
        bwd = signature(_softmax_bwd_kernel, {"DY_ptr": f"*{tt}", "Y_ptr": f"*{tt}", "DX_ptr": f"*{tt}"})
        bwd.update(n_cols="i32", scale="fp32")
        for n in sizes:
            block, warps, single = softmax_config(n)
            config = f"BLOCK_N={block},SINGLE={single}"
            for causal in (False, True):
                flags = {"CAUSAL": causal, "BLOCK_N": block, "SINGLE": single}
                specs.append(
                    KernelSpec(f"softmax_fwd[{config},CAUSAL={causal},{tt}]", _softmax_fwd_kernel, fwd, flags, warps)
                )
            flags = {"BLOCK_N": block, "SINGLE": single}
            specs.append(KernelSpec(f"softmax_bwd[{config},{tt}]", _softmax_bwd_kernel, bwd, flags, warps))
    return specs
