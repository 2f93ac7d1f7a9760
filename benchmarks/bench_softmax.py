"""Softmax benchmark: PyTorch eager against our backends, forward and forward+backward.

Providers (same process, same inputs):
  torch    PyTorch eager: torch.softmax(x * scale) (causal: masked_fill of the upper triangle first)
  cpu      plm_engine's C++ CPU kernels (CPU tensors)
  triton   plm_engine's Triton kernels (CUDA tensors)
  cuda     plm_engine's CUDA C++ kernels (CUDA tensors)
Cases: mode (fwd, fwd_bwd) x causal x dtype x shape (rows x cols; causal: (rows / cols) x cols x cols).

Bytes moved: softmax_bytes() (one read or write per tensor). Rows: <out-dir>/softmax.csv.

    python benchmarks/bench_softmax.py                     # CPU (or CUDA if present)
    python benchmarks/bench_softmax.py --quick --no-csv    # smoke test
    python benchmarks/bench_softmax.py --device cuda --out-dir $OUT
"""

from __future__ import annotations

import sys

import common
import torch

from plm_engine.ops.softmax import softmax

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


class Case(common.Case):
    """variant: causal | plain (recorded as the causal column); shape: (rows, n), or (batch, sq, sk)
    scores when causal."""

    causal = property(lambda self: self.variant == "causal")

    @property
    def labels(self) -> dict:
        labels = super().labels
        del labels["variant"]
        return {**labels, "causal": self.causal}


def softmax_bytes(c: Case) -> int:
    """fwd reads x and writes y; bwd reads dy and y and writes dx: one tensor per access."""
    act = common.DTYPES[c.dtype].itemsize
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
    dt = common.DTYPES[c.dtype]
    x = (torch.randn(c.shape, generator=g) * 4).to(device, dt).requires_grad_(c.mode == "fwd_bwd")
    dy = torch.randn(c.shape, generator=g).to(device, dt)
    return common.against_torch(lambda p: softmax_impl(c, p), (x,), c.mode, grads=dy)


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
        for dt in common.split_list(a.dtypes, "fp32,bf16,fp16", common.DTYPES, "dtype"):
            out += [Case("softmax", "causal" if causal else "plain", mode, dt, shape) for mode in a.modes.split(",")]
    return out


def main(argv=None) -> int:
    shapes = "ROWSxN (not causal), e.g. 4096x4096; causal cases only in the default set"
    p = common.parser("softmax", __doc__, dtypes="fp32,bf16,fp16", modes="fwd,fwd_bwd", shapes=shapes)
    a = p.parse_args(argv)
    return common.run("softmax", a, cases(a), setup, op="softmax_fwd", columns=COLUMNS, bytes_moved=softmax_bytes)


if __name__ == "__main__":
    sys.exit(main())
