"""Triton rotary position embedding (RoPE) of q and k, out of place and in place.

The contract is plm_engine/ops/contracts/rope.py's, shared by every backend: q (batch, seqlen,
q_heads, head_dim) and k (batch, seqlen, k_heads, head_dim) with unit last stride, cos/sin
(max_seqlen, rotary_dim / 2), positions int64 (batch, seqlen) or None (position = index in sequence).
Each pair (x1, x2) becomes (x1 cos - x2 sin, x2 cos + x1 sin); `conjugate` negates sin (the backward).

Layout: one program per (token, block of BLOCK_H heads); the token's cos/sin row is loaded once and
reused for its BLOCK_H heads. Axis 1 enumerates q's head blocks first, then k's, so q and k go in one
launch. A rotate_half pair is two unit-stride half rows; an interleaved pair is the even and odd
elements, two stride-2 loads that touch the same sectors (L1 serves the second). Out of place, the
features past rotary_dim are copied in the same program, BLOCK_HALF columns at a time.

Under TRITON_INTERPRET=1 (tests on CPU) fp32 -> bf16 casts truncate, so bf16 stores are rounded to
nearest-even by hand there (triton/common.py's round_to); the compiled kernels use the hardware
conversion.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from plm_engine.ops import backends, contracts
from plm_engine.ops.contracts import rope as contract
from plm_engine.ops.contracts.rope import TRITON_MAX_HALF
from plm_engine.ops.triton.common import check_device, require, round_to
from plm_engine.ops.triton.guard import device_guard
from plm_engine.ops.triton.spec import KernelSpec

# ---- jit kernels -----------------------------------------------------------------------------------


@triton.jit
def _rope_heads(
    X_ptr,
    O_ptr,
    stride_x_head,
    stride_o_head,
    h0,
    n_heads,
    cos,
    sin,
    half,
    pass_end,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Rotates heads [h0, h0 + BLOCK_H) of one token; X_ptr / O_ptr point at the token's head 0."""
    heads = h0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < half)
    x_rows = X_ptr + heads[:, None].to(tl.int64) * stride_x_head
    o_rows = O_ptr + heads[:, None].to(tl.int64) * stride_o_head
    if INTERLEAVED:
        i1 = 2 * cols[None, :]
        i2 = i1 + 1
    else:
        i1 = cols[None, :]
        i2 = i1 + half
    x1 = tl.load(x_rows + i1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + i2, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    dtype = O_ptr.dtype.element_ty
    tl.store(o_rows + i1, round_to(o1, dtype, INTERPRET), mask=mask)
    tl.store(o_rows + i2, round_to(o2, dtype, INTERPRET), mask=mask)
    # Partial rotary, out of place: features [2 * half, pass_end = head_dim) are copied unchanged
    # (pass_end = 2 * half, no iteration, otherwise).
    for start in range(2 * half, pass_end, BLOCK_HALF):
        pcols = start + cols[None, :]
        pmask = (heads[:, None] < n_heads) & (pcols < pass_end)
        tl.store(o_rows + pcols, tl.load(x_rows + pcols, mask=pmask, other=0.0), mask=pmask)


@triton.jit
def _rope_kernel(
    Q_ptr,
    K_ptr,
    QO_ptr,
    KO_ptr,
    Cos_ptr,
    Sin_ptr,
    Pos_ptr,
    stride_q_b,
    stride_q_s,
    stride_q_h,
    stride_k_b,
    stride_k_s,
    stride_k_h,
    stride_qo_b,
    stride_qo_s,
    stride_qo_h,
    stride_ko_b,
    stride_ko_s,
    stride_ko_h,
    stride_cos_row,
    stride_cos_col,
    seqlen,
    n_q_heads,
    n_k_heads,
    half,
    pass_end,
    sin_sign,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_POS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Program (token, head block): head blocks of q come first on axis 1, then those of k."""
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    b = tok // seqlen
    s = tok % seqlen
    if HAS_POS:
        pos = tl.load(Pos_ptr + tok)
    else:
        pos = s
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < half
    coffs = pos * stride_cos_row + cols * stride_cos_col
    cos = tl.load(Cos_ptr + coffs, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(Sin_ptr + coffs, mask=cmask, other=0.0).to(tl.float32) * sin_sign

    n_q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    if hb < n_q_blocks:
        _rope_heads(
            Q_ptr + b * stride_q_b + s * stride_q_s,
            QO_ptr + b * stride_qo_b + s * stride_qo_s,
            stride_q_h,
            stride_qo_h,
            hb * BLOCK_H,
            n_q_heads,
            cos,
            sin,
            half,
            pass_end,
            BLOCK_H,
            BLOCK_HALF,
            INTERLEAVED,
            INTERPRET,
        )
    else:
        _rope_heads(
            K_ptr + b * stride_k_b + s * stride_k_s,
            KO_ptr + b * stride_ko_b + s * stride_ko_s,
            stride_k_h,
            stride_ko_h,
            (hb - n_q_blocks) * BLOCK_H,
            n_k_heads,
            cos,
            sin,
            half,
            pass_end,
            BLOCK_H,
            BLOCK_HALF,
            INTERLEAVED,
            INTERPRET,
        )


# ---- launch configuration (shared by the launcher and kernel_specs) --------------------------------

# Pairs per program at most: enough for every thread of 4 warps to hold 8 pairs (two 16-byte loads of a
# 16-bit rotate_half row), few enough that x1, x2, o1, o2 in fp32 stay far below the register limit.
_PAIRS_PER_PROGRAM = 1024
# Narrowest BLOCK_HALF: tiny rotary widths are padded rather than compiled separately.
_MIN_BLOCK_HALF = 8


@dataclass(frozen=True)
class LaunchConfig:
    block_h: int
    block_half: int
    num_warps: int
    num_stages: int = 1


def _block_h_classes(block_half: int) -> list[int]:
    """Heads per program: 1 (one head, e.g. MQA's k), 4, or as many as fit _PAIRS_PER_PROGRAM."""
    cap = max(1, _PAIRS_PER_PROGRAM // block_half)
    return sorted({1, min(4, cap), cap})


def launch_config(max_heads: int, half: int) -> LaunchConfig:
    """The one place that maps (most heads of q or k, rotary_dim / 2) to a launch layout: BLOCK_HALF the
    power of two >= half, BLOCK_H the smallest head class >= max_heads (else the largest)."""
    if not 1 <= half <= TRITON_MAX_HALF:
        raise ValueError(f"rotary_dim / 2 must be in [1, {TRITON_MAX_HALF}], got {half}")
    block_half = max(_MIN_BLOCK_HALF, triton.next_power_of_2(half))
    classes = _block_h_classes(block_half)
    block_h = next((c for c in classes if c >= max_heads), classes[-1])
    pairs = block_h * block_half
    num_warps = 4 if pairs >= 512 else (2 if pairs >= 128 else 1)
    return LaunchConfig(block_h, block_half, num_warps)


# ---- launcher --------------------------------------------------------------------------------------


def _check(q, k, cos, sin, positions, what):
    # Memory safety only (the public op checks the argument contract): what the kernel indexes.
    check_device(q, what)
    require(
        q.dim() == 4 and k.dim() == 4 and k.shape[:2] == q.shape[:2] and k.shape[3] == q.shape[3],
        what,
        f"q and k must be 4-D (batch, seqlen, heads, head_dim) alike but for heads, got {tuple(q.shape)} and "
        f"{tuple(k.shape)}",
    )
    require(q.stride(3) == 1 and k.stride(3) == 1, what, "q and k must be contiguous in their last dim")
    require(
        cos.dim() == 2 and sin.shape == cos.shape and sin.stride() == cos.stride(),
        what,
        "cos and sin must be 2-D with one shape and strides",
    )
    require(2 * cos.shape[1] <= q.shape[3], what, f"rotary_dim / 2 = {cos.shape[1]} does not fit head_dim {q.shape[3]}")
    for t in (k, cos, sin) + ((positions,) if positions is not None else ()):
        require(t.device == q.device, what, f"every tensor must be on {q.device}, got one on {t.device}")
    if positions is not None:
        require(
            positions.shape == q.shape[:2] and positions.is_contiguous(),
            what,
            f"positions must be contiguous {tuple(q.shape[:2])}, got {tuple(positions.shape)}",
        )
    else:
        require(q.shape[1] <= cos.shape[0], what, f"cos/sin have {cos.shape[0]} positions but seqlen is {q.shape[1]}")


def _launch(q, k, q_out, k_out, cos, sin, positions, interleaved, conjugate):
    batch, seqlen, n_q, head_dim = q.shape
    n_k, half = k.shape[2], cos.shape[1]
    if batch * seqlen == 0 or n_q + n_k == 0:
        return
    cfg = launch_config(max(n_q, n_k), half)
    copy_pass = q_out.data_ptr() != q.data_ptr() and head_dim > 2 * half
    grid = (batch * seqlen, triton.cdiv(n_q, cfg.block_h) + triton.cdiv(n_k, cfg.block_h))
    with device_guard(q):
        _rope_kernel[grid](
            q,
            k,
            q_out,
            k_out,
            cos,
            sin,
            positions if positions is not None else cos,
            *q.stride()[:3],
            *k.stride()[:3],
            *q_out.stride()[:3],
            *k_out.stride()[:3],
            cos.stride(0),
            cos.stride(1),
            seqlen,
            n_q,
            n_k,
            half,
            head_dim if copy_pass else 2 * half,
            -1.0 if conjugate else 1.0,
            BLOCK_H=cfg.block_h,
            BLOCK_HALF=cfg.block_half,
            HAS_POS=positions is not None,
            INTERLEAVED=interleaved,
            INTERPRET=backends.triton_interpreted(),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )


# ---- custom ops: registration and the public callables ---------------------------------------------


@torch.library.custom_op("plm_engine::triton_rope", mutates_args=())
def rope(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor], interleaved: bool, conjugate: bool
) -> tuple[Tensor, Tensor]:
    """RoPE of q (batch, seqlen, q_heads, head_dim) and k (batch, seqlen, k_heads, head_dim) into new
    contiguous tensors; cos/sin (max_seqlen, rotary_dim / 2); positions int64 (batch, seqlen) or None."""
    _check(q, k, cos, sin, positions, "triton_rope")
    q_out, k_out = (
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
        torch.empty(k.shape, dtype=k.dtype, device=k.device),
    )
    _launch(q, k, q_out, k_out, cos, sin, positions, interleaved, conjugate)
    return q_out, k_out


@torch.library.custom_op("plm_engine::triton_rope_", mutates_args=("q", "k"))
def rope_(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor], interleaved: bool, conjugate: bool
) -> None:
    """RoPE of q and k in place (same arguments as triton_rope)."""
    _check(q, k, cos, sin, positions, "triton_rope_")
    _launch(q, k, q, k, cos, sin, positions, interleaved, conjugate)


contracts.register(contract, "triton_")


# ---- shipped configurations, for report-kernels ----------------------------------------------------


def kernel_specs() -> list[KernelSpec]:
    """Every (BLOCK_HALF, BLOCK_H) launch_config can pick, rotate_half and interleaved, in bf16 and fp32,
    with positions (the heavier flag; without them the kernel only drops one load)."""
    specs = []
    for dt in ("bf16", "fp32"):
        types = {name: "i32" for name in _rope_kernel.arg_names if name.startswith("stride_")}
        types.update(
            {
                "Q_ptr": f"*{dt}",
                "K_ptr": f"*{dt}",
                "QO_ptr": f"*{dt}",
                "KO_ptr": f"*{dt}",
                "Cos_ptr": "*fp32",
                "Sin_ptr": "*fp32",
                "Pos_ptr": "*i64",
                "seqlen": "i32",
                "n_q_heads": "i32",
                "n_k_heads": "i32",
                "half": "i32",
                "pass_end": "i32",
                "sin_sign": "fp32",
            }
        )
        signature = {name: types.get(name, "constexpr") for name in _rope_kernel.arg_names}
        block_half = _MIN_BLOCK_HALF
        while block_half <= triton.next_power_of_2(TRITON_MAX_HALF):
            for heads in _block_h_classes(block_half):
                cfg = launch_config(heads, block_half)
                for interleaved in (False, True):
                    layout = "interleaved" if interleaved else "half"
                    specs.append(
                        KernelSpec(
                            f"rope[BLOCK_H={cfg.block_h},BLOCK_HALF={cfg.block_half},{layout},{dt}]",
                            _rope_kernel,
                            signature,
                            dict(
                                BLOCK_H=cfg.block_h,
                                BLOCK_HALF=cfg.block_half,
                                HAS_POS=True,
                                INTERLEAVED=interleaved,
                                INTERPRET=False,
                            ),
                            cfg.num_warps,
                            cfg.num_stages,
                        )
                    )
            block_half *= 2
    return specs
