"""Fused SwiGLU and GELU, forward and backward, on every backend.

Every fused backend implements the same ops on 2-D (rows, n) tensors with a unit last stride and any
row stride (so the gate and up halves of one fused projection are passed as views, without a copy):
  swiglu_fwd(gate, up) -> y                     y = silu(gate) * up
  swiglu_bwd(dy, gate, up) -> (dgate, dup)
  gelu_fwd(x, approximate) -> y                 approximate: "none" (exact, erf) or "tanh"
  gelu_bwd(dy, x, approximate) -> dx
all in fp32 math, outputs contiguous in the input dtype (csrc/activations.h). The C++ kernels register
them as torch.ops.plm_engine.<op> (CPU and CUDA keys), the Triton kernels as plm_engine::triton_<op>.
This module gives both the same fake impls and autograd, validates arguments, and picks the backend.
"""

from __future__ import annotations

import torch

from plm_engine.ops import backends, extension
from plm_engine.ops.reference import gelu_ref, swiglu_ref

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GELU_APPROXIMATIONS = ("none", "tanh")


# ---- registration helpers shared by the C++ and Triton op sets -------------------------------------


def swiglu_fwd_fake(gate, up):
    return gate.new_empty(gate.shape)


def swiglu_bwd_fake(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def gelu_fwd_fake(x, approximate):
    return x.new_empty(x.shape)


def gelu_bwd_fake(dy, x, approximate):
    return x.new_empty(x.shape)


def register_autograd(swiglu_fwd, swiglu_bwd, gelu_fwd, gelu_bwd) -> None:
    """Wires each backward op as the gradient of its forward op (schemas as in the module docstring)."""

    def swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def swiglu_backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(_row_major(dy), gate, up)

    def gelu_setup(ctx, inputs, output):
        x, approximate = inputs
        ctx.save_for_backward(x)
        ctx.approximate = approximate

    def gelu_backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return gelu_bwd(_row_major(dy), x, ctx.approximate), None

    torch.library.register_autograd(swiglu_fwd, swiglu_backward, setup_context=swiglu_setup)
    torch.library.register_autograd(gelu_fwd, gelu_backward, setup_context=gelu_setup)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """t (rows, n) with a unit last stride (any row stride), copying only if needed."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


_OP_NAMES = ("swiglu_fwd", "swiglu_bwd", "gelu_fwd", "gelu_bwd")


def _register_cpp_ops() -> None:
    """Fake impls and autograd for torch.ops.plm_engine.{swiglu,gelu}_{fwd,bwd} (defined by _C)."""
    extension.load()
    for name, fake in zip(_OP_NAMES, (swiglu_fwd_fake, swiglu_bwd_fake, gelu_fwd_fake, gelu_bwd_fake), strict=True):
        torch.library.register_fake(f"plm_engine::{name}")(fake)
    ops = tuple(getattr(torch.ops.plm_engine, name).default for name in _OP_NAMES)
    register_autograd("plm_engine::swiglu_fwd", ops[1], "plm_engine::gelu_fwd", ops[3])


backends.register_family(("swiglu_fwd", "gelu_fwd"), _register_cpp_ops, "plm_engine.ops.triton.activations")


def fused_ops(backend: str):
    """(swiglu_fwd, swiglu_bwd, gelu_fwd, gelu_bwd) of a fused backend: 'triton', or 'cpu'/'cuda'."""
    return backends.family_ops("swiglu_fwd", backend, _OP_NAMES)


# ---- public functions -----------------------------------------------------------------------------


def _check_tensor(name, t, like=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} differs from {tuple(like.shape)}")
        if t.dtype != like.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from {like.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the other input is on {like.device}")


def _unsupported(x: torch.Tensor) -> dict[str, str]:
    if x.dtype in KERNEL_DTYPES:
        return {}
    return dict.fromkeys(("triton", "cuda", "cpu"), f"the fused kernels take float32/float16/bfloat16, got {x.dtype}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, n) view with a unit last stride when the layout allows, else a copy."""
    return _row_major(t.reshape(-1, t.shape[-1] if t.dim() else 1))


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, elementwise: gate, up (..., n) of one shape and dtype -> (..., n).

    The fused gate_up layout is welcome: `gate, up = gate_up.chunk(2, dim=-1)` are passed as views.
    backend: "triton" | "cuda" | "cpu" | "torch" | None (automatic; see plm_engine.ops.backends).
    """
    _check_tensor("swiglu: gate", gate)
    _check_tensor("swiglu: up", up, like=gate)
    chosen = backends.choose(gate.device, "swiglu_fwd", backend, _unsupported(gate))
    if chosen == "torch":
        return swiglu_ref(gate, up)
    fwd = fused_ops(chosen)[0]
    return fwd(_rows(gate), _rows(up)).view(gate.shape)


def gelu(x: torch.Tensor, approximate: str = "none", *, backend: str | None = None) -> torch.Tensor:
    """GELU(x) = x * Phi(x) elementwise, (...) -> (...): exact erf form ("none") or tanh form ("tanh"),
    as torch.nn.functional.gelu."""
    _check_tensor("gelu: x", x)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    chosen = backends.choose(x.device, "gelu_fwd", backend, _unsupported(x))
    if chosen == "torch":
        return gelu_ref(x, approximate)
    fwd = fused_ops(chosen)[2]
    return fwd(_rows(x), approximate).view(x.shape)
