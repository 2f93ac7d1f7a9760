"""LayerNorm / RMSNorm benchmark: PyTorch eager against our backends, forward and forward+backward.

Providers (same process, same inputs):
  torch    PyTorch eager: F.layer_norm / F.rms_norm; with a residual, `h = x + r` then the norm
  cpu      plm_engine's C++ CPU kernels (CPU tensors)
  triton   plm_engine's Triton kernels (CUDA tensors)
  cuda     plm_engine's CUDA C++ kernels (CUDA tensors)
Cases: op (layer, rms) x variant (plain, residual) x mode (fwd, fwd_bwd) x dtype x shape (rows x hidden).
fwd_bwd runs the forward and torch.autograd.grad of (y, and h with a residual) w.r.t. every input.

GB/s counts norm_bytes(): every tensor read or written once. Rows (median ms, speedup over torch in the
same run, check) as benchmarks/common.py writes them, to <out-dir>/norms.csv.

    python benchmarks/bench_norms.py                     # CPU (or CUDA if present), full set
    python benchmarks/bench_norms.py --quick --no-csv    # smoke test
    python benchmarks/bench_norms.py --device cuda --out-dir $OUT --json
"""

from __future__ import annotations

import itertools
import sys

import common
import torch
import torch.nn.functional as F

from plm_engine import ops

EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}
SHAPES = {
    # The hidden size of real models (576: SmolLM2, 1024, 4096: 7B-class) at a few MB to 64 MB per tensor.
    ("cpu", False): [(4096, 4096), (8192, 1024), (2048, 576)],
    ("cpu", True): [(256, 1024), (64, 576)],
    # A sweep of hidden sizes at 64M elements per tensor: big enough to run at HBM bandwidth. Most
    # telling first, so a run cut short by --time-budget (the GPU suite) still has the main cases.
    ("cuda", False): [(16384, 4096), (65536, 1024), (4096, 16384), (2048, 32768), (8192, 8192), (32768, 2048)],
    ("cuda", True): [(4096, 1024), (1024, 8192)],
}
DEFAULT_DTYPES = {"cpu": "fp32,bf16", "cuda": "bf16,fp16,fp32"}
COLUMNS = ["op", "variant", "mode", "dtype", "shape", "provider", "ms", "gbps", "speedup_vs_torch", "check"]


class Case(common.Case):
    """op: layer_norm | rms_norm; variant: plain | residual; shape: (rows, n)."""

    residual = property(lambda self: self.variant == "residual")
    rows = property(lambda self: self.shape[0])
    n = property(lambda self: self.shape[1])


def norm_bytes(c: Case) -> int:
    """Bytes a perfect kernel moves: every tensor read or written exactly once.

    fwd  reads x (+ residual) + weight (+ bias); writes y (+ h) + fp32 rstd (+ mean for LayerNorm).
    bwd  reads dy (+ dh), h (x without residual), weight, the stats; writes dx (which is also the
         residual's gradient: one tensor), dweight (+ dbias).
    Weights are counted in the input dtype, as the benchmark creates them.
    """
    e = common.DTYPES[c.dtype].itemsize
    act = c.rows * c.n * e  # one (rows, n) activation
    vec = c.n * e  # one (n,) parameter
    params = vec * (2 if c.op == "layer_norm" else 1)
    stats = c.rows * 4 * (2 if c.op == "layer_norm" else 1)
    fwd = act * (2 if c.residual else 1) + params + act * (2 if c.residual else 1) + stats
    if c.mode == "fwd":
        return fwd
    bwd = act * (2 if c.residual else 1) + act + vec + stats + act + params
    return fwd + bwd


# ---- providers --------------------------------------------------------------------------------------


def norm_impl(c: Case, provider: str):
    """f(x, w, b, r) -> y, or (y, h) with a residual: PyTorch eager (h = x + r, then the norm) or ours."""
    if provider != "torch":
        if c.op == "layer_norm":
            return lambda x, w, b, r: ops.layer_norm(x, w, b, eps=EPS[c.op], residual=r, backend=provider)
        return lambda x, w, b, r: ops.rms_norm(x, w, eps=EPS[c.op], residual=r, backend=provider)

    def f(x, w, b, r):
        h = x + r if r is not None else x
        if c.op == "layer_norm":
            y = F.layer_norm(h, (c.n,), w, b, EPS[c.op])
        else:
            y = F.rms_norm(h, (c.n,), w, EPS[c.op])
        return (y, h) if r is not None else y

    return f


def setup(c: Case, device: str):
    # Generated on the device itself: 64M-element tensors made on the CPU would take seconds each.
    g = torch.Generator(device=device).manual_seed(0)
    dt = common.DTYPES[c.dtype]

    def t(*shape, scale=1.0, shift=0.0):
        x = torch.randn(*shape, generator=g, device=device) * scale + shift
        return x.to(dt).requires_grad_(c.mode == "fwd_bwd")

    args = (t(c.rows, c.n), t(c.n, scale=0.1, shift=1.0), t(c.n, scale=0.1) if c.op == "layer_norm" else None)
    args += (t(c.rows, c.n) if c.residual else None,)
    grads = [torch.randn(c.rows, c.n, generator=g, device=device).to(dt) for _ in range(1 + c.residual)]
    inputs = [v for v in args if v is not None]
    return common.against_torch(lambda p: norm_impl(c, p), args, c.mode, inputs, grads)


# ---- main ----------------------------------------------------------------------------------------------


def cases(a) -> list[Case]:
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    shapes = common.parse_shapes(a.shapes) if a.shapes else SHAPES[(dev, a.quick)]
    dtypes = common.split_list(a.dtypes, DEFAULT_DTYPES[dev], common.DTYPES, "dtype")
    # Shapes outermost, most telling first: a run cut short by --time-budget still has the main cases.
    ops_ = common.split_list(a.ops, "", ("layer", "rms"), "op")
    variants = common.split_list(a.variants, "", ("plain", "residual"), "variant")
    modes = common.split_list(a.modes, "", ("fwd", "fwd_bwd"), "mode")
    axes = itertools.product(shapes, dtypes, ops_, variants, modes)
    return [Case(f"{op}_norm", variant, mode, dt, shape) for shape, dt, op, variant, mode in axes]


def main(argv=None) -> int:
    p = common.parser(
        "norms", __doc__, dtypes="fp32,bf16 on CPU, bf16,fp16,fp32 on CUDA", modes="fwd,fwd_bwd", shapes="ROWSxHIDDEN"
    )
    p.add_argument("--ops", default="layer,rms", help="comma list of layer,rms")
    p.add_argument("--variants", default="plain,residual", help="comma list of plain,residual")
    a = p.parse_args(argv)
    return common.run("norms", a, cases(a), setup, op="norm_fwd", columns=COLUMNS, bytes_moved=norm_bytes)


if __name__ == "__main__":
    sys.exit(main())
