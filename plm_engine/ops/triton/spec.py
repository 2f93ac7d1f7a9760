"""What report-kernels needs to compile a shipped Triton configuration ahead of time, with no GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KernelSpec:
    """One shipped (kernel, configuration) pair.

    signature: every non-constexpr argument's Triton type, e.g. {"X_ptr": "*bf16", "n_cols": "i32",
      "eps": "fp32"}, in the kernel's argument order, with the constexpr arguments as "constexpr".
    constexprs: the values of the constexpr arguments.
    """

    name: str  # e.g. "norm_fwd[BLOCK_N=4096,bf16]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1
