"""SwiGLU / GELU benchmark: PyTorch eager against our backends, forward and forward+backward.

Providers (same process, same inputs):
  torch    PyTorch eager: F.silu(gate) * up; F.gelu(x) / F.gelu(x, approximate="tanh")
  cpu      plm_engine's C++ CPU kernels (CPU tensors)
  triton   plm_engine's Triton kernels (CUDA tensors)
  cuda     plm_engine's CUDA C++ kernels (CUDA tensors)
Cases: op (swiglu, gelu, gelu_tanh) x mode (fwd, fwd_bwd) x dtype x shape (rows x n). SwiGLU takes its
gate and up as the two halves of one (rows, 2n) projection output, the layout of a fused gate_up
matmul, for every provider.

Reported per case and provider: median ms, GB/s by act_bytes() (every tensor read or written once),
and the speedup over the torch provider measured in the same run. Rows are appended to
<out-dir>/activations.csv (default benchmarks/results/activations.csv).

    python benchmarks/bench_activations.py                     # CPU (or CUDA if present), full set
    python benchmarks/bench_activations.py --quick --no-csv    # smoke test
    python benchmarks/bench_activations.py --device cuda --out-dir $OUT --json
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import common
import torch
import torch.nn.functional as F

from plm_engine.ops.activations import gelu, swiglu

DTYPES = common.DTYPES
PROVIDERS = ("torch", "cpu", "triton", "cuda")
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
TABLE_COLUMNS = ["op", "mode", "dtype", "shape", "provider", "ms", "gbps", "speedup_vs_torch", "check"]


@dataclass(frozen=True)
class Case:
    op: str  # one of OPS
    mode: str  # "fwd" | "fwd_bwd"
    dtype: str  # key of DTYPES
    rows: int
    n: int

    @property
    def labels(self) -> dict:
        return {
            "op": self.op,
            "variant": "fused_gate_up" if self.op == "swiglu" else "plain",
            "mode": self.mode,
            "dtype": self.dtype,
            "shape": f"{self.rows}x{self.n}",
        }


def act_bytes(c: Case) -> int:
    """Bytes a perfect kernel moves: every (rows, n) tensor read or written once.

    swiglu  fwd reads gate, up, writes y (3); bwd reads dy, gate, up, writes dgate, dup (5).
    gelu    fwd reads x, writes y (2); bwd reads dy, x, writes dx (3).
    """
    t = c.rows * c.n * DTYPES[c.dtype].itemsize
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
    dt = DTYPES[c.dtype]
    width = 2 * c.n if c.op == "swiglu" else c.n
    x = (torch.randn(c.rows, width, generator=g) * 2).to(device, dt).requires_grad_(c.mode == "fwd_bwd")
    dy = torch.randn(c.rows, c.n, generator=g).to(device, dt)
    with torch.no_grad():
        ref = act_impl(c, "torch")(x)

    def provider(p):
        impl = act_impl(c, p)
        with torch.no_grad():
            check = common.check_close(impl(x), ref) if p != "torch" else ""
        return common.Timed(common.fwd_or_fwd_bwd(impl, (x,), c.mode, grads=dy), check)

    return provider


# ---- main ----------------------------------------------------------------------------------------------


def cases(a) -> list[Case]:
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    shapes = common.parse_shapes(a.shapes) if a.shapes else SHAPES[(dev, a.quick)]
    dtypes = common.split_list(a.dtypes, DEFAULT_DTYPES[dev], DTYPES, "dtype")
    ops = common.split_list(a.ops, "", OPS, "op")
    return [
        Case(op, mode, dt, rows, n) for rows, n in shapes for dt in dtypes for op in ops for mode in a.modes.split(",")
    ]


def main(argv=None) -> int:
    p = common.parser("activations", __doc__, PROVIDERS)
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument(
        "--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: all three, fp32 first on CPU)"
    )
    p.add_argument("--shapes", default=None, help="comma list of ROWSxN, e.g. 2048x1536")
    a = p.parse_args(argv)
    common.require_device("activations", a.device)
    providers = common.usable_providers(
        "activations", common.split_list(a.providers, "", PROVIDERS, "provider"), a.device, "swiglu_fwd"
    )
    return common.run(
        "activations",
        a,
        cases(a),
        lambda c: setup(c, a.device),
        providers=lambda c: providers,
        columns=COLUMNS,
        table=TABLE_COLUMNS,
        bytes_moved=act_bytes,
    )


if __name__ == "__main__":
    sys.exit(main())
