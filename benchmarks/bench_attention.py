"""Attention benchmark: dense flash attention (TFLOP/s) and decode over a paged KV cache (GB/s).

Providers (same process, same inputs):
  dense   torch   F.scaled_dot_product_attention on (batch, heads, seq, dim) views (enable_gqa)
          flash   flash_attn.flash_attn_func (CUDA, when flash-attn is installed)
          cpu     plm_engine's C++ CPU kernels (forward and backward)
          triton  plm_engine's Triton kernels (CUDA)
  paged   torch   gather the blocks of each sequence through the block table, then SDPA (decode)
          cpu / triton / cuda   plm_engine.ops.paged_attention on that backend
Dense cases: mode (fwd, fwd_bwd) x causal x dtype x head_dim x seqlen, at a constant number of tokens
on CUDA (batch = tokens // seqlen, n_heads = 2048 // head_dim); on CPU the SmolLM2 shape (9 heads,
3 KV heads, head_dim 64; --heads changes it), batch 1. Paged cases: dtype x batch x context x block_size, one query token
per sequence, every sequence holding `context` tokens in shuffled blocks.

Derived figures (formulas in attn_flops / paged_bytes):
  TFLOP/s  4 * b * h * sq * sk * d for the forward (two matmuls), halved when causal with sq == sk;
           the backward counts 2.5x the forward (five matmuls), so fwd_bwd = 3.5x the forward, as in
           FlashAttention's benchmarks.
  GB/s     bytes of K and V read (every cached token once) + q read + out written.
Each row also has the speedup over the torch provider measured in the same run. Rows are appended to
<out-dir>/attention.csv (default benchmarks/results/attention.csv).

    python benchmarks/bench_attention.py --device cpu                 # the CPU grid
    python benchmarks/bench_attention.py --quick --no-csv             # smoke test (seconds)
    python benchmarks/bench_attention.py --device cuda --out-dir $OUT --time-budget 240
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
DENSE_PROVIDERS = ("torch", "flash", "cpu", "triton")
PAGED_PROVIDERS = ("torch", "cpu", "triton", "cuda")
COLUMNS = [
    *common.ENV_COLUMNS,
    "kind",
    "mode",
    "causal",
    "dtype",
    "shape",
    "provider",
    "ms",
    "tflops",
    "gbps",
    "speedup_vs_torch",
    "check",
]
TABLE_COLUMNS = [
    "kind",
    "mode",
    "causal",
    "dtype",
    "shape",
    "provider",
    "ms",
    "tflops",
    "gbps",
    "speedup_vs_torch",
    "check",
]
CUDA_TOKENS = 16384


@dataclass(frozen=True)
class Dense:
    mode: str  # "fwd" | "fwd_bwd"
    causal: bool
    dtype: str
    b: int
    s: int
    h: int
    hkv: int
    d: int

    @property
    def labels(self) -> dict:
        return {
            "kind": "dense",
            "mode": self.mode,
            "causal": self.causal,
            "dtype": self.dtype,
            "shape": f"b{self.b} s{self.s} h{self.h}/{self.hkv} d{self.d}",
        }


@dataclass(frozen=True)
class Paged:
    dtype: str
    b: int
    ctx: int
    block: int
    h: int
    hkv: int
    d: int

    @property
    def labels(self) -> dict:
        return {
            "kind": "paged",
            "mode": "decode",
            "causal": True,
            "dtype": self.dtype,
            "shape": f"b{self.b} ctx{self.ctx} blk{self.block} h{self.h}/{self.hkv} d{self.d}",
        }


def attn_flops(c: Dense) -> float:
    """Matmul FLOPs: QK^T and PV are 2 * sq * sk * d each per head; causal (sq == sk) does half;
    the backward is 2.5x the forward (dV, dP, dS->dQ, dK: five matmuls against the forward's two)."""
    f = 4.0 * c.b * c.h * c.s * c.s * c.d / (2 if c.causal else 1)
    return f if c.mode == "fwd" else 3.5 * f


def paged_bytes(c: Paged) -> float:
    """Every cached K and V row read once, q read and out written once."""
    e = DTYPES[c.dtype].itemsize
    return (2 * c.b * c.ctx * c.hkv * c.d + 2 * c.b * c.h * c.d) * e


# ---- cases -------------------------------------------------------------------------------------------


def dense_cases(a, dev: str) -> list[Dense]:
    dtypes = (a.dtypes or ("fp32,bf16" if dev == "cpu" else "bf16")).split(",")
    modes = (a.modes or ("fwd" if dev == "cpu" else "fwd,fwd_bwd")).split(",")
    causals = [c == "causal" for c in (a.causal or ("causal" if dev == "cpu" else "causal,full")).split(",")]
    out = []
    if dev == "cpu":
        seqlens = [int(s) for s in a.seqlens.split(",")] if a.seqlens else ([256] if a.quick else [512, 1024, 2048])
        for dt in dtypes:
            for s in seqlens:
                for causal in causals:
                    for mode in modes:
                        out.append(Dense(mode, causal, dt, 1, s, *cpu_heads(a), 64))
        return out
    seqlens = (
        [int(s) for s in a.seqlens.split(",")]
        if a.seqlens
        else ([1024] if a.quick else [512, 1024, 2048, 4096, 8192, 16384])
    )
    head_dims = [128] if a.quick else [64, 128]
    for dt in dtypes:
        for d in head_dims:
            for s in seqlens:
                for causal in causals:
                    for mode in modes:
                        out.append(Dense(mode, causal, dt, max(1, CUDA_TOKENS // s), s, 2048 // d, 2048 // d, d))
    return out


def cpu_heads(a) -> tuple[int, int]:
    """(n_heads, n_kv_heads) of the CPU dense cases: --heads 8 (MHA) or 9/3 (GQA; the default)."""
    h, _, hkv = (a.heads or "9/3").partition("/")
    return int(h), int(hkv or h)


def paged_cases(a, dev: str) -> list[Paged]:
    dtypes = (a.dtypes or ("fp32,bf16" if dev == "cpu" else "bf16")).split(",")
    if dev == "cpu":
        # SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64
        grid = (
            [(2, 1024, 16)]
            if a.quick
            else [(1, 1024, 16), (1, 8192, 256), (4, 2048, 16), (16, 1024, 16), (16, 4096, 64), (16, 8192, 128)]
        )
        return [Paged(dt, b, ctx, blk, 9, 3, 64) for dt in dtypes for b, ctx, blk in grid]
    # Llama-8B-like: 32 query heads, 8 KV heads, head_dim 128
    grid = (
        [(8, 4096, 16)]
        if a.quick
        else [(b, ctx, 16) for b in (1, 8, 32, 64) for ctx in (1024, 8192, 32768) if b * ctx <= 64 * 16384]
        + [(8, 8192, 256)]
    )
    return [Paged(dt, b, ctx, blk, 32, 8, 128) for dt in dtypes for b, ctx, blk in grid]


# ---- providers ---------------------------------------------------------------------------------------


def flash_attn_func():
    try:
        from flash_attn import flash_attn_func as f
    except ImportError:
        return None
    return f


def usable(provider: str, kind: str, device: str) -> tuple[bool, str]:
    if provider == "torch":
        return True, ""
    if provider == "flash":
        if kind != "dense" or not device.startswith("cuda"):
            return False, "flash-attn runs dense attention on CUDA"
        return (True, "") if flash_attn_func() is not None else (False, "flash-attn is not installed")
    if provider == "triton" and device == "cpu":
        return False, "Triton runs on CUDA tensors (the CPU interpreter is for tests)"
    return backends.availability(provider, torch.device(device), "attn_fwd" if kind == "dense" else "paged_attn")


def dense_impl(provider: str, c: Dense):
    """out = f(q, k, v) with q (b, s, h, d) and k, v (b, s, hkv, d)."""
    if provider == "torch":

        def f(q, k, v):
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=c.causal, enable_gqa=c.hkv != c.h
            )
            return o.transpose(1, 2)

        return f
    if provider == "flash":
        fa = flash_attn_func()
        return lambda q, k, v: fa(q, k, v, causal=c.causal)
    return lambda q, k, v: ops.attention(q, k, v, causal=c.causal, backend=provider)


def dense_inputs(c: Dense, device: str):
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[c.dtype]

    def t(*shape):
        return torch.randn(*shape, generator=g).to(device, dt).requires_grad_(c.mode == "fwd_bwd")

    q, k, v = t(c.b, c.s, c.h, c.d), t(c.b, c.s, c.hkv, c.d), t(c.b, c.s, c.hkv, c.d)
    dout = torch.randn(c.b, c.s, c.h, c.d, generator=g).to(device, dt)
    return (q, k, v), dout


def dense_runner(impl, c: Dense, qkv, dout):
    if c.mode == "fwd":
        return lambda: impl(*qkv)
    return lambda: torch.autograd.grad(impl(*qkv), qkv, dout)


def paged_inputs(c: Paged, device: str):
    """Caches with every sequence's blocks scattered (a random permutation of the physical blocks)."""
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[c.dtype]
    nblk = (c.ctx + c.block - 1) // c.block
    num_blocks = c.b * nblk
    k_cache = torch.randn(num_blocks, c.block, c.hkv, c.d, generator=g).to(device, dt)
    v_cache = torch.randn(num_blocks, c.block, c.hkv, c.d, generator=g).to(device, dt)
    block_table = torch.randperm(num_blocks, generator=g).reshape(c.b, nblk).to(device, torch.int32)
    seqlens = torch.full((c.b,), c.ctx, dtype=torch.int32, device=device)
    q = torch.randn(c.b, 1, c.h, c.d, generator=g).to(device, dt)
    return q, k_cache, v_cache, block_table, seqlens


def paged_impl(provider: str, c: Paged):
    if provider == "torch":

        def gather_sdpa(q, k_cache, v_cache, block_table, seqlens):
            # Every sequence holds c.ctx tokens here, so one gather + one SDPA covers the batch.
            idx = block_table.long()
            k = k_cache[idx].reshape(c.b, -1, c.hkv, c.d)[:, : c.ctx]
            v = v_cache[idx].reshape(c.b, -1, c.hkv, c.d)[:, : c.ctx]
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=c.hkv != c.h
            )
            return o.transpose(1, 2)

        return gather_sdpa
    return lambda *args: ops.paged_attention(*args, backend=provider)


def check(out, ref, dtype) -> str:
    """A provider's output against torch's: a fast wrong kernel is no result."""
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    err = (out.detach().float() - ref.detach().float()).abs().max().item()
    return "ok" if err <= tol * max(1.0, ref.detach().float().abs().max().item()) else f"mismatch {err:.2g}"


# ---- main --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default=common.default_device(), help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="one small case per kind, short timing (CI smoke test)")
    p.add_argument("--kinds", default="dense,paged")
    p.add_argument("--providers", default=None, help="comma list (default: every provider usable on the device)")
    p.add_argument(
        "--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: fp32,bf16 on CPU, bf16 on CUDA)"
    )
    p.add_argument("--modes", default=None, help="dense: fwd,fwd_bwd (default: fwd on CPU, both on CUDA)")
    p.add_argument("--causal", default=None, help="dense: causal,full (default: causal on CPU, both on CUDA)")
    p.add_argument("--seqlens", default=None, help="dense seqlens, e.g. 512,2048")
    p.add_argument("--heads", default=None, help="CPU dense: n_heads[/n_kv_heads], e.g. 8 or 9/3 (default 9/3)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time each case this many rounds, providers interleaved, keeping each one's best median",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop starting new cases after this many seconds (the rows so far are kept)",
    )
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR), help="where attention.csv is appended")
    p.add_argument("--no-csv", action="store_true", help="do not append to the CSV")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines instead of a table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    device = a.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_attention: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    dev = "cuda" if device.startswith("cuda") else "cpu"
    env = common.env_info(device)
    csv_path = Path(a.out_dir) / "attention.csv"
    start = time.monotonic()
    all_rows, failures = [], 0
    work = []
    kinds = a.kinds.split(",")
    if "dense" in kinds:
        work += [("dense", c) for c in dense_cases(a, dev)]
    if "paged" in kinds:
        work += [("paged", c) for c in paged_cases(a, dev)]
    wanted = a.providers.split(",") if a.providers else None
    skipped_note = set()
    for kind, c in work:
        if a.time_budget is not None and time.monotonic() - start > a.time_budget:
            print(
                f"bench_attention: time budget of {a.time_budget:.0f} s spent; skipping the other cases",
                file=sys.stderr,
            )
            break
        providers = []
        for p in DENSE_PROVIDERS if kind == "dense" else PAGED_PROVIDERS:
            if wanted is not None and p not in wanted:
                continue
            ok, why = usable(p, kind, device)
            if ok:
                providers.append(p)
            elif (p, kind) not in skipped_note:
                skipped_note.add((p, kind))
                print(f"bench_attention: skipping provider {p} for {kind}: {why}", file=sys.stderr)
        fns, checks, best = {}, {}, {}
        try:
            if kind == "dense":
                qkv, dout = dense_inputs(c, device)
                with torch.no_grad():
                    ref = dense_impl("torch", c)(*qkv)
                impls = {p: dense_impl(p, c) for p in providers}
            else:
                args = paged_inputs(c, device)
                ref = paged_impl("torch", c)(*args)
                impls = {p: paged_impl(p, c) for p in providers}
        except Exception as e:  # e.g. out of memory for the largest shapes
            failures += 1
            print(f"bench_attention: could not set up {c.labels}: {e!r}", file=sys.stderr)
            continue
        for p, impl in impls.items():
            try:
                if kind == "dense":
                    if p != "torch":
                        with torch.no_grad():
                            checks[p] = check(impl(*qkv), ref, DTYPES[c.dtype])
                    fns[p] = dense_runner(impl, c, qkv, dout)
                else:
                    if p != "torch":
                        checks[p] = check(impl(*args), ref, DTYPES[c.dtype])
                    fns[p] = lambda impl=impl, args=args: impl(*args)
            except Exception as e:  # a broken provider must not stop the others
                failures += 1
                print(f"bench_attention: {p} failed on {c.labels}: {e!r}", file=sys.stderr)
                traceback.print_exc(limit=3)
        del ref
        for _ in range(max(1, a.repeat)):
            for p, fn in fns.items():
                try:
                    ms = common.time_ms(fn, device, quick=a.quick)
                except Exception as e:
                    failures += 1
                    print(f"bench_attention: timing {p} failed on {c.labels}: {e!r}", file=sys.stderr)
                    continue
                best[p] = min(ms, best.get(p, float("inf")))
        rows = []
        for p, ms in best.items():
            sec = ms / 1e3
            rows.append(
                {
                    **env,
                    **c.labels,
                    "provider": p,
                    "ms": round(ms, 4),
                    "tflops": round(attn_flops(c) / sec / 1e12, 4) if kind == "dense" else "",
                    "gbps": round(paged_bytes(c) / sec / 1e9, 2) if kind == "paged" else "",
                    "speedup_vs_torch": round(best["torch"] / ms, 3) if "torch" in best else "",
                    "check": checks.get(p, ""),
                }
            )
        if a.json:
            common.print_json_lines(rows)
        else:
            for r in rows:
                fig = f"{r['tflops']:8.3f} TFLOP/s" if kind == "dense" else f"{r['gbps']:8.1f} GB/s"
                print(
                    f"{r['kind']:>5} {r['mode']:>7} {'causal' if r['causal'] else 'full':>6} {r['dtype']:>4} "
                    f"{r['shape']:>28} {r['provider']:>6} {r['ms']:9.3f} ms {fig}  "
                    f"x{common.fmt(r['speedup_vs_torch'])} {r['check']}",
                    file=sys.stderr,
                )
        if not a.no_csv:
            common.append_csv(csv_path, rows, COLUMNS)  # per case, so a run cut short keeps what it measured
        all_rows += rows
        del fns, impls
    if not a.json:
        common.print_table(all_rows, TABLE_COLUMNS, title=f"attention on {env['device_name']} ({env['commit']})")
    if not a.no_csv and all_rows:
        print(f"appended {len(all_rows)} rows to {csv_path}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
