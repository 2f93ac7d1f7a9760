"""LayerNorm / RMSNorm benchmark: PyTorch eager against our backends, forward and forward+backward.

Providers (same process, same inputs):
  torch    PyTorch eager: F.layer_norm / F.rms_norm; with a residual, `h = x + r` then the norm
  cpu      plm_engine's C++ CPU kernels (CPU tensors)
  triton   plm_engine's Triton kernels (CUDA tensors)
  cuda     plm_engine's CUDA C++ kernels (CUDA tensors)
Cases: op (layer, rms) x variant (plain, residual) x mode (fwd, fwd_bwd) x dtype x shape (rows x hidden).
fwd_bwd runs the forward and torch.autograd.grad of (y, and h with a residual) w.r.t. every input.

Reported per case and provider: median ms, GB/s by norm_bytes() (every tensor read or written once),
and the speedup over the torch provider measured in the same run. Rows are appended to
<out-dir>/norms.csv (default benchmarks/results/norms.csv).

    python benchmarks/bench_norms.py                     # CPU (or CUDA if present), full set
    python benchmarks/bench_norms.py --quick --no-csv    # smoke test
    python benchmarks/bench_norms.py --device cuda --out-dir $OUT --json
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import common
import torch
import torch.nn.functional as F

from plm_engine import ops

DTYPES = common.DTYPES
EPS = {"layer": 1e-5, "rms": 1e-6}
PROVIDERS = ("torch", "cpu", "triton", "cuda")
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


@dataclass(frozen=True)
class Case:
    op: str  # "layer" | "rms"
    residual: bool
    mode: str  # "fwd" | "fwd_bwd"
    dtype: str  # key of DTYPES
    rows: int
    n: int

    @property
    def labels(self) -> dict:
        return {
            "op": f"{self.op}_norm",
            "variant": "residual" if self.residual else "plain",
            "mode": self.mode,
            "dtype": self.dtype,
            "shape": f"{self.rows}x{self.n}",
        }


def norm_bytes(c: Case) -> int:
    """Bytes a perfect kernel moves: every tensor read or written exactly once.

    fwd  reads x (+ residual) + weight (+ bias); writes y (+ h) + fp32 rstd (+ mean for LayerNorm).
    bwd  reads dy (+ dh), h (x without residual), weight, the stats; writes dx (which is also the
         residual's gradient: one tensor), dweight (+ dbias).
    Weights are counted in the input dtype, as the benchmark creates them.
    """
    e = DTYPES[c.dtype].itemsize
    act = c.rows * c.n * e  # one (rows, n) activation
    vec = c.n * e  # one (n,) parameter
    params = vec * (2 if c.op == "layer" else 1)
    stats = c.rows * 4 * (2 if c.op == "layer" else 1)
    fwd = act * (2 if c.residual else 1) + params + act * (2 if c.residual else 1) + stats
    if c.mode == "fwd":
        return fwd
    bwd = act * (2 if c.residual else 1) + act + vec + stats + act + params
    return fwd + bwd


# ---- providers --------------------------------------------------------------------------------------


def norm_impl(c: Case, provider: str):
    """f(x, w, b, r) -> y, or (y, h) with a residual: PyTorch eager (h = x + r, then the norm) or ours."""
    if provider != "torch":
        if c.op == "layer":
            return lambda x, w, b, r: ops.layer_norm(x, w, b, eps=EPS["layer"], residual=r, backend=provider)
        return lambda x, w, b, r: ops.rms_norm(x, w, eps=EPS["rms"], residual=r, backend=provider)

    def f(x, w, b, r):
        h = x + r if r is not None else x
        if c.op == "layer":
            y = F.layer_norm(h, (c.n,), w, b, EPS["layer"])
        else:
            y = F.rms_norm(h, (c.n,), w, EPS["rms"])
        return (y, h) if r is not None else y

    return f


def setup(c: Case, device: str):
    # Generated on the device itself: 64M-element tensors made on the CPU would take seconds each.
    g = torch.Generator(device=device).manual_seed(0)
    dt = DTYPES[c.dtype]
    grad = c.mode == "fwd_bwd"

    def t(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, device=device) * scale + shift).to(dt).requires_grad_(grad)

    x = t(c.rows, c.n)
    w = t(c.n, scale=0.1, shift=1.0)
    b = t(c.n, scale=0.1) if c.op == "layer" else None
    r = t(c.rows, c.n) if c.residual else None
    args = (x, w, b, r)
    grads = [torch.randn(c.rows, c.n, generator=g, device=device).to(dt) for _ in range(1 + c.residual)]
    with torch.no_grad():
        ref = norm_impl(c, "torch")(*args)

    def provider(p):
        impl = norm_impl(c, p)
        with torch.no_grad():
            check = common.check_close(impl(*args), ref) if p != "torch" else ""
        inputs = [v for v in args if v is not None]
        return common.Timed(common.fwd_or_fwd_bwd(impl, args, c.mode, inputs, grads if grad else None), check)

    return provider


# ---- main ----------------------------------------------------------------------------------------------


def cases(a) -> list[Case]:
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    shapes = common.parse_shapes(a.shapes) if a.shapes else SHAPES[(dev, a.quick)]
    dtypes = common.split_list(a.dtypes, DEFAULT_DTYPES[dev], DTYPES, "dtype")
    return [
        Case(op, variant == "residual", mode, dt, rows, n)
        for rows, n in shapes
        for dt in dtypes
        for op in a.ops.split(",")
        for variant in a.variants.split(",")
        for mode in a.modes.split(",")
    ]


def main(argv=None) -> int:
    p = common.parser("norms", __doc__, PROVIDERS)
    p.add_argument("--ops", default="layer,rms")
    p.add_argument("--variants", default="plain,residual")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma list of fp32,bf16,fp16 (default: fp32,bf16 on CPU, bf16,fp16,fp32 on CUDA)",
    )
    p.add_argument("--shapes", default=None, help="comma list of ROWSxHIDDEN, e.g. 4096x4096,8192x1024")
    a = p.parse_args(argv)
    common.require_device("norms", a.device)
    providers = common.usable_providers(
        "norms", common.split_list(a.providers, "", PROVIDERS, "provider"), a.device, "norm_fwd"
    )
    return common.run(
        "norms",
        a,
        cases(a),
        lambda c: setup(c, a.device),
        providers=lambda c: providers,
        columns=COLUMNS,
        bytes_moved=norm_bytes,
    )


if __name__ == "__main__":
    sys.exit(main())
