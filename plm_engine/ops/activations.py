"""Fused SwiGLU and GELU, forward and backward, on every backend.

Every fused backend implements the same ops on 2-D (rows, n) tensors with a unit last stride and any
row stride (so the gate and up halves of one fused projection are passed as views, without a copy):
  swiglu_fwd(gate, up) -> y                     y = silu(gate) * up
  swiglu_bwd(dy, gate, up) -> (dgate, dup)
  gelu_fwd(x, approximate) -> y                 approximate: "none" (exact, erf) or "tanh"
  gelu_bwd(dy, x, approximate) -> dx
all in fp32 math, outputs contiguous in the input dtype (plm_engine/ops/contracts/activations.py). The
C++ kernels register them as torch.ops.plm_engine.<op> (CPU and CUDA keys), the Triton kernels as
plm_engine::triton_<op>. This module validates the arguments (once, for every backend) and picks the
backend.
"""

from __future__ import annotations

import torch

from plm_engine.ops import backends
from plm_engine.ops.contracts import activations as contract
from plm_engine.ops.reference import gelu_ref, swiglu_ref

_OP_NAMES = ("swiglu_fwd", "swiglu_bwd", "gelu_fwd", "gelu_bwd")
backends.register_family(contract, ("swiglu_fwd", "gelu_fwd"), "plm_engine.ops.triton.activations")


def fused_ops(backend: str):
    """(swiglu_fwd, swiglu_bwd, gelu_fwd, gelu_bwd) of a fused backend: 'triton', or 'cpu'/'cuda'."""
    return backends.family_ops("swiglu_fwd", backend, _OP_NAMES)


# ---- public functions -----------------------------------------------------------------------------


def _check_tensor(name, t, like=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if like is None:
        return
    for what, mine, other in (("shape", tuple(t.shape), tuple(like.shape)), ("dtype", t.dtype, like.dtype)):
        if mine != other:
            raise ValueError(f"{name} {what} {mine} differs from {other}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the other input is on {like.device}")


def _unsupported(x: torch.Tensor) -> dict[str, str]:
    if x.dtype in contract.KERNEL_DTYPES:
        return {}
    return dict.fromkeys(("triton", "cuda", "cpu"), f"the fused kernels take float32/float16/bfloat16, got {x.dtype}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, n) view with a unit last stride when the layout allows, else a copy."""
    return contract.row_major(t.reshape(-1, t.shape[-1] if t.dim() else 1))


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, elementwise: gate, up (..., n) of one shape and dtype -> (..., n).

    The fused gate_up layout is welcome: `gate, up = gate_up.chunk(2, dim=-1)` are passed as views.
    backend: "triton" | "cuda" | "cpu" | "torch" | None (automatic; see plm_engine.ops.backends).
    """
    _check_tensor("swiglu: gate", gate)
    _check_tensor("swiglu: up", up, like=gate)
    fwd = None
    if gate.dtype in contract.KERNEL_DTYPES:
        fwd = backends.eager_cpu_kernel("swiglu_fwd", backend, gate, up)  # the eager short path
    if fwd is None:
        chosen = backends.choose(gate.device, "swiglu_fwd", backend, _unsupported(gate))
        if chosen == "torch":
            return swiglu_ref(gate, up)
        fwd = fused_ops(chosen)[0]
    return fwd(_rows(gate), _rows(up)).view(gate.shape)


def gelu(x: torch.Tensor, approximate: str = "none", *, backend: str | None = None) -> torch.Tensor:
    """GELU(x) = x * Phi(x) elementwise, (...) -> (...): exact erf form ("none") or tanh form ("tanh"),
    as torch.nn.functional.gelu."""
    _check_tensor("gelu: x", x)
    if approximate not in contract.GELU_APPROXIMATIONS:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    fwd = None
    if x.dtype in contract.KERNEL_DTYPES:
        fwd = backends.eager_cpu_kernel("gelu_fwd", backend, x)  # the eager short path
    if fwd is None:
        chosen = backends.choose(x.device, "gelu_fwd", backend, _unsupported(x))
        if chosen == "torch":
            return gelu_ref(x, approximate)
        fwd = fused_ops(chosen)[2]
    return fwd(_rows(x), approximate).view(x.shape)
