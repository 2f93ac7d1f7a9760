"""SwiGLU / GELU benchmark: PyTorch eager against our backends, forward and forward+backward.

Providers (same process, same inputs):
  torch    PyTorch eager: F.silu(gate) * up; F.gelu(x) / F.gelu(x, approximate="tanh")
  cpu      plm_engine's C++ CPU kernels (CPU tensors)
  triton   plm_engine's Triton kernels (CUDA tensors)
  cuda     plm_engine's CUDA C++ kernels (CUDA tensors)
Cases: op (swiglu, gelu, gelu_tanh) x mode (fwd, fwd_bwd) x dtype x shape (rows x n). SwiGLU takes its
gate and up as the two halves of one (rows, 2n) projection output, the layout of a fused gate_up
matmul, for every provider.

GB/s counts act_bytes(), each tensor once; the rows go to <out-dir>/activations.csv (benchmarks/common.py).

    python benchmarks/bench_activations.py                     # CPU (or CUDA if present), full set
    python benchmarks/bench_activations.py --quick --no-csv    # smoke test
    python benchmarks/bench_activations.py --device cuda --out-dir $OUT --json
"""

from __future__ import annotations

import itertools
import sys

import common
import torch
import torch.nn.functional as F

from plm_engine.ops.activations import gelu, swiglu

OPS = ("swiglu", "gelu", "gelu_tanh")
SHAPES = {
    # (rows = tokens, n = intermediate size): SmolLM2 (1536), BERT-base-like GELU (3072), Llama-8B (14336).
    ("cpu", False): [(2048, 1536), (1024, 3072), (256, 14336)],
    ("cpu", True): [(64, 1536), (16, 3072)],
    ("cuda", False): [(65536, 1536), (16384, 14336), (32768, 3072)],
    ("cuda", True): [(4096, 1536), (1024, 14336)],
}
DEFAULT_DTYPES = {"cpu": "fp32,bf16,fp16", "cuda": "bf16,fp16,fp32"}
COLUMNS = ["op", "variant", "mode", "dtype", "shape", "provider", "ms", "gbps", "speedup_vs_torch", "check"]
TABLE_COLUMNS = [c for c in COLUMNS if c not in ("variant",)]


class Case(common.Case):
    """op: one of OPS; variant: fused_gate_up (SwiGLU's gate and up are the halves of one tensor) | plain;
    shape: (rows, n)."""

    rows = property(lambda self: self.shape[0])
    n = property(lambda self: self.shape[1])


def act_bytes(c: Case) -> int:
    """Bytes a perfect kernel moves: every (rows, n) tensor read or written once.

    swiglu  fwd reads gate, up, writes y (3); bwd reads dy, gate, up, writes dgate, dup (5).
    gelu    fwd reads x, writes y (2); bwd reads dy, x, writes dx (3).
    """
    t = c.rows * c.n * common.DTYPES[c.dtype].itemsize
    fwd, bwd = (3, 5) if c.op == "swiglu" else (2, 3)
    return t * (fwd + (bwd if c.mode == "fwd_bwd" else 0))


# ---- providers --------------------------------------------------------------------------------------


def act_impl(c: Case, provider: str):
    """f(x): SwiGLU of the two halves of one (rows, 2n) gate_up tensor (taken as views on every call, so
    each backward has a fresh graph), or GELU of x; PyTorch eager or ours."""
    approximate = "tanh" if c.op == "gelu_tanh" else "none"
    if provider == "torch":
        if c.op == "swiglu":
            return lambda gate_up: F.silu(gate_up.chunk(2, -1)[0]) * gate_up.chunk(2, -1)[1]
        return lambda x: F.gelu(x, approximate=approximate)
    if c.op == "swiglu":
        return lambda gate_up: swiglu(*gate_up.chunk(2, -1), backend=provider)
    return lambda x: gelu(x, approximate, backend=provider)


def setup(c: Case, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = common.DTYPES[c.dtype]
    width = 2 * c.n if c.op == "swiglu" else c.n
    x = (torch.randn(c.rows, width, generator=g) * 2).to(device, dt).requires_grad_(c.mode == "fwd_bwd")
    dy = torch.randn(c.rows, c.n, generator=g).to(device, dt)
    return common.against_torch(lambda p: act_impl(c, p), (x,), c.mode, grads=dy)


# ---- main ----------------------------------------------------------------------------------------------


def cases(a) -> list[Case]:
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    shapes = common.parse_shapes(a.shapes) if a.shapes else SHAPES[(dev, a.quick)]
    dtypes = common.split_list(a.dtypes, DEFAULT_DTYPES[dev], common.DTYPES, "dtype")
    ops = common.split_list(a.ops, "", OPS, "op")
    axes = itertools.product(shapes, dtypes, ops, a.modes.split(","))
    return [Case(op, "fused_gate_up" if op == "swiglu" else "plain", mode, dt, s) for s, dt, op, mode in axes]


def main(argv=None) -> int:
    dtypes = "fp32,bf16,fp16 on CPU, bf16,fp16,fp32 on CUDA"
    p = common.parser("activations", __doc__, dtypes=dtypes, modes="fwd,fwd_bwd", shapes="ROWSxN, e.g. 2048x1536")
    p.add_argument("--ops", default=",".join(OPS))
    a = p.parse_args(argv)
    kw = dict(op="swiglu_fwd", columns=COLUMNS, table=TABLE_COLUMNS, bytes_moved=act_bytes)
    return common.run("activations", a, cases(a), setup, **kw)


if __name__ == "__main__":
    sys.exit(main())
