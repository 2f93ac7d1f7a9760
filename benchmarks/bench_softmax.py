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

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from plm_engine.ops import backends  # noqa: E402
from plm_engine.ops.softmax import softmax  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("torch", "cpu", "triton", "cuda")
SCALE = 0.125
SHAPES = {
    # Attention-score rows (1024-4096), vocabulary-sized rows (32768) and the longest promised (131072).
    ("cpu", False): [(8192, 1024), (4096, 4096), (1024, 32768), (32, 131072)],
    ("cpu", True): [(512, 1024), (8, 131072)],
    ("cuda", False): [(65536, 1024), (16384, 4096), (4096, 16384), (2048, 32000), (512, 131072)],
    ("cuda", True): [(4096, 1024), (64, 131072)],
}
COLUMNS = [
    *common.ENV_COLUMNS,
    "op",
    "mode",
    "causal",
    "dtype",
    "shape",
    "provider",
    "ms",
    "gbps",
    "speedup_vs_torch",
    "check",
]
TABLE_COLUMNS = ["mode", "causal", "dtype", "shape", "provider", "ms", "gbps", "speedup_vs_torch", "check"]


def softmax_bytes(rows: int, n: int, itemsize: int, mode: str) -> int:
    """fwd reads x and writes y; bwd reads dy and y and writes dx: one (rows, n) tensor per access."""
    act = rows * n * itemsize
    return 2 * act if mode == "fwd" else 5 * act


def torch_softmax(x, causal):
    xs = x * SCALE
    if causal:
        sq, sk = x.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu_(sk - sq + 1)
        xs = xs.masked_fill(mask, float("-inf"))
    return torch.softmax(xs, dim=-1)


def make_fn(provider, x, causal, mode, dy):
    def f():
        if provider == "torch":
            return torch_softmax(x, causal)
        return softmax(x, scale=SCALE, causal=causal, backend=provider)

    if mode == "fwd":
        return f
    return lambda: torch.autograd.grad(f(), x, dy)


def usable(provider, device):
    if provider == "torch":
        return True, ""
    if provider == "triton" and device == "cpu":
        return False, "Triton runs on CUDA tensors (the CPU interpreter is for tests)"
    return backends.availability(provider, torch.device(device), "softmax_fwd")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=common.default_device())
    p.add_argument("--quick", action="store_true", help="a few shapes, short timing (smoke test)")
    p.add_argument("--dtypes", default="fp32,bf16,fp16", help="comma list of fp32,bf16,fp16")
    p.add_argument(
        "--shapes",
        default=None,
        help="comma list of ROWSxN (not causal), e.g. 4096x4096; "
        "default: a fixed set per device, causal cases included",
    )
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--no-csv", action="store_true")
    a = p.parse_args(argv)
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench_softmax: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    providers = []
    for prov in a.providers.split(","):
        ok, why = usable(prov, a.device)
        if ok:
            providers.append(prov)
        else:
            print(f"bench_softmax: skipping provider {prov}: {why}", file=sys.stderr)
    env = common.env_info(a.device)
    shapes = [(s, False) for s in SHAPES[(dev, False)]] + [(s, True) for s in SHAPES[(dev, True)]]
    if a.shapes:
        shapes = [(tuple(int(d) for d in s.split("x")), False) for s in a.shapes.split(",")]
    if a.quick:
        shapes = [((256, 1024), False), ((8, 32000), False), ((64, 512), True)]
    all_rows, failures = [], 0
    for (rows, n), causal in shapes:
        for dt in a.dtypes.split(","):
            dtype = DTYPES[dt]
            for mode in a.modes.split(","):
                g = torch.Generator().manual_seed(0)
                shape = (rows // n, n, n) if causal and rows >= n else ((1, rows, n) if causal else (rows, n))
                x = (torch.randn(shape, generator=g) * 4).to(a.device, dtype).requires_grad_(mode == "fwd_bwd")
                dy = torch.randn(shape, generator=g).to(a.device, dtype)
                with torch.no_grad():
                    ref = torch_softmax(x, causal)
                best, checks = {}, {}
                for prov in providers:
                    try:
                        if prov != "torch":
                            with torch.no_grad():
                                out = softmax(x, scale=SCALE, causal=causal, backend=prov)
                            err = (out.float() - ref.float()).abs().max().item()
                            checks[prov] = "ok" if err <= (1e-5 if dt == "fp32" else 2e-2) else f"mismatch {err:.2g}"
                        best[prov] = common.time_ms(make_fn(prov, x, causal, mode, dy), a.device, quick=a.quick)
                    except Exception as e:  # one broken provider must not stop the others
                        failures += 1
                        print(f"bench_softmax: {prov} failed: {e!r}", file=sys.stderr)
                gb = softmax_bytes(x.numel() // n, n, dtype.itemsize, mode) / 1e9
                out_rows = [
                    {
                        **env,
                        "op": "softmax",
                        "mode": mode,
                        "causal": causal,
                        "dtype": dt,
                        "shape": "x".join(map(str, shape)),
                        "provider": prov,
                        "ms": round(ms, 4),
                        "gbps": round(gb / (ms / 1e3), 2),
                        "speedup_vs_torch": round(best["torch"] / ms, 3) if "torch" in best else "",
                        "check": checks.get(prov, ""),
                    }
                    for prov, ms in best.items()
                ]
                for r in out_rows:
                    print(
                        f"{r['mode']:>7} causal={r['causal']!s:5} {dt:>4} {r['shape']:>14} {r['provider']:>6} "
                        f"{r['ms']:9.3f} ms {r['gbps']:7.1f} GB/s x{common.fmt(r['speedup_vs_torch'])} {r['check']}",
                        file=sys.stderr,
                    )
                if not a.no_csv:
                    common.append_csv(Path(a.out_dir) / "softmax.csv", out_rows, COLUMNS)
                all_rows += out_rows
    common.print_table(all_rows, TABLE_COLUMNS, title=f"softmax on {env['device_name']} ({env['commit']})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
