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

import argparse
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from plm_engine import ops  # noqa: E402
from plm_engine.ops import backends  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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
COLUMNS = [
    *common.ENV_COLUMNS,
    "op",
    "variant",
    "mode",
    "dtype",
    "shape",
    "provider",
    "ms",
    "gbps",
    "speedup_vs_torch",
    "check",
]
TABLE_COLUMNS = ["op", "variant", "mode", "dtype", "shape", "provider", "ms", "gbps", "speedup_vs_torch", "check"]


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


def torch_norm(c: Case):
    """PyTorch eager, returning what our fused op returns: y, or (y, h) with a residual."""

    def f(x, w, b, r):
        h = x + r if r is not None else x
        if c.op == "layer":
            y = F.layer_norm(h, (c.n,), w, b, EPS["layer"])
        else:
            y = F.rms_norm(h, (c.n,), w, EPS["rms"])
        return (y, h) if r is not None else y

    return f


def ours_norm(c: Case, backend: str):
    def f(x, w, b, r):
        if c.op == "layer":
            return ops.layer_norm(x, w, b, eps=EPS["layer"], residual=r, backend=backend)
        return ops.rms_norm(x, w, eps=EPS["rms"], residual=r, backend=backend)

    return f


def make_inputs(c: Case, device: str):
    # Generated on the device itself: 64M-element tensors made on the CPU would take seconds each.
    g = torch.Generator(device=device).manual_seed(0)
    dt = DTYPES[c.dtype]
    grad = c.mode == "fwd_bwd"

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    def t(*shape, scale=1.0, shift=0.0):
        return (randn(*shape) * scale + shift).to(dt).requires_grad_(grad)

    x = t(c.rows, c.n)
    w = t(c.n, scale=0.1, shift=1.0)
    b = t(c.n, scale=0.1) if c.op == "layer" else None
    r = t(c.rows, c.n) if c.residual else None
    inputs = [v for v in (x, w, b, r) if v is not None]
    grads = None
    if grad:
        grads = [randn(c.rows, c.n).to(dt)]
        if c.residual:
            grads.append(randn(c.rows, c.n).to(dt))
    return (x, w, b, r), inputs, grads


def runner(impl, c: Case, args, inputs, grads):
    """The zero-argument callable that is timed."""
    if c.mode == "fwd":
        return lambda: impl(*args)

    def fwd_bwd():
        out = impl(*args)
        outs = list(out) if isinstance(out, tuple) else [out]
        return torch.autograd.grad(outs, inputs, grads)

    return fwd_bwd


def usable(provider: str, device: str) -> tuple[bool, str]:
    if provider == "torch":
        return True, ""
    if provider == "triton" and device == "cpu":
        return False, "Triton runs on CUDA tensors (the CPU interpreter is for tests)"
    return backends.availability(provider, torch.device(device), "norm_fwd")


def check(out, ref, dtype) -> str:
    """Sanity check of a provider's forward against torch's: a fast wrong kernel is no result."""
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    for a, b in zip(outs, refs):
        err = (a.detach().float() - b.detach().float()).abs().max().item()
        if not err <= tol * max(1.0, b.detach().float().abs().max().item()):
            return f"mismatch {err:.2g}"
    return "ok"


# ---- main ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default=common.default_device(), help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="small shapes and short timing (CI smoke test)")
    p.add_argument(
        "--providers",
        default=",".join(PROVIDERS),
        help="comma list of torch,cpu,triton,cuda (those unusable on the device are skipped)",
    )
    p.add_argument("--ops", default="layer,rms")
    p.add_argument("--variants", default="plain,residual")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma list of fp32,bf16,fp16 (default: fp32,bf16 on CPU, bf16,fp16,fp32 on CUDA)",
    )
    p.add_argument("--shapes", default=None, help="comma list of ROWSxHIDDEN, e.g. 4096x4096,8192x1024")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time each case this many rounds, providers interleaved, and keep each provider's best "
        "median (steadier on a shared machine)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: start no new case after this (the GPU suite's time limit); exits 0",
    )
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR), help="where norms.csv is appended")
    p.add_argument("--no-csv", action="store_true", help="do not append to the CSV")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines instead of a table")
    return p.parse_args(argv)


def cases(a) -> list[Case]:
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    if a.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")]
    else:
        shapes = SHAPES[(dev, a.quick)]
    dtypes = (a.dtypes or DEFAULT_DTYPES[dev]).split(",")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    return [
        Case(op, variant == "residual", mode, dt, rows, n)
        for rows, n in shapes
        for dt in dtypes
        for op in a.ops.split(",")
        for variant in a.variants.split(",")
        for mode in a.modes.split(",")
    ]


def main(argv=None) -> int:
    a = parse_args(argv)
    device = a.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_norms: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    providers = []
    for p in a.providers.split(","):
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
        ok, why = usable(p, device)
        if ok:
            providers.append(p)
        else:
            print(f"bench_norms: skipping provider {p}: {why}", file=sys.stderr)
    env = common.env_info(device)
    csv_path = Path(a.out_dir) / "norms.csv"
    all_rows, failures = [], 0
    start = time.monotonic()
    todo = cases(a)
    for i, c in enumerate(todo):
        if a.time_budget is not None and time.monotonic() - start > a.time_budget:
            print(
                f"bench_norms: time budget of {a.time_budget:.0f}s spent; skipped the last {len(todo) - i} "
                f"of {len(todo)} cases",
                file=sys.stderr,
            )
            break
        args, inputs, grads = make_inputs(c, device)
        impls = {p: torch_norm(c) if p == "torch" else ours_norm(c, p) for p in providers}
        with torch.no_grad():
            ref = torch_norm(c)(*args)
        fns, checks, best = {}, {}, {}
        for p, impl in impls.items():
            try:
                if p != "torch":
                    with torch.no_grad():
                        checks[p] = check(impl(*args), ref, DTYPES[c.dtype])
                fns[p] = runner(impl, c, args, inputs, grads)
            except Exception as e:  # a broken provider must not stop the others
                failures += 1
                print(f"bench_norms: {p} failed on {c.labels}: {e!r}", file=sys.stderr)
                traceback.print_exc(limit=3)
        del ref
        for _ in range(max(1, a.repeat)):
            for p, fn in fns.items():
                try:
                    ms = common.time_ms(fn, device, quick=a.quick)
                except Exception as e:
                    failures += 1
                    print(f"bench_norms: timing {p} failed on {c.labels}: {e!r}", file=sys.stderr)
                    continue
                best[p] = min(ms, best.get(p, float("inf")))
        gb = norm_bytes(c) / 1e9
        rows = []
        for p, ms in best.items():
            rows.append(
                {
                    **env,
                    **c.labels,
                    "provider": p,
                    "ms": round(ms, 4),
                    "gbps": round(gb / (ms / 1e3), 2),
                    "speedup_vs_torch": round(best["torch"] / ms, 3) if "torch" in best else "",
                    "check": checks.get(p, ""),
                }
            )
        if a.json:
            common.print_json_lines(rows)
        else:
            for r in rows:
                print(
                    f"{r['op']:>10} {r['variant']:>8} {r['mode']:>7} {r['dtype']:>4} {r['shape']:>11} "
                    f"{r['provider']:>6} {r['ms']:9.3f} ms {r['gbps']:7.1f} GB/s  x{common.fmt(r['speedup_vs_torch'])}",
                    file=sys.stderr,
                )
        if not a.no_csv:
            common.append_csv(csv_path, rows, COLUMNS)  # per case, so a run cut short keeps what it measured
        all_rows += rows
        del args, inputs, grads, fns, impls
    if not a.json:
        common.print_table(all_rows, TABLE_COLUMNS, title=f"norms on {env['device_name']} ({env['commit']})")
    if not a.no_csv and all_rows:
        print(f"appended {len(all_rows)} rows to {csv_path}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
