"""Triton fused cross-entropy: each token's loss and its gradient in one kernel (Liger-style).

One program per token row, looping over the vocabulary in column blocks, so vocabularies of 256k and
more need no more registers than one block. Pass 1 keeps an online (max, sum of exp) and the plain sum
of the logits (for label smoothing); pass 2 writes softmax - (1 - eps) * onehot - eps / V into dlogits,
which may be the logits buffer itself (every element is loaded before it is stored, each row by one
program). Contract: plm_engine/ops/contracts/cross_entropy.py.

Out-of-range targets: the kernel never reads outside the row; such a row gets a NaN loss and a NaN
gradient, so the error surfaces in the loss without a device sync. The public function additionally
raises a clear error for CPU tensors (checking there costs nothing).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from plm_engine.ops import contracts
from plm_engine.ops.contracts import cross_entropy as contract
from plm_engine.ops.triton.common import check_device, require, signature
from plm_engine.ops.triton.guard import device_guard
from plm_engine.ops.triton.spec import KernelSpec

MAX_BLOCK_N = 8192


def cross_entropy_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a vocabulary of n_cols: the launcher and kernel_specs use it."""
    block = min(MAX_BLOCK_N, max(128, triton.next_power_of_2(max(n_cols, 1))))
    # 16-32 values per thread per block keep the loads wide without spilling.
    return block, max(1, min(16, block // 512))


# ---- kernel -----------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_kernel(
    X_ptr,
    DX_ptr,
    T_ptr,
    LOSS_ptr,
    n_cols,
    ignore_index,
    label_smoothing,
    BLOCK_N: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X_ptr + row * n_cols
    dx_row = DX_ptr + row * n_cols
    target = tl.load(T_ptr + row)
    cols = tl.arange(0, BLOCK_N)
    if target == ignore_index:
        for start in range(0, n_cols, BLOCK_N):
            offs = start + cols
            tl.store(
                dx_row + offs, tl.zeros([BLOCK_N], dtype=tl.float32).to(DX_ptr.dtype.element_ty), mask=offs < n_cols
            )
        tl.store(LOSS_ptr + row, 0.0)
    else:
        m = float("-inf")
        s = 0.0
        sum_x = 0.0
        for start in range(0, n_cols, BLOCK_N):
            offs = start + cols
            x = tl.load(x_row + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                sum_x += tl.sum(tl.where(offs < n_cols, x, 0.0), axis=0)
        in_range = (target >= 0) & (target < n_cols)
        # Read before pass 2 may overwrite it (in-place gradient).
        x_t = tl.load(x_row + target, mask=in_range, other=0.0).to(tl.float32)
        eps_v = label_smoothing / n_cols
        # lse - (1 - eps) x_t - eps mean(x), arranged so the large common offset m cancels exactly first.
        loss = tl.log(s) + (1.0 - label_smoothing) * (m - x_t)
        if HAS_SMOOTHING:
            loss += label_smoothing * (m - sum_x / n_cols)
        tl.store(LOSS_ptr + row, tl.where(in_range, loss, float("nan")))
        inv = 1.0 / s
        for start in range(0, n_cols, BLOCK_N):
            offs = start + cols
            x = tl.load(x_row + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
            g = tl.exp(x - m) * inv - eps_v
            g = tl.where(offs == target, g - (1.0 - label_smoothing), g)
            g = tl.where(in_range, g, float("nan"))
            tl.store(dx_row + offs, g.to(DX_ptr.dtype.element_ty), mask=offs < n_cols)


# ---- launcher ---------------------------------------------------------------------------------------


def _launch(logits, target, dlogits, ignore_index: int, label_smoothing: float) -> torch.Tensor:
    # Memory safety only (the public op checks the argument contract): what the kernel indexes.
    check_device(logits, "triton_cross_entropy_fwd")
    require(
        logits.dim() == 2 and logits.is_contiguous(),
        "triton_cross_entropy_fwd",
        f"logits must be a contiguous (N, V) tensor, got {tuple(logits.shape)}",
    )
    require(
        target.shape == logits.shape[:1]
        and target.dtype == torch.int64
        and target.is_contiguous()
        and target.device == logits.device,
        "triton_cross_entropy_fwd",
        f"target must be a contiguous int64 ({logits.shape[0]},) tensor on {logits.device}, "
        f"got {target.dtype} {tuple(target.shape)} on {target.device}",
    )
    n, v = logits.shape
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n:
        block, warps = cross_entropy_config(v)
        with device_guard(logits):
            _cross_entropy_kernel[(n,)](
                logits,
                dlogits,
                target,
                loss,
                v,
                ignore_index,
                label_smoothing,
                BLOCK_N=block,
                HAS_SMOOTHING=label_smoothing > 0,
                num_warps=warps,
            )
    return loss


# ---- registration -----------------------------------------------------------------------------------


@torch.library.custom_op("plm_engine::triton_cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    dlogits = torch.empty_like(logits)
    return _launch(logits, target, dlogits, ignore_index, label_smoothing), dlogits


@torch.library.custom_op("plm_engine::triton_cross_entropy_fwd_inplace", mutates_args=("logits",))
def cross_entropy_fwd_inplace(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float
) -> torch.Tensor:
    return _launch(logits, target, logits, ignore_index, label_smoothing)


contracts.register(contract, "triton_")


# ---- shipped configurations for the static report ---------------------------------------------------

_TT = ("fp32", "fp16", "bf16")


def kernel_specs() -> list[KernelSpec]:
    """Every (kernel, config) cross_entropy_config can pick, with and without label smoothing."""
    specs = []
    blocks = sorted({cross_entropy_config(128 << i) for i in range(12)})
    scalars = {"T_ptr": "*i64", "LOSS_ptr": "*fp32", "n_cols": "i32", "ignore_index": "i64", "label_smoothing": "fp32"}
    for tt in _TT:
        types = signature(_cross_entropy_kernel, {"X_ptr": f"*{tt}", "DX_ptr": f"*{tt}", **scalars})
        for (block, warps), smoothing in itertools.product(blocks, (False, True)):
            name = f"cross_entropy[BLOCK_N={block},SMOOTHING={smoothing},{tt}]"
            flags = {"BLOCK_N": block, "HAS_SMOOTHING": smoothing}
            specs.append(KernelSpec(name, _cross_entropy_kernel, types, flags, num_warps=warps))
    return specs
