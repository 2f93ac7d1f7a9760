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
    alignments: which of report-kernels' specialisations the launcher can run this configuration
      under: 16 (pointers 16-byte aligned, integer arguments multiples of 16) and/or 1 (nothing known).
      A launcher that picks its configuration by alignment lists each one under the case it serves.
    """

    name: str  # e.g. "norm_fwd[BLOCK_N=4096,bf16]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1
    alignments: tuple[int, ...] = (16, 1)
