"""y = x @ weight.T + bias, with a C++ kernel for the few-row (decode) case on the CPU.

At decode, x has 1..32 rows and a linear layer's time is the time to read its weight. The C++ kernel
(csrc/cpu/linear.cpp) reads the weight once per call for all rows, with one portable source compiled for
AVX2, AVX-512 and generic/NEON (plus VDPBF16PS for bf16 where the CPU has AVX512_BF16); its speed
against F.linear per instruction set is in benchmarks/results/linear.csv (benchmarks/bench_linear.py).

  linear_fwd(x, weight, bias) -> y    x (M, K), weight (N, K), bias (N,) or None -> y (M, N), fp32 math,
                                      the C++ op torch.ops.plm_engine.linear_fwd (CPU only)

Backends: "cpu" is the C++ kernel; "torch" is F.linear itself (PyTorch's own kernels, in the inputs'
dtype). There is no Triton or CUDA kernel: on GPUs cuBLAS (F.linear) is already at the roofline, so
CUDA tensors always take F.linear. The automatic choice on the CPU uses the kernel only where it was
measured to beat F.linear (KERNEL_MAX_ROWS, benchmarks/bench_linear.py); an explicit backend="cpu"
runs it for any shape.
"""

from __future__ import annotations

import importlib
import sys

import torch
import torch.nn.functional as F

from plm_engine.ops import backends, extension
from plm_engine.ops.contracts import linear as contract
from plm_engine.ops.reference import GGUF_BLOCKS, dequantize_gguf_ref

# Per ISA of the C++ kernel (cpu_kernel_isa()) and dtype: the largest row count M (x's leading dims
# multiplied) for which the automatic choice takes the kernel; F.linear beyond. The limit is where one
# decode step's linear layers (SmolLM2-135M's) stop taking clearly less time with the kernel than with
# F.linear (past 64 rows: where single layers stop), in benchmarks/bench_linear.py; how it was measured,
# and on what CPU, is in benchmarks/results/NOTES.md. "avx512" and "avx512_bf16" run the same fp32 and
# fp16 code; their bf16 differs (W widened + FMA, or VDPBF16PS). The generic build is never chosen
# automatically.
KERNEL_MAX_ROWS = {
    "avx2": {torch.float32: 32, torch.bfloat16: 256, torch.float16: 256},
    "avx512": {torch.float32: 16, torch.bfloat16: 4, torch.float16: 8},
    "avx512_bf16": {torch.float32: 16, torch.bfloat16: 8, torch.float16: 8},
}


backends.register_family(contract, ("linear_fwd", "linear_q_fwd"))
# Only the quantized op has Triton kernels (cuBLAS serves plain weights on GPUs).
backends.register_preparer("linear_q_fwd", ("triton",), lambda: importlib.import_module("plm_engine.ops.triton.linear"))


def linear_op():
    """torch.ops.plm_engine.linear_fwd.default, with its fake impl and autograd registered."""
    backends.prepare("linear_fwd", "cpu")
    return torch.ops.plm_engine.linear_fwd.default


def cpu_kernel_isa() -> str:
    """ "avx512_bf16" | "avx512" | "avx2" | "generic" ("neon" on aarch64): the build the C++ kernel runs
    with now ("" without _C). Not cached: it follows extension.set_cpu_isa() (a cheap call into _C).
    The kernel reads the same cpu::cpu_isa() at every call (torch.ops.plm_engine.linear_cpu_isa())."""
    if not extension.has_kernel("linear_fwd", "CPU"):
        return ""
    return extension.cpu_isa()


@backends._traced_as_constant  # torch.compile: evaluated at trace time (it imports _C, untraceable)
def kernel_max_rows(dtype: torch.dtype) -> int:
    """The automatic choice's row limit for the C++ kernel here (0: never chosen automatically)."""
    return KERNEL_MAX_ROWS.get(cpu_kernel_isa(), {}).get(dtype, 0)


# ---- public function ------------------------------------------------------------------------------


def _check_args(x, weight, bias):
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"linear: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"linear: {name} must be a floating-point tensor, got {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(
            f"linear: weight must have 2 dims (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x shape {tuple(x.shape)} does not end in weight's in_features {weight.shape[1]}")
    if weight.dtype != x.dtype:
        raise ValueError(f"linear: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"linear: weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"linear: bias must be a tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"linear: bias shape {tuple(bias.shape)} is not (out_features,) = ({weight.shape[0]},)")
        if bias.dtype != x.dtype:
            raise ValueError(f"linear: bias dtype {bias.dtype} differs from x dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"linear: bias is on {bias.device} but x is on {x.device}")


_NO_GPU_KERNEL = "linear has no Triton/CUDA kernel: CUDA tensors use F.linear (cuBLAS), the torch backend"


def _unsupported(x: torch.Tensor, weight: torch.Tensor, rows: int, automatic: bool) -> dict[str, str]:
    out = {"triton": _NO_GPU_KERNEL, "cuda": _NO_GPU_KERNEL}
    if x.dtype not in contract.KERNEL_DTYPES:
        out["cpu"] = f"the C++ linear kernel takes float32/float16/bfloat16, got {x.dtype}"
    elif automatic:
        # Where F.linear is as fast or faster (many rows: its blocked GEMM; a generic build; a strided
        # weight, which the kernel would have to copy), the automatic choice keeps to it.
        limit = kernel_max_rows(x.dtype)
        if limit == 0:
            out["cpu"] = "the C++ kernel has no fast build for this CPU or dtype here"
        elif rows > limit:
            out["cpu"] = f"{rows} rows > {limit}: F.linear is faster"
        elif not weight.is_contiguous():
            out["cpu"] = "a non-contiguous weight would be copied on every call"
    return out


# ---- eager no-grad fast path ---------------------------------------------------------------------
# At decode a small layer's kernel takes a few microseconds, so the generic path's Python (autocast and
# argument checks, backends.choose, the autograd wrapper of the op) would cost several times the kernel.
# Eager CPU calls that backends.eager_cpu_kernel lets through (no autograd, no other backend asked for;
# backend="cpu" runs the kernel at any row count) and that pass every check below call the same kernel
# directly; anything else takes the general path, so the results and errors are the same either way.
def _fast_linear(x, weight, bias, backend: str | None):
    """The kernel's output, or None where the general path must decide (or raise)."""
    if (
        weight.dtype is not x.dtype
        or weight.dim() != 2
        or x.dim() == 0
        or x.shape[-1] != weight.shape[1]
        or not weight.is_contiguous()
        or (bias is not None and (bias.dtype is not x.dtype or bias.shape != (weight.shape[0],)))
    ):
        return None
    kernel = backends.eager_cpu_kernel("linear_fwd", backend, x, weight, bias)
    if kernel is None:
        return None
    if backend == "cpu":
        limit = sys.maxsize if x.dtype in contract.KERNEL_DTYPES else 0
    else:
        limit = KERNEL_MAX_ROWS.get(extension.cpu_isa(), {}).get(x.dtype, 0)
    if x.dim() == 2:
        if x.shape[0] > limit or x.shape[0] == 0:
            return None
        return kernel(x, weight, bias)
    lead = x.shape[:-1]
    rows = lead.numel()
    if rows > limit or rows == 0:
        return None
    return kernel(x.reshape(rows, x.shape[-1]), weight, bias).view(*lead, weight.shape[0])


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """y = x @ weight.T + bias: x (..., K), weight (N, K) (nn.Linear's layout), bias (N,) or None ->
    y (..., N) in x's dtype; x, weight and bias share one dtype and device.

    On CPU tensors with few rows (x's leading dims multiplied, up to kernel_max_rows(dtype)) the C++ kernel
    reads the weight once per call, accumulating in fp32; otherwise F.linear runs. CUDA tensors always
    use F.linear (cuBLAS); there is no Triton/CUDA kernel. Differentiable (backward by plain matmuls).
    backend: "cpu" | "torch" | None (automatic; see plm_engine.ops.backends).
    Under torch.autocast the inputs are cast to the autocast dtype first, as F.linear would be.
    """
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):
        if bias is None or isinstance(bias, torch.Tensor):
            y = _fast_linear(x, weight, bias, backend)
            if y is not None:
                return y
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    _check_args(x, weight, bias)
    lead = x.shape[:-1]
    rows = lead.numel()
    automatic = backends.requested(backend) is None
    chosen = backends.choose(x.device, "linear_fwd", backend, _unsupported(x, weight, rows, automatic))
    if chosen == "torch":
        return F.linear(x, weight, bias)
    y = linear_op()(x.reshape(rows, x.shape[-1]), weight, bias)
    return y.view(*lead, weight.shape[0])


# ---- quantized weights ----------------------------------------------------------------------------


def _qtype_id(qtype: int | str) -> int:
    if isinstance(qtype, str):
        if qtype.upper() not in contract.GGUF_TYPES:
            raise ValueError(f"linear_q: unsupported GGUF type {qtype!r}; one of {', '.join(contract.GGUF_TYPES)}")
        return contract.GGUF_TYPES[qtype.upper()]
    if isinstance(qtype, bool) or not isinstance(qtype, int) or qtype not in GGUF_BLOCKS:
        ids = ", ".join(f"{n} = {i}" for n, i in contract.GGUF_TYPES.items())
        raise ValueError(f"linear_q: unsupported GGUF type id {qtype!r} ({ids})")
    return qtype


def _check_q_args(x, qweight, qtype: int, bias) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("linear_q: x must be a floating-point tensor")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError("linear_q: qweight must be a 2-dim uint8 tensor (out_features, row_bytes) of GGUF blocks")
    values, nbytes = GGUF_BLOCKS[qtype]
    k = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or k % values:
        raise ValueError(f"linear_q: x's last dim ({k}) must be a multiple of the type's block of {values} values")
    if qweight.shape[1] != k // values * nbytes:
        raise ValueError(
            f"linear_q: qweight rows hold {qweight.shape[1]} bytes, but {k} values of this type take "
            f"{k // values * nbytes}"
        )
    if qweight.device != x.device:
        raise ValueError(f"linear_q: qweight is on {qweight.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (qweight.shape[0],):
            raise ValueError(f"linear_q: bias must be a tensor of shape ({qweight.shape[0]},)")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"linear_q: bias ({bias.dtype}, {bias.device}) differs from x ({x.dtype}, {x.device})")


# The block types with Triton kernels (ops/triton/linear.py's TRITON_TYPES; that module imports triton).
_TRITON_Q_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")


def linear_q(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qtype: int | str,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x @ W.T + bias for a weight W kept in GGUF blocks: qweight (N, row_bytes) uint8, each row K
    values in ggml's blocks of `qtype` ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K" or the ggml type id);
    x (..., K) fp32/fp16/bf16 -> y (..., N) in x's dtype.

    The C++ CPU kernel reads only the quantized bytes. For many rows (prefill) it decodes each block of
    16 weight rows into fp32 as it goes and runs linear's fp32 tiles on it: y equals linear(x, W) on the
    dequantized W, bit for bit. For a few rows of Q8_0 / Q4_0 / Q4_1 (decode) it quantizes x per block of
    32 to int8, as llama.cpp does, and takes integer dot products (VPDPBUSD with AVX512-VNNI or AVX-VNNI,
    VPMADDUBSW without); PLM_ENGINE_LINEAR_Q=exact|int8 forces one path. On CUDA tensors the Triton kernels
    (ops/triton/linear.py: a split-K GEMV for up to 8 rows, a GEMM that dequantizes inside its K loop)
    take every type. The "torch" backend dequantizes the whole weight
    (ops.reference.dequantize_gguf_ref) and calls F.linear; it is also the path when x needs a
    gradient (the weight never gets one).
    backend: "cpu" | "triton" | "torch" | None (automatic).
    """
    qt = _qtype_id(qtype)
    _check_q_args(x, qweight, qt, bias)
    lead = x.shape[:-1]
    rows = lead.numel()
    unsupported = {"cuda": "no CUDA C++ kernel: the Triton kernels serve CUDA tensors"}
    if qt not in (contract.GGUF_TYPES[n] for n in _TRITON_Q_TYPES):
        unsupported["triton"] = f"no Triton kernel for GGUF type id {qt}"
    if x.dtype not in contract.KERNEL_DTYPES:
        unsupported["cpu"] = unsupported["triton"] = f"the kernels take float32/float16/bfloat16, got {x.dtype}"
    elif torch.is_grad_enabled() and x.requires_grad:
        unsupported["cpu"] = unsupported["triton"] = "x needs a gradient: the kernels have no backward"
    chosen = backends.choose(x.device, "linear_q_fwd", backend, unsupported)
    if chosen == "torch":
        return F.linear(x, dequantize_gguf_ref(qweight, qt).to(x.dtype), bias)
    x2 = x.reshape(rows, x.shape[-1])
    if chosen == "triton":
        y = torch.ops.plm_engine.triton_linear_q_fwd.default(
            x2 if x2.stride(-1) == 1 else x2.contiguous(), qweight, qt, bias
        )
    else:
        y = torch.ops.plm_engine.linear_q_fwd.default(x2, qweight, qt, bias)
    return y.view(*lead, qweight.shape[0])
