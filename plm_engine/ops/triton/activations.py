"""Triton SwiGLU and GELU, forward and backward.

The contract is plm_engine/ops/contracts/activations.py's, shared by every backend:
2-D (rows, n) inputs with a unit last stride and any row stride, contiguous (rows, n) outputs, fp32
math. Programs tile (BLOCK_M rows) x (BLOCK_N columns); short rows get several per program so that a
program always moves a few thousand elements.

GELU's exact form uses tl.math.erf (a Triton builtin, also available to the interpreter, unlike
libdevice). The tanh form uses 0.5 (1 + tanh(u)) = sigmoid(2u), which needs no tanh function (there is
none in tl.math across triton 3.6-3.9) and does not cancel for large negative x.
"""

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from plm_engine.ops import backends, contracts
from plm_engine.ops.contracts import activations as contract
from plm_engine.ops.triton.common import check_device, require, round_to, signature
from plm_engine.ops.triton.guard import device_guard
from plm_engine.ops.triton.spec import KernelSpec

# ---- jit kernels -----------------------------------------------------------------------------------

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TANH_K0 = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_TANH_K1 = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(z):
    # exp(-|z|) never overflows (tl.sigmoid's exp(-z) does, harmlessly on a GPU but with warnings in
    # the interpreter, where tl.sigmoid also fails when called from a nested jit function).
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _tile(pid_m, pid_n, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices (int64), column indices and mask of program (pid_m, pid_n)'s tile."""
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return rows[:, None], cols[None, :], mask


@triton.jit
def _swiglu_fwd_kernel(
    G_ptr,
    U_ptr,
    Y_ptr,
    stride_g_row,
    stride_u_row,
    n_rows,
    n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    g = tl.load(G_ptr + rows * stride_g_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + rows * stride_u_row + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * _sigmoid(g) * u
    tl.store(Y_ptr + rows * n_cols + cols, round_to(y, Y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY_ptr,
    G_ptr,
    U_ptr,
    DG_ptr,
    DU_ptr,
    stride_dy_row,
    stride_g_row,
    stride_u_row,
    n_rows,
    n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    dy = tl.load(DY_ptr + rows * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G_ptr + rows * stride_g_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + rows * stride_u_row + cols, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    # d silu(g) / dg = sig (1 + g (1 - sig))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * g * sig
    dtype = DG_ptr.dtype.element_ty
    tl.store(DG_ptr + rows * n_cols + cols, round_to(dg, dtype, INTERPRET), mask=mask)
    tl.store(DU_ptr + rows * n_cols + cols, round_to(du, dtype, INTERPRET), mask=mask)


@triton.jit
def _gelu_cdf(x, TANH: tl.constexpr):
    """Phi(x) (exact, erf) or its tanh approximation sigmoid(2 k0 (x + k1 x^3))."""
    if TANH:
        # Tensors on the left: constexpr * tensor misbehaves under the interpreter.
        return _sigmoid((x + x * x * x * _TANH_K1) * (2.0 * _TANH_K0))
    else:
        return 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))


@triton.jit
def _gelu_fwd_kernel(
    X_ptr,
    Y_ptr,
    stride_x_row,
    n_rows,
    n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TANH: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    x = tl.load(X_ptr + rows * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * _gelu_cdf(x, TANH)
    tl.store(Y_ptr + rows * n_cols + cols, round_to(y, Y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _gelu_bwd_kernel(
    DY_ptr,
    X_ptr,
    DX_ptr,
    stride_dy_row,
    stride_x_row,
    n_rows,
    n_cols,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TANH: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    dy = tl.load(DY_ptr + rows * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X_ptr + rows * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    s = _gelu_cdf(x, TANH)
    if TANH:
        # d/dx [x s(2u)] = s + x s (1 - s) 2 u',  u = k0 (x + k1 x^3)
        grad = s + x * s * (1.0 - s) * (2.0 * _TANH_K0) * (x * x * (3.0 * _TANH_K1) + 1.0)
    else:
        grad = s + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    tl.store(DX_ptr + rows * n_cols + cols, round_to(dy * grad, DX_ptr.dtype.element_ty, INTERPRET), mask=mask)


# ---- launch configuration (shared by the launchers and kernel_specs) -------------------------------

# Elements per program: 16 per thread at 4 warps (two 16-byte loads per input for 16-bit types), enough
# to amortise the per-program overhead.
_TILE = 2048
# Row-length classes: short rows share a program (BLOCK_M = _TILE // BLOCK_N of them), long rows are cut
# into _TILE-wide column blocks. Three classes keep the shipped set small; a row is padded to at most 4x
# its length, which costs masked lanes, not memory traffic.
_BLOCK_N_CLASSES = (128, 512, _TILE)


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 1


def launch_config(n_cols: int) -> LaunchConfig:
    """The one place that maps the row length to a tile (BLOCK_M rows x BLOCK_N columns)."""
    if n_cols < 1:
        raise ValueError(f"n_cols must be >= 1, got {n_cols}")
    block_n = next(b for b in _BLOCK_N_CLASSES if n_cols <= b or b == _TILE)
    return LaunchConfig(_TILE // block_n, block_n, num_warps=4)


# ---- launcher and custom ops ------------------------------------------------------------------------


def _launch(what: str, elementwise_kernel, inputs: tuple[Tensor, ...], n_out: int, **flags) -> list[Tensor]:
    """Runs an elementwise kernel over `inputs` (rows, n), unit last stride, any row stride -> n_out new
    contiguous (rows, n) outputs. Kernel arguments: input pointers, output pointers, input row strides,
    n_rows, n_cols, then the tile and `flags`."""
    first = inputs[0]
    check_device(first, what)
    for t in inputs:  # memory safety only: the public op checks the argument contract
        require(
            t.dim() == 2
            and t.shape == first.shape
            and (t.shape[1] <= 1 or t.stride(1) == 1)
            and t.device == first.device,
            what,
            f"inputs must be 2-D (rows, n) of one shape and device with a unit last stride, got shape "
            f"{tuple(t.shape)} strides {t.stride()} on {t.device}",
        )
    rows, n = first.shape
    outs = [torch.empty((rows, n), dtype=first.dtype, device=first.device) for _ in range(n_out)]
    if first.numel():
        cfg = launch_config(n)
        grid = (triton.cdiv(rows, cfg.block_m), triton.cdiv(n, cfg.block_n))
        with device_guard(first):
            elementwise_kernel[grid](
                *inputs,
                *outs,
                *(t.stride(0) for t in inputs),
                rows,
                n,
                BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n,
                INTERPRET=backends.triton_interpreted(),
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                **flags,
            )
    return outs


@torch.library.custom_op("plm_engine::triton_swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for gate, up (rows, n) (unit last stride) -> contiguous (rows, n)."""
    return _launch("triton_swiglu_fwd", _swiglu_fwd_kernel, (gate, up), 1)[0]


@torch.library.custom_op("plm_engine::triton_swiglu_bwd", mutates_args=())
def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(dgate, dup) of swiglu_fwd for dy, gate, up (rows, n)."""
    dg, du = _launch("triton_swiglu_bwd", _swiglu_bwd_kernel, (dy, gate, up), 2)
    return dg, du


@torch.library.custom_op("plm_engine::triton_gelu_fwd", mutates_args=())
def gelu_fwd(x: Tensor, approximate: str) -> Tensor:
    """GELU of x (rows, n) (unit last stride) -> contiguous (rows, n); approximate "none" | "tanh"."""
    return _launch("triton_gelu_fwd", _gelu_fwd_kernel, (x,), 1, TANH=approximate == "tanh")[0]


@torch.library.custom_op("plm_engine::triton_gelu_bwd", mutates_args=())
def gelu_bwd(dy: Tensor, x: Tensor, approximate: str) -> Tensor:
    """dx of gelu_fwd for dy, x (rows, n)."""
    return _launch("triton_gelu_bwd", _gelu_bwd_kernel, (dy, x), 1, TANH=approximate == "tanh")[0]


contracts.register(contract, "triton_")


# ---- shipped configurations, for report-kernels ----------------------------------------------------


def kernel_specs() -> list[KernelSpec]:
    """Every tile launch_config picks (one per row-length class), each kernel and flag, in bf16 and fp32."""
    specs = []
    for dt in ("bf16", "fp32"):
        types = {
            "G_ptr": f"*{dt}",
            "U_ptr": f"*{dt}",
            "Y_ptr": f"*{dt}",
            "DY_ptr": f"*{dt}",
            "X_ptr": f"*{dt}",
            "DG_ptr": f"*{dt}",
            "DU_ptr": f"*{dt}",
            "DX_ptr": f"*{dt}",
            "stride_g_row": "i32",
            "stride_u_row": "i32",
            "stride_dy_row": "i32",
            "stride_x_row": "i32",
            "n_rows": "i32",
            "n_cols": "i32",
        }
        for block_n in _BLOCK_N_CLASSES:
            cfg = launch_config(block_n)
            tile = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, INTERPRET=False)
            variants: list[tuple[str, Any, dict[str, bool]]] = [  # Any: a triton.jit kernel
                ("swiglu_fwd", _swiglu_fwd_kernel, {}),
                ("swiglu_bwd", _swiglu_bwd_kernel, {}),
            ]
            for tanh in (False, True):
                form = "tanh" if tanh else "erf"
                variants += [
                    (f"gelu_{form}_fwd", _gelu_fwd_kernel, {"TANH": tanh}),
                    (f"gelu_{form}_bwd", _gelu_bwd_kernel, {"TANH": tanh}),
                ]
            for name, fn, flags in variants:
                specs.append(
                    KernelSpec(
                        f"{name}[BLOCK_M={cfg.block_m},BLOCK_N={cfg.block_n},{dt}]",
                        fn,
                        signature(fn, types),
                        dict(tile, **flags),
                        cfg.num_warps,
                        cfg.num_stages,
                    )
                )
    return specs
