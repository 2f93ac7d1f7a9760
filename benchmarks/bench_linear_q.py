"""Weights in GGUF blocks: ops.linear_q against F.linear on the same weight dequantized, in one run.

Providers (same process, same x, timed in interleaved rounds):
  torch    F.linear on the weight dequantized to x's dtype (cuBLAS on a GPU): what running a GGUF costs
           without kernels for its blocks
  triton   ops.linear_q's Triton kernels on the blocks (CUDA; split-K GEMV up to 8 rows, GEMM beyond)
  cpu      ops.linear_q's C++ kernel on the blocks (CPU)
Cases: a Llama-7B-sized layer set (4096 x 4096 attention, 11008 x 4096 MLP up, 4096 x 11008 down) on a
GPU, SmolLM2-135M's on the CPU, x rows M (decode batch 1 and 8, prefill 64 and 512), block types Q8_0 and
Q4_1, x in bf16 (GPU) or fp32 (CPU). gbps counts the bytes a provider's weight takes (the blocks for
ours, the 16/32-bit weight for torch) plus x and y: at decode the kernel that reads fewer bytes wins.

    python benchmarks/bench_linear_q.py --device cuda --out-dir $OUT
    python benchmarks/bench_linear_q.py --quick --no-csv
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass

import common
import torch
import torch.nn.functional as F

from plm_engine import ops
from plm_engine.ops.contracts.linear import GGUF_TYPES
from plm_engine.ops.reference import GGUF_BLOCKS, dequantize_gguf_ref

LAYERS = {  # (name, N, K)
    "cuda": [("qkvo", 4096, 4096), ("up", 11008, 4096), ("down", 4096, 11008)],
    "cpu": [("qkv", 960, 576), ("gate_up", 3072, 576), ("down", 576, 1536)],
}
ROWS = {"cuda": "1,8,64,512", "cpu": "1,8,64"}
COLUMNS = ["op", "layer", "qtype", "dtype", "shape", "m", "provider", "ms", "gbps", "speedup_vs_torch", "check"]


@dataclass(frozen=True)
class Case:
    layer: str
    qtype: str
    dtype: str
    n: int
    k: int
    m: int

    @property
    def labels(self) -> dict:
        shape = f"{self.n}x{self.k}"
        return {
            "op": "linear_q",
            "layer": self.layer,
            "qtype": self.qtype,
            "dtype": self.dtype,
            "shape": shape,
            "m": self.m,
        }


def random_blocks(qt: int, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Valid blocks: random quant bytes; every fp16 field (offsets of each type's scales) a small finite scale."""
    values, nbytes = GGUF_BLOCKS[qt]
    raw = torch.randint(0, 256, (n * (k // values), nbytes), generator=g, dtype=torch.uint8)
    for off in {2: (0,), 3: (0, 2), 8: (0,), 12: (0, 2), 14: (208,)}[qt]:
        scale = (torch.rand(raw.shape[0], generator=g) * 0.04 - 0.02).half()
        raw[:, off : off + 2] = scale.view(torch.uint8).view(-1, 2)
    return raw.view(n, -1)


def setup(c: Case, device: str):
    g = torch.Generator().manual_seed(0)
    qt = GGUF_TYPES[c.qtype]
    dt = common.DTYPES[c.dtype]
    q = random_blocks(qt, c.n, c.k, g).to(device)
    w = dequantize_gguf_ref(q.cpu(), qt).to(device, dt)
    x = torch.randn(c.m, c.k, generator=g).to(device, dt)

    def impl_of(p):
        return (lambda x: F.linear(x, w)) if p == "torch" else (lambda x: ops.linear_q(x, q, qt, backend=p))

    # On the CPU, a few rows take linear_q's int8 path (x quantized per block of 32: |x - x~| <= amax / 254),
    # about 1% of |y|'s largest value here; the exact path and the GPU kernels stay within fp32's 1e-4.
    tol = {**common.TOLERANCE, torch.float32: 2e-2} if device == "cpu" else None
    return common.against_torch(impl_of, (x,), "fwd", tolerance=tol)


def bytes_moved(c: Case, provider: str) -> int:
    """The provider's weight (the blocks for ours, the dequantized weight for torch), x read and y written."""
    values, nbytes = GGUF_BLOCKS[GGUF_TYPES[c.qtype]]
    itemsize = common.DTYPES[c.dtype].itemsize
    weight = c.n * c.k * itemsize if provider == "torch" else c.n * (c.k // values) * nbytes
    return weight + (c.m * c.k + c.m * c.n) * itemsize


def main(argv=None) -> int:
    p = common.parser("linear_q", __doc__, providers=("torch", "triton", "cpu"), dtypes="bf16 on CUDA, fp32 on CPU")
    p.add_argument("--rows", default=None, help="comma list of x rows M (default: 1,8,64,512 on CUDA, 1,8,64 on CPU)")
    p.add_argument("--qtypes", default="Q8_0,Q4_1")
    a = p.parse_args(argv)
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    dtypes = common.split_list(a.dtypes, "bf16" if dev == "cuda" else "fp32", common.DTYPES, "dtype")
    rows = [int(r) for r in (a.rows or ROWS[dev]).split(",")]
    if a.quick:
        rows = rows[:2]
    layers = LAYERS[dev][:1] if a.quick else LAYERS[dev]
    qtypes = common.split_list(a.qtypes, "", GGUF_TYPES, "qtype")
    axes = itertools.product(layers, qtypes, dtypes, rows)
    cases = [Case(name, qt, dt, n, k, m) for (name, n, k), qt, dt, m in axes]
    # A type's blocks must tile K (the K-quants' 256 values do not tile SmolLM2's 576).
    fits = [c for c in cases if c.k % GGUF_BLOCKS[GGUF_TYPES[c.qtype]][0] == 0]
    for c in sorted({(c.qtype, c.layer, c.k) for c in cases} - {(c.qtype, c.layer, c.k) for c in fits}):
        print(f"bench_linear_q: skipped {c[0]} on {c[1]}: K = {c[2]} is not a multiple of its block", file=sys.stderr)
    wanted = common.split_list(a.providers, "", ("torch", "triton", "cpu"), "provider")
    usable = [name for name in wanted if name == "torch" or common.provider_usable(name, a.device, "linear_q_fwd")[0]]
    return common.run(
        "linear_q",
        a,
        fits,
        setup,
        providers=lambda case: usable,
        columns=COLUMNS,
        derive=lambda case, name, ms, times: {"gbps": round(bytes_moved(case, name) / ms[name] / 1e6, 1)},
    )


if __name__ == "__main__":
    sys.exit(main())
