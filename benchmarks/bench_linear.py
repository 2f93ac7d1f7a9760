"""Linear (y = x @ W^T) benchmark at decode shapes: PyTorch's F.linear against plm_engine's C++ CPU kernel.

Providers (same process, same inputs, timed in interleaved rounds):
  torch    F.linear in the case's dtype
  cpu      plm_engine's C++ kernel (ops.linear(..., backend="cpu"))
and, as the yardstick of a memory-bound kernel, the machine's read bandwidth measured in the same rounds:
torch.sum over an fp32 buffer of the weight's size in bytes (the same cache level as the weight), and
once per run over a 256 MB buffer (printed). Cases: the linear layers of SmolLM2-135M (fused qkv, o, fused gate_up, down, LM head) x rows M (the
decode batch) x dtype. Reported per case and provider: median ms over --repeat rounds (each round a
torch.utils.benchmark median), GB/s of weights read (N * K * itemsize / time: the bandwidth a decode
step needs), and the speedups over F.linear in the same dtype and over F.linear fp32 (the HF default),
both measured in the same run, and bw_frac = GB/s / read_gbps (the fraction of the read bandwidth the
kernel reaches). Rows are appended to <out-dir>/linear.csv.

    python benchmarks/bench_linear.py                         # 2 threads (torch default here)
    python benchmarks/bench_linear.py --threads 1             # single-thread numbers
    python benchmarks/bench_linear.py --quick --no-csv        # smoke test
    PLM_ENGINE_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/bench_linear.py --no-csv              # an AVX2-only CPU, both sides
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from plm_engine import ops  # noqa: E402
from plm_engine.ops import backends  # noqa: E402
from plm_engine.ops.linear import cpu_kernel_isa  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# SmolLM2-135M: hidden 576, 9 query / 3 kv heads of 64, intermediate 1536, vocab 49152. (name, N, K);
# "k" is one unfused k or v projection.
LAYERS = [
    ("qkv", 960, 576),
    ("k", 192, 576),
    ("o", 576, 576),
    ("gate_up", 3072, 576),
    ("down", 576, 1536),
    ("lm_head", 49152, 576),
]
COLUMNS = [
    *common.ENV_COLUMNS,
    "op",
    "layer",
    "shape",
    "m",
    "dtype",
    "provider",
    "isa",
    "ms",
    "ms_best",
    "gbps",
    "read_gbps",
    "bw_frac",
    "speedup_vs_torch",
    "speedup_vs_torch_fp32",
    "check",
]
TABLE_COLUMNS = [
    "layer",
    "shape",
    "m",
    "dtype",
    "provider",
    "ms",
    "gbps",
    "read_gbps",
    "bw_frac",
    "speedup_vs_torch",
    "speedup_vs_torch_fp32",
    "check",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", default="1,4,8,32", help="comma list of row counts M")
    p.add_argument(
        "--dtypes",
        default="bf16,fp32",
        help="comma list of bf16,fp32,fp16 (fp32 is always timed for the torch fp32 baseline)",
    )
    p.add_argument("--layers", default=",".join(name for name, _, _ in LAYERS))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=3, help="interleaved timing rounds per case; the median is kept")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of blocked_autorange per timing")
    p.add_argument("--quick", action="store_true", help="short timings, M=1 and 8, two layers")
    p.add_argument("--device", default="cpu", help="cpu only: CUDA tensors always take F.linear (cuBLAS)")
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR), help="where linear.csv is appended")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines instead of a table")
    return p.parse_args(argv)


def check(out, ref) -> str:
    """A fast wrong kernel is no result: our output against F.linear in fp32 math."""
    err = (out.float() - ref).abs().max().item()
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[out.dtype]
    return "ok" if err <= tol * max(1.0, ref.abs().max().item()) else f"mismatch {err:.2g}"


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.device != "cpu":
        print(f"bench_linear: the kernel is CPU-only (on {a.device} ops.linear is F.linear); nothing to measure")
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    ok, why = backends.availability("cpu", torch.device("cpu"), "linear_fwd")
    if not ok:
        print(f"bench_linear: the C++ kernel is unavailable: {why}", file=sys.stderr)
        return 2
    rows_m = [int(v) for v in a.rows.split(",")]
    layers = [lay for lay in LAYERS if lay[0] in a.layers.split(",")]
    if a.quick:
        rows_m, layers, a.min_time, a.repeat = [1, 8], layers[2:4], 0.05, 1
    dtypes = a.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    env = common.env_info("cpu")
    isa = cpu_kernel_isa()
    big = torch.ones(64 << 20)  # 256 MB
    big_ms = statistics.median(common.time_cpu_ms(big.sum, min_run_time=a.min_time) for _ in range(3))
    print(
        f"read bandwidth (torch.sum, 256 MB fp32, {torch.get_num_threads()} threads): "
        f"{big.numel() * 4 / (big_ms * 1e6):.1f} GB/s",
        file=sys.stderr,
    )
    del big
    g = torch.Generator().manual_seed(0)
    all_rows = []
    for name, n, k in layers:
        w32 = torch.randn(n, k, generator=g) * k**-0.5
        for m in rows_m:
            x32 = torch.randn(m, k, generator=g)
            # Every (dtype, provider) of this case, fp32 torch always (the baseline), timed round-robin.
            fns, checks = {}, {}
            for d in dtypes:  # the read-bandwidth yardstick: a sum over the weight's bytes
                buf = torch.ones(n * k * DTYPES[d].itemsize // 4)
                fns.setdefault((buf.numel(), "read"), buf.sum)
            for d in dict.fromkeys(["fp32", *dtypes]):
                x, w = x32.to(DTYPES[d]), w32.to(DTYPES[d])
                fns[(d, "torch")] = lambda x=x, w=w: F.linear(x, w)
                if d in dtypes:
                    fns[(d, "cpu")] = lambda x=x, w=w: ops.linear(x, w, backend="cpu")
                    checks[d] = check(fns[(d, "cpu")](), F.linear(x.float(), w.float()))
            times = {key: [] for key in fns}
            for _ in range(max(1, a.repeat)):
                for key, fn in fns.items():
                    times[key].append(common.time_cpu_ms(fn, min_run_time=a.min_time))
            ms = {key: statistics.median(v) for key, v in times.items()}
            rows = []
            for (d, provider), t in ms.items():
                if d not in dtypes:
                    continue
                nbytes = n * k * DTYPES[d].itemsize
                read_gbps = nbytes / (ms[(nbytes // 4, "read")] * 1e6)
                rows.append(
                    {
                        **env,
                        "op": "linear",
                        "layer": name,
                        "shape": f"{n}x{k}",
                        "m": m,
                        "dtype": d,
                        "provider": provider,
                        "isa": isa if provider == "cpu" else "",
                        "ms": round(t, 4),
                        "ms_best": round(min(times[(d, provider)]), 4),
                        "gbps": round(nbytes / (t * 1e6), 2),
                        "read_gbps": round(read_gbps, 2),
                        "bw_frac": round(nbytes / (t * 1e6) / read_gbps, 3),
                        "speedup_vs_torch": round(ms[(d, "torch")] / t, 3),
                        "speedup_vs_torch_fp32": round(ms[("fp32", "torch")] / t, 3),
                        "check": checks.get(d, "") if provider == "cpu" else "",
                    }
                )
            if a.json:
                common.print_json_lines(rows)
            else:
                for r in rows:
                    print(
                        f"{r['layer']:>8} {r['shape']:>10} M={m:<3} {r['dtype']:>4} {r['provider']:>5} "
                        f"{r['ms']:8.3f} ms {r['gbps']:6.1f} GB/s ({r['bw_frac']:.2f} of {r['read_gbps']:.1f}) "
                        f"x{r['speedup_vs_torch']:.2f} "
                        f"(x{r['speedup_vs_torch_fp32']:.2f} vs fp32) {r['check']}",
                        file=sys.stderr,
                        flush=True,
                    )
            if not a.no_csv:
                common.append_csv(Path(a.out_dir) / "linear.csv", rows, COLUMNS)
            all_rows += rows
    if not a.json:
        common.print_table(
            all_rows,
            TABLE_COLUMNS,
            title=f"linear on {env['device_name']}, {env['threads']} threads, {isa} ({env['commit']})",
        )
    return 0 if all(r["check"] in ("", "ok") for r in all_rows) else 1


if __name__ == "__main__":
    t0 = time.monotonic()
    rc = main()
    print(f"bench_linear: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    sys.exit(rc)
