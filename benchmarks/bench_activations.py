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

import argparse
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from plm_engine.ops import backends  # noqa: E402
from plm_engine.ops.activations import gelu, swiglu  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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


def eager_act(c: Case):
    if c.op == "swiglu":
        return lambda g, u: F.silu(g) * u
    approximate = "tanh" if c.op == "gelu_tanh" else "none"
    return lambda x: F.gelu(x, approximate=approximate)


def ours_act(c: Case, backend: str):
    if c.op == "swiglu":
        return lambda g, u: swiglu(g, u, backend=backend)
    approximate = "tanh" if c.op == "gelu_tanh" else "none"
    return lambda x: gelu(x, approximate, backend=backend)


def make_inputs(c: Case, device: str):
    """(args, leaves that need gradients, output gradient)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = DTYPES[c.dtype]
    grad = c.mode == "fwd_bwd"
    if c.op == "swiglu":
        gate_up = (torch.randn(c.rows, 2 * c.n, generator=g) * 2).to(device, dt).requires_grad_(grad)
        args, leaves = list(gate_up.chunk(2, dim=-1)), [gate_up]
    else:
        x = (torch.randn(c.rows, c.n, generator=g) * 2).to(device, dt).requires_grad_(grad)
        args, leaves = [x], [x]
    dy = torch.randn(c.rows, c.n, generator=g).to(device, dt) if grad else None
    return args, leaves, dy


def runner(impl, c: Case, args, leaves, dy):
    """The zero-argument callable that is timed."""
    if c.mode == "fwd":
        return lambda: impl(*args)

    def fwd_bwd():
        # The chunk views are re-taken from the leaf each call so the graph is fresh.
        a = list(leaves[0].chunk(2, dim=-1)) if c.op == "swiglu" else leaves
        return torch.autograd.grad(impl(*a), leaves, dy)

    return fwd_bwd


def usable(provider: str, device: str) -> tuple[bool, str]:
    if provider == "torch":
        return True, ""
    if provider == "triton" and device == "cpu":
        return False, "Triton runs on CUDA tensors (the CPU interpreter is for tests)"
    return backends.availability(provider, torch.device(device), "swiglu_fwd")


def check(out, ref, dtype) -> str:
    """Sanity check of a provider's forward against torch's: a fast wrong kernel is no result."""
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    err = (out.detach().float() - ref.detach().float()).abs().max().item()
    if not err <= tol * max(1.0, ref.detach().float().abs().max().item()):
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
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument(
        "--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: fp32,bf16 on CPU, +fp16 on CUDA)"
    )
    p.add_argument("--shapes", default=None, help="comma list of ROWSxN, e.g. 2048x1536")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time each case this many rounds, providers interleaved, and keep each provider's best "
        "median (steadier on a shared machine)",
    )
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR), help="where activations.csv is appended")
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
    for op in a.ops.split(","):
        if op not in OPS:
            raise SystemExit(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    return [
        Case(op, mode, dt, rows, n)
        for rows, n in shapes
        for dt in dtypes
        for op in a.ops.split(",")
        for mode in a.modes.split(",")
    ]


def main(argv=None) -> int:
    a = parse_args(argv)
    device = a.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_activations: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    providers = []
    for p in a.providers.split(","):
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
        ok, why = usable(p, device)
        if ok:
            providers.append(p)
        else:
            print(f"bench_activations: skipping provider {p}: {why}", file=sys.stderr)
    env = common.env_info(device)
    csv_path = Path(a.out_dir) / "activations.csv"
    all_rows, failures = [], 0
    for c in cases(a):
        args, leaves, dy = make_inputs(c, device)
        impls = {p: eager_act(c) if p == "torch" else ours_act(c, p) for p in providers}
        with torch.no_grad():
            ref = eager_act(c)(*args)
        fns, checks, best = {}, {}, {}
        for p, impl in impls.items():
            try:
                if p != "torch":
                    with torch.no_grad():
                        checks[p] = check(impl(*args), ref, DTYPES[c.dtype])
                fns[p] = runner(impl, c, args, leaves, dy)
            except Exception as e:  # a broken provider must not stop the others
                failures += 1
                print(f"bench_activations: {p} failed on {c.labels}: {e!r}", file=sys.stderr)
                traceback.print_exc(limit=3)
        del ref
        for _ in range(max(1, a.repeat)):
            for p, fn in fns.items():
                try:
                    ms = common.time_ms(fn, device, quick=a.quick)
                except Exception as e:
                    failures += 1
                    print(f"bench_activations: timing {p} failed on {c.labels}: {e!r}", file=sys.stderr)
                    continue
                best[p] = min(ms, best.get(p, float("inf")))
        gb = act_bytes(c) / 1e9
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
                    f"{r['op']:>9} {r['mode']:>7} {r['dtype']:>4} {r['shape']:>11} "
                    f"{r['provider']:>6} {r['ms']:9.3f} ms {r['gbps']:7.1f} GB/s  "
                    f"x{common.fmt(r['speedup_vs_torch'])}",
                    file=sys.stderr,
                )
        if not a.no_csv:
            common.append_csv(csv_path, rows, COLUMNS)  # per case, so a run cut short keeps what it measured
        all_rows += rows
        del args, leaves, dy, fns, impls
    if not a.json:
        common.print_table(all_rows, TABLE_COLUMNS, title=f"activations on {env['device_name']} ({env['commit']})")
    if not a.no_csv and all_rows:
        print(f"appended {len(all_rows)} rows to {csv_path}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
