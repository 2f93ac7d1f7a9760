"""RoPE benchmark: PyTorch eager against our backends, forward and forward+backward.

Providers (same process, same inputs):
  torch    PyTorch eager, the HF formula: q * cos + rotate_half(q) * sin (rotate_every_two when
           interleaved), with full-width cos/sin already gathered and cast to q's dtype (HF builds them
           once per forward pass, so that is not timed)
  cpu      plm_engine's C++ CPU kernels (CPU tensors)
  triton   plm_engine's Triton kernels (CUDA tensors)
  cuda     plm_engine's CUDA C++ kernels (CUDA tensors)
Cases: layout (half = NeoX/Llama rotate_half, interleaved = GPT-J) x mode (fwd, fwd_inplace, fwd_bwd) x
dtype x shape (batch x seqlen x q_heads x k_heads x head_dim). fwd_inplace is ours only (eager has no
in-place form); its speedup is against eager's out-of-place forward.

Reported per case and provider: median ms, GB/s by rope_bytes() (q, k read and written once, plus the
cos/sin rows used), and the speedup over the torch provider measured in the same run. Rows are
appended to <out-dir>/rope.csv (default benchmarks/results/rope.csv).

    python benchmarks/bench_rope.py                     # CPU (or CUDA if present), full set
    python benchmarks/bench_rope.py --quick --no-csv    # smoke test
    python benchmarks/bench_rope.py --device cuda --out-dir $OUT --json
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from plm_engine.ops import backends  # noqa: E402
from plm_engine.ops.rope import rope, rope_cos_sin  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("torch", "cpu", "triton", "cuda")
SHAPES = {
    # (batch, seqlen, q_heads, k_heads, head_dim): a Llama-3-8B-like prefill, SmolLM2 (9/3 heads of 64)
    # prefill, and a batched decode step (one token per sequence).
    ("cpu", False): [(1, 2048, 32, 8, 128), (4, 512, 9, 3, 64), (64, 1, 32, 8, 128)],
    ("cpu", True): [(1, 128, 8, 2, 128), (8, 1, 9, 3, 64)],
    ("cuda", False): [(8, 4096, 32, 8, 128), (32, 2048, 9, 3, 64), (256, 1, 32, 8, 128)],
    ("cuda", True): [(2, 1024, 32, 8, 128), (64, 1, 32, 8, 128)],
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
    interleaved: bool
    mode: str  # "fwd" | "fwd_inplace" | "fwd_bwd"
    dtype: str  # key of DTYPES
    batch: int
    seqlen: int
    hq: int
    hk: int
    head_dim: int

    @property
    def labels(self) -> dict:
        return {
            "op": "rope",
            "variant": "interleaved" if self.interleaved else "half",
            "mode": self.mode,
            "dtype": self.dtype,
            "shape": f"{self.batch}x{self.seqlen}x{self.hq}x{self.hk}x{self.head_dim}",
        }


def rope_bytes(c: Case) -> int:
    """Bytes a perfect kernel moves: q and k read and written once, and the fp32 cos/sin rows of the
    positions used (seqlen rows of head_dim / 2 each). fwd_bwd adds the backward: dq, dk read, dq, dk
    written, the cos/sin rows again."""
    e = DTYPES[c.dtype].itemsize
    qk = c.batch * c.seqlen * (c.hq + c.hk) * c.head_dim * e
    tables = 2 * c.seqlen * (c.head_dim // 2) * 4
    one_pass = 2 * qk + tables
    return one_pass * (2 if c.mode == "fwd_bwd" else 1)


# ---- providers --------------------------------------------------------------------------------------


def eager_rope(c: Case, cos_full, sin_full):
    """HF's eager RoPE on (batch, seqlen, heads, head_dim); cos_full/sin_full (seqlen, head_dim) in q's dtype."""
    cos_b, sin_b = cos_full[:, None, :], sin_full[:, None, :]  # broadcast over heads

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def rotate_every_two(x):
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)

    rot = rotate_every_two if c.interleaved else rotate_half

    def f(q, k):
        return q * cos_b + rot(q) * sin_b, k * cos_b + rot(k) * sin_b

    return f


def ours_rope(c: Case, backend: str, cos, sin):
    inplace = c.mode == "fwd_inplace"

    def f(q, k):
        return rope(q, k, cos, sin, c.interleaved, inplace=inplace, backend=backend)

    return f


def make_inputs(c: Case, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = DTYPES[c.dtype]
    grad = c.mode == "fwd_bwd"
    q = torch.randn(c.batch, c.seqlen, c.hq, c.head_dim, generator=g).to(device, dt).requires_grad_(grad)
    k = torch.randn(c.batch, c.seqlen, c.hk, c.head_dim, generator=g).to(device, dt).requires_grad_(grad)
    cos, sin = rope_cos_sin(c.seqlen, c.head_dim, 500000.0, device=device)
    widen = (lambda t: t.repeat_interleave(2, -1)) if c.interleaved else (lambda t: torch.cat((t, t), -1))
    cos_full, sin_full = widen(cos).to(dt), widen(sin).to(dt)
    grads = None
    if grad:
        grads = [torch.randn(q.shape, generator=g).to(device, dt), torch.randn(k.shape, generator=g).to(device, dt)]
    return (q, k), (cos, sin), (cos_full, sin_full), grads


def runner(impl, c: Case, args, grads):
    """The zero-argument callable that is timed. In place rotates the same buffers every call (the
    values drift, the cost does not)."""
    if c.mode != "fwd_bwd":
        return lambda: impl(*args)

    def fwd_bwd():
        return torch.autograd.grad(impl(*args), args, grads)

    return fwd_bwd


def usable(provider: str, device: str) -> tuple[bool, str]:
    if provider == "torch":
        return True, ""
    if provider == "triton" and device == "cpu":
        return False, "Triton runs on CUDA tensors (the CPU interpreter is for tests)"
    return backends.availability(provider, torch.device(device), "rope")


def check(out, ref, dtype) -> str:
    """Sanity check of a provider's forward against torch's: a fast wrong kernel is no result."""
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    for a, b in zip(out, ref, strict=True):
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
    p.add_argument("--variants", default="half,interleaved")
    p.add_argument("--modes", default="fwd,fwd_inplace,fwd_bwd")
    p.add_argument(
        "--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: fp32,bf16 on CPU, +fp16 on CUDA)"
    )
    p.add_argument("--shapes", default=None, help="comma list of BxSxHQxHKxD, e.g. 1x2048x32x8x128")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time each case this many rounds, providers interleaved, and keep each provider's best "
        "median (steadier on a shared machine)",
    )
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR), help="where rope.csv is appended")
    p.add_argument("--no-csv", action="store_true", help="do not append to the CSV")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines instead of a table")
    return p.parse_args(argv)


def cases(a) -> list[Case]:
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    if a.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")]
        if any(len(s) != 5 for s in shapes):
            raise SystemExit("--shapes takes BxSxHQxHKxD entries")
    else:
        shapes = SHAPES[(dev, a.quick)]
    dtypes = (a.dtypes or DEFAULT_DTYPES[dev]).split(",")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    return [
        Case(variant == "interleaved", mode, dt, *shape)
        for shape in shapes
        for dt in dtypes
        for variant in a.variants.split(",")
        for mode in a.modes.split(",")
    ]


def main(argv=None) -> int:
    a = parse_args(argv)
    device = a.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_rope: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    providers = []
    for p in a.providers.split(","):
        if p not in PROVIDERS:
            raise SystemExit(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
        ok, why = usable(p, device)
        if ok:
            providers.append(p)
        else:
            print(f"bench_rope: skipping provider {p}: {why}", file=sys.stderr)
    env = common.env_info(device)
    csv_path = Path(a.out_dir) / "rope.csv"
    all_rows, failures = [], 0
    for c in cases(a):
        args, tables, full_tables, grads = make_inputs(c, device)
        impls = {p: eager_rope(c, *full_tables) if p == "torch" else ours_rope(c, p, *tables) for p in providers}
        with torch.no_grad():
            ref = eager_rope(c, *full_tables)(*args)
        fns, checks, best = {}, {}, {}
        for p, impl in impls.items():
            if p == "torch" and c.mode == "fwd_inplace":
                impl = eager_rope(c, *full_tables)  # the baseline for in place is eager out of place
            try:
                if p != "torch":
                    with torch.no_grad():
                        fresh = [t.detach().clone() for t in args]  # in place must not touch args
                        checks[p] = check(impl(*fresh), ref, DTYPES[c.dtype])
                fn_args = [t.detach().clone() for t in args] if c.mode == "fwd_inplace" else args
                fns[p] = runner(impl, c, fn_args, grads)
            except Exception as e:  # a broken provider must not stop the others
                failures += 1
                print(f"bench_rope: {p} failed on {c.labels}: {e!r}", file=sys.stderr)
                traceback.print_exc(limit=3)
        del ref
        for _ in range(max(1, a.repeat)):
            for p, fn in fns.items():
                try:
                    ms = common.time_ms(fn, device, quick=a.quick)
                except Exception as e:
                    failures += 1
                    print(f"bench_rope: timing {p} failed on {c.labels}: {e!r}", file=sys.stderr)
                    continue
                best[p] = min(ms, best.get(p, float("inf")))
        gb = rope_bytes(c) / 1e9
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
                    f"{r['op']:>5} {r['variant']:>11} {r['mode']:>11} {r['dtype']:>4} {r['shape']:>17} "
                    f"{r['provider']:>6} {r['ms']:9.3f} ms {r['gbps']:7.1f} GB/s  "
                    f"x{common.fmt(r['speedup_vs_torch'])}",
                    file=sys.stderr,
                )
        if not a.no_csv:
            common.append_csv(csv_path, rows, COLUMNS)  # per case, so a run cut short keeps what it measured
        all_rows += rows
        del args, grads, fns, impls
    if not a.json:
        common.print_table(all_rows, TABLE_COLUMNS, title=f"rope on {env['device_name']} ({env['commit']})")
    if not a.no_csv and all_rows:
        print(f"appended {len(all_rows)} rows to {csv_path}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
