"""Linear (y = x @ W^T) benchmark at decode shapes: PyTorch's F.linear against plm_engine's C++ CPU kernel.

Providers (same process, same inputs, timed in interleaved rounds):
  torch    F.linear in the case's dtype
  cpu      plm_engine's C++ kernel (ops.linear(..., backend="cpu"))
and, as the yardstick of a memory-bound kernel, the machine's read bandwidth measured in the same rounds:
torch.sum over an fp32 buffer of the weight's size in bytes (the same cache level as the weight), and
once per run over a 256 MB buffer (printed). Cases: the linear layers of SmolLM2-135M (fused qkv, o,
fused gate_up, down, LM head), each alone (hot in cache), and all of one decode step in order ("step":
its weights come from memory) x rows M (the decode batch) x dtype. Reported per case and provider:
median ms over --repeat rounds (each round a torch.utils.benchmark median), GB/s of weights read
(N * K * itemsize / time: the bandwidth a decode step needs), and the speedups over F.linear in the same
dtype and over F.linear fp32 (the HF default), both measured in the same run, and bw_frac, the fraction
of the read bandwidth the kernel reaches: the median over rounds of GB/s / read GB/s in that round.
Rows are appended to <out-dir>/linear.csv.

    python benchmarks/bench_linear.py                         # 2 threads (torch default here)
    python benchmarks/bench_linear.py --threads 1             # single-thread numbers
    python benchmarks/bench_linear.py --quick --no-csv        # smoke test
    PLM_ENGINE_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/bench_linear.py --no-csv              # an AVX2-only CPU, both sides
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import common
import torch
import torch.nn.functional as F

from plm_engine import ops
from plm_engine.ops.linear import cpu_kernel_isa

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
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
# "step": every linear layer of one SmolLM2-135M decode step (30 blocks of qkv, o, gate_up, down, then the
# LM head), each with its own weight, called in order: 538 MB in fp32, so unlike the single layers above
# (timed over and over, hot in L2/L3) every weight comes from memory, as in generation; its read_gbps is
# that of memory proper.
BLOCK_LAYERS = [lay for lay in LAYERS if lay[0] in ("qkv", "o", "gate_up", "down")]
STEP_LAYERS = BLOCK_LAYERS * 30 + [LAYERS[-1]]
COLUMNS = [
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
    "speedup_vs_torch",
    "speedup_vs_torch_fp32",
    "check",
    "read_gbps",
    "bw_frac",
]
TABLE_COLUMNS = [c for c in COLUMNS if c not in ("op", "isa", "ms_best")]


@dataclass(frozen=True)
class Case:
    layer: str
    n: int
    k: int
    m: int
    dtype: str

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(n, k) for _, n, k in STEP_LAYERS] if self.layer == "step" else [(self.n, self.k)]

    @property
    def labels(self) -> dict:
        shape = "30x4+1" if self.layer == "step" else f"{self.n}x{self.k}"
        return {"op": "linear", "layer": self.layer, "shape": shape, "m": self.m, "dtype": self.dtype}

    @property
    def weight_bytes(self) -> int:
        return sum(n * k for n, k in self.shapes) * common.DTYPES[self.dtype].itemsize


def providers(c: Case) -> list[str]:
    """torch and cpu, and the yardsticks timed in the same rounds: _read (between the two: a sum over as
    many bytes as the weight, the read bandwidth at its cache level) and _torch_fp32 (F.linear in fp32,
    the HF default)."""
    return ["torch", "_read", "cpu"] + ([] if c.dtype == "fp32" else ["_torch_fp32"])


def setup(c: Case, device: str):
    g = torch.Generator().manual_seed(0)
    dtype = common.DTYPES[c.dtype]
    x32 = {k: torch.randn(c.m, k, generator=g) for k in sorted({k for _, k in c.shapes})}
    w32 = [torch.randn(n, k, generator=g) * k**-0.5 for n, k in c.shapes]
    x = {k: v.to(dtype) for k, v in x32.items()}
    w = [t.to(dtype) for t in w32]
    if c.dtype != "fp32":
        del w32[:]  # _torch_fp32 makes them again: only one copy of a step's weights is kept at a time

    def layers(f, xs, ws):  # the layers in order, as a decode step runs them; the outputs in one row
        return lambda: [f(xs[t.shape[1]], t) for t in ws]

    def provider(p):
        if p == "_read":
            return common.Timed(torch.ones(c.weight_bytes // 4).sum)
        if p == "_torch_fp32":
            g32 = torch.Generator().manual_seed(0)
            xs = {k: torch.randn(c.m, k, generator=g32) for k in x}
            return common.Timed(layers(F.linear, xs, [torch.randn(n, k, generator=g32) * k**-0.5 for n, k in c.shapes]))
        if p == "torch":
            return common.Timed(layers(F.linear, x, w))
        run = layers(lambda a, b: ops.linear(a, b, backend="cpu"), x, w)
        ref = torch.cat(layers(lambda a, b: F.linear(a.float(), b.float()), x, w)(), dim=-1)
        return common.Timed(run, common.check_close(torch.cat(run(), dim=-1), ref, TOLERANCE))

    return provider


def derive(c: Case, p: str, ms: dict, times: dict) -> dict:
    read_gbps = c.weight_bytes / (ms["_read"] * 1e6)
    # Round by round: the read bandwidth of a shared machine drifts (other tenants), and the kernel's
    # round and the yardstick's run back to back, so their ratio drifts less than either.
    bw_frac = statistics.median(r / t for r, t in zip(times["_read"], times[p], strict=True))
    return {
        "isa": cpu_kernel_isa() if p == "cpu" else "",
        "ms_best": round(min(times[p]), 4),
        "read_gbps": round(read_gbps, 2),
        "bw_frac": round(bw_frac, 3),
        "speedup_vs_torch_fp32": round(ms.get("_torch_fp32", ms["torch"]) / ms[p], 3),
    }


def main(argv=None) -> int:
    p = common.parser("linear", __doc__, ("torch", "cpu"))
    p.add_argument("--rows", default=None, help="comma list of row counts M (default: 1,4,8,32; quick: 1,8)")
    p.add_argument(
        "--dtypes", default="bf16,fp32", help="comma list of bf16,fp32,fp16 (F.linear fp32 is always timed too)"
    )
    p.add_argument(
        "--layers", default=None, help="comma list of layer names, or step (default: all and step; quick: o,gate_up)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of blocked_autorange per timing")
    p.set_defaults(repeat=3, device="cpu")
    a = p.parse_args(argv)
    if a.device != "cpu":
        print(f"bench_linear: the kernel is CPU-only (on {a.device} ops.linear is F.linear); nothing to measure")
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    if not common.usable_providers("linear", ["cpu"], "cpu", "linear_fwd"):
        return 2
    if a.quick:
        a.min_time, a.repeat = 0.05, 1
    rows_m = [int(v) for v in common.split_list(a.rows, "1,8" if a.quick else "1,4,8,32")]
    known = [n for n, _, _ in LAYERS] + ["step"]
    names = common.split_list(a.layers, "o,gate_up" if a.quick else ",".join(known))
    layers = [
        lay for lay in LAYERS + [("step", 0, 0)] if lay[0] in common.split_list(",".join(names), "", known, "layer")
    ]
    dtypes = common.split_list(a.dtypes, "", common.DTYPES, "dtype")
    big = torch.ones(64 << 20)  # 256 MB: the bandwidth of memory proper
    big_ms = statistics.median(common.time_cpu_ms(big.sum, min_run_time=a.min_time) for _ in range(3))
    print(
        f"read bandwidth (torch.sum, 256 MB fp32, {torch.get_num_threads()} threads): "
        f"{big.numel() * 4 / (big_ms * 1e6):.1f} GB/s",
        file=sys.stderr,
    )
    del big
    cases = [Case(name, n, k, m, d) for name, n, k in layers for m in rows_m for d in dtypes]
    return common.run(
        "linear",
        a,
        cases,
        setup,
        providers=providers,
        columns=COLUMNS,
        table=TABLE_COLUMNS,
        bytes_moved=lambda c: c.weight_bytes,
        derive=derive,
        reduce=statistics.median,
        timer=lambda fn: common.time_cpu_ms(fn, min_run_time=a.min_time),
    )


if __name__ == "__main__":
    t0 = time.monotonic()
    rc = main()
    print(f"bench_linear: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    sys.exit(rc)
