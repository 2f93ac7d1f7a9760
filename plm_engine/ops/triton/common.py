"""What the Triton op families share: bf16 rounding that also holds under the interpreter, the launchers'
device check, the SM count behind grid sizes, and report-kernels' signature helper."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from plm_engine.ops.backends import triton_interpreted


@triton.jit
def round_to(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """v -> dtype, rounding to nearest-even.

    The interpreter (TRITON_INTERPRET=1, tests on CPU) truncates fp32 -> bf16, so with INTERPRET a bf16
    store is rounded by hand, which keeps results bit-identical to PyTorch's (finite values; nothing here
    makes a NaN from finite inputs). The compiled kernels use the hardware conversion.
    """
    if INTERPRET and dtype == tl.bfloat16 and v.dtype != tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


def check_device(t: Tensor, what: str) -> None:
    """A launch needs CUDA tensors, or CPU tensors under the interpreter: anything else would hand the
    kernel pointers it cannot dereference."""
    if t.device.type != "cuda" and not (t.device.type == "cpu" and triton_interpreted()):
        raise RuntimeError(
            f"{what}: Triton kernels need CUDA tensors, got {t.device} "
            "(CPU tensors only run with TRITON_INTERPRET=1, for tests)"
        )


def require(ok: bool, what: str, message: str) -> None:
    """A launcher's memory-safety assert: the argument contract itself is checked by the public op."""
    if not ok:
        raise ValueError(f"{what}: {message}")


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


def signature(fn, types: dict[str, str]) -> dict[str, str]:
    """Every argument of a @triton.jit fn in order: pointer/scalar types from `types`, the rest constexpr."""
    return {name: types.get(name, "constexpr") for name in fn.arg_names}
