"""Softmax benchmark: PyTorch eager against our backends, forward and forward+backward.

Providers (same process, same inputs):
  torch    PyTorch eager: torch.softmax(x * scale) (causal: masked_fill of the upper triangle first)
  cpu      plm_engine's C++ CPU kernels (CPU tensors)
  triton   plm_engine's Triton kernels (CUDA tensors)
  cuda     plm_engine's CUDA C++ kernels (CUDA tensors)
Cases: mode (fwd, fwd_bwd) x causal x dtype x shape (rows x cols; causal: (rows / cols) x cols x cols).

Reported per case and provider: median ms, GB/s by softmax_bytes() (every tensor read or written once)
and the speedup over torch measured in the same run. Rows are appended to <out-dir>/softmax.csv.

    python benchmarks/bench_softmax.py                     # CPU (or CUDA if present)
    python benchmarks/bench_softmax.py --quick --no-csv    # smoke test
    python benchmarks/bench_softmax.py --device cuda --out-dir $OUT
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import common
import torch

from plm_engine.ops.softmax import softmax

DTYPES = common.DTYPES
PROVIDERS = ("torch", "cpu", "triton", "cuda")
SCALE = 0.125
SHAPES = {
    # Attention-score rows (1024-4096), vocabulary-sized rows (32768) and the longest promised (131072).
    ("cpu", False): [(8192, 1024), (4096, 4096), (1024, 32768), (32, 131072)],
    ("cpu", True): [(512, 1024), (8, 131072)],
    ("cuda", False): [(65536, 1024), (16384, 4096), (4096, 16384), (2048, 32000), (512, 131072)],
    ("cuda", True): [(4096, 1024), (64, 131072)],
}
QUICK = [((256, 1024), False), ((8, 32000), False), ((64, 512), True)]
COLUMNS = ["op", "mode", "causal", "dtype", "shape", "provider", "ms", "gbps", "speedup_vs_torch", "check"]


@dataclass(frozen=True)
class Case:
    mode: str  # "fwd" | "fwd_bwd"
    causal: bool
    dtype: str
    shape: tuple  # (rows, n), or (batch, sq, sk) scores when causal

    @property
    def labels(self) -> dict:
        shape = "x".join(map(str, self.shape))
        return {"op": "softmax", "mode": self.mode, "causal": self.causal, "dtype": self.dtype, "shape": shape}


def softmax_bytes(c: Case) -> int:
    """fwd reads x and writes y; bwd reads dy and y and writes dx: one tensor per access."""
    act = DTYPES[c.dtype].itemsize
    for d in c.shape:
        act *= d
    return 2 * act if c.mode == "fwd" else 5 * act


def torch_softmax(x, causal):
    xs = x * SCALE
    if causal:
        sq, sk = x.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu_(sk - sq + 1)
        xs = xs.masked_fill(mask, float("-inf"))
    return torch.softmax(xs, dim=-1)


def softmax_impl(c: Case, provider: str):
    if provider == "torch":
        return lambda x: torch_softmax(x, c.causal)
    return lambda x: softmax(x, scale=SCALE, causal=c.causal, backend=provider)


def setup(c: Case, device: str):
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[c.dtype]
    x = (torch.randn(c.shape, generator=g) * 4).to(device, dt).requires_grad_(c.mode == "fwd_bwd")
    dy = torch.randn(c.shape, generator=g).to(device, dt)
    with torch.no_grad():
        ref = torch_softmax(x, c.causal)

    def provider(p):
        impl = softmax_impl(c, p)
        with torch.no_grad():
            check = common.check_close(impl(x), ref) if p != "torch" else ""
        return common.Timed(common.fwd_or_fwd_bwd(impl, (x,), c.mode, grads=dy), check)

    return provider


def cases(a) -> list[Case]:
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    shapes = [(s, False) for s in SHAPES[(dev, False)]] + [(s, True) for s in SHAPES[(dev, True)]]
    if a.shapes:
        shapes = [(s, False) for s in common.parse_shapes(a.shapes)]
    if a.quick:
        shapes = QUICK
    out = []
    for (rows, n), causal in shapes:
        # Causal cases are square score matrices (batch, n, n), or one (1, rows, n) block of them.
        shape = (rows // n, n, n) if causal and rows >= n else ((1, rows, n) if causal else (rows, n))
        for dt in common.split_list(a.dtypes, "fp32,bf16,fp16", DTYPES, "dtype"):
            out += [Case(mode, causal, dt, shape) for mode in a.modes.split(",")]
    return out


def main(argv=None) -> int:
    p = common.parser("softmax", __doc__, PROVIDERS)
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: all three)")
    p.add_argument(
        "--shapes",
        default=None,
        help="comma list of ROWSxN (not causal), e.g. 4096x4096; default: a fixed set per device, causal included",
    )
    p.add_argument("--modes", default="fwd,fwd_bwd")
    a = p.parse_args(argv)
    common.require_device("softmax", a.device)
    providers = common.usable_providers(
        "softmax", common.split_list(a.providers, "", PROVIDERS, "provider"), a.device, "softmax_fwd"
    )
    return common.run(
        "softmax",
        a,
        cases(a),
        lambda c: setup(c, a.device),
        providers=lambda c: providers,
        columns=COLUMNS,
        bytes_moved=softmax_bytes,
    )


if __name__ == "__main__":
    sys.exit(main())
