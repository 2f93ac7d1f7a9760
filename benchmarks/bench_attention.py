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
Rows: <out-dir>/attention.csv, with the speedup over torch measured in the same run.

    python benchmarks/bench_attention.py --device cpu                 # the CPU grid
    python benchmarks/bench_attention.py --quick --no-csv             # smoke test (seconds)
    python benchmarks/bench_attention.py --device cuda --out-dir $OUT --time-budget 240
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import common
import torch
import torch.nn.functional as F

from plm_engine import ops

# Dense outputs accumulate over thousands of keys: a looser bf16 check than the elementwise ops'.
TOLERANCE = {**common.TOLERANCE, torch.bfloat16: 3e-2}
PROVIDERS = ("torch", "flash", "cpu", "triton", "cuda")
KIND_PROVIDERS = {"dense": ("torch", "flash", "cpu", "triton"), "paged": ("torch", "cpu", "triton", "cuda")}
KIND_OPS = {"dense": "attn_fwd", "paged": "paged_attn"}
COLUMNS = ["kind", "mode", "causal", "dtype", "shape", "provider", "ms", "tflops", "gbps", "speedup_vs_torch", "check"]
CUDA_TOKENS = 16384


@dataclass(frozen=True)
class Case:
    kind: str  # "dense" | "paged" (decode: one query token per sequence)
    mode: str  # dense: "fwd" | "fwd_bwd"; paged: "decode"
    causal: bool
    dtype: str
    b: int
    s: int  # dense: seqlen; paged: tokens cached per sequence
    h: int
    hkv: int
    d: int
    block: int = 0  # paged: tokens per cache block

    @property
    def labels(self) -> dict:
        shape = f"s{self.s}" if self.kind == "dense" else f"ctx{self.s} blk{self.block}"
        shape = f"b{self.b} {shape} h{self.h}/{self.hkv} d{self.d}"
        return {"kind": self.kind, "mode": self.mode, "causal": self.causal, "dtype": self.dtype, "shape": shape}


def attn_flops(c: Case) -> float | None:
    """Dense: matmul FLOPs. QK^T and PV are 2 * sq * sk * d each per head; causal (sq == sk) does half;
    the backward is 2.5x the forward (dV, dP, dS->dQ, dK: five matmuls against the forward's two)."""
    if c.kind != "dense":
        return None
    f = 4.0 * c.b * c.h * c.s * c.s * c.d / (2 if c.causal else 1)
    return f if c.mode == "fwd" else 3.5 * f


def paged_bytes(c: Case) -> float | None:
    """Paged: every cached K and V row read once, q read and out written once."""
    if c.kind != "paged":
        return None
    return (2 * c.b * c.s * c.hkv * c.d + 2 * c.b * c.h * c.d) * common.DTYPES[c.dtype].itemsize


# ---- cases -------------------------------------------------------------------------------------------


def dense_cases(a, dev: str) -> list[Case]:
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
                        out.append(Case("dense", mode, causal, dt, 1, s, *cpu_heads(a), 64))
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
                        b, h = max(1, CUDA_TOKENS // s), 2048 // d
                        out.append(Case("dense", mode, causal, dt, b, s, h, h, d))
    return out


def cpu_heads(a) -> tuple[int, int]:
    """(n_heads, n_kv_heads) of the CPU dense cases: --heads 8 (MHA) or 9/3 (GQA; the default)."""
    h, _, hkv = (a.heads or "9/3").partition("/")
    return int(h), int(hkv or h)


def paged_cases(a, dev: str) -> list[Case]:
    dtypes = (a.dtypes or ("fp32,bf16" if dev == "cpu" else "bf16")).split(",")
    if dev == "cpu":
        # SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64
        grid = (
            [(2, 1024, 16)]
            if a.quick
            else [(1, 1024, 16), (1, 8192, 256), (4, 2048, 16), (16, 1024, 16), (16, 4096, 64), (16, 8192, 128)]
        )
        return [Case("paged", "decode", True, dt, b, ctx, 9, 3, 64, blk) for dt in dtypes for b, ctx, blk in grid]
    # Llama-8B-like: 32 query heads, 8 KV heads, head_dim 128
    grid = (
        [(8, 4096, 16)]
        if a.quick
        else [(b, ctx, 16) for b in (1, 8, 32, 64) for ctx in (1024, 8192, 32768) if b * ctx <= 64 * 16384]
        + [(8, 8192, 256)]
    )
    return [Case("paged", "decode", True, dt, b, ctx, 32, 8, 128, blk) for dt in dtypes for b, ctx, blk in grid]


# ---- providers ---------------------------------------------------------------------------------------


def flash_attn_func():
    try:
        from flash_attn import flash_attn_func as f
    except ImportError:
        return None
    return f


def usable(provider: str, device: str, op: str) -> tuple[bool, str]:
    if provider == "flash":
        if op != "attn_fwd" or not device.startswith("cuda"):
            return False, "flash-attn runs dense attention on CUDA"
        return (True, "") if flash_attn_func() is not None else (False, "flash-attn is not installed")
    return common.provider_usable(provider, device, op)


def dense_impl(provider: str, c: Case):
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


def paged_inputs(c: Case, device: str):
    """Caches with every sequence's blocks scattered (a random permutation of the physical blocks)."""
    g = torch.Generator().manual_seed(0)
    dt = common.DTYPES[c.dtype]
    nblk = (c.s + c.block - 1) // c.block
    num_blocks = c.b * nblk
    k_cache = torch.randn(num_blocks, c.block, c.hkv, c.d, generator=g).to(device, dt)
    v_cache = torch.randn(num_blocks, c.block, c.hkv, c.d, generator=g).to(device, dt)
    block_table = torch.randperm(num_blocks, generator=g).reshape(c.b, nblk).to(device, torch.int32)
    seqlens = torch.full((c.b,), c.s, dtype=torch.int32, device=device)
    q = torch.randn(c.b, 1, c.h, c.d, generator=g).to(device, dt)
    return q, k_cache, v_cache, block_table, seqlens


def paged_impl(provider: str, c: Case):
    if provider == "torch":

        def gather_sdpa(q, k_cache, v_cache, block_table, seqlens):
            # Every sequence holds c.s tokens here, so one gather + one SDPA covers the batch.
            idx = block_table.long()
            k = k_cache[idx].reshape(c.b, -1, c.hkv, c.d)[:, : c.s]
            v = v_cache[idx].reshape(c.b, -1, c.hkv, c.d)[:, : c.s]
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=c.hkv != c.h
            )
            return o.transpose(1, 2)

        return gather_sdpa
    return lambda *args: ops.paged_attention(*args, backend=provider)


def setup(c: Case, device: str):
    if c.kind == "paged":
        return common.against_torch(lambda p: paged_impl(p, c), paged_inputs(c, device), tolerance=TOLERANCE)
    g = torch.Generator().manual_seed(0)
    dt = common.DTYPES[c.dtype]

    def t(*shape):
        return torch.randn(*shape, generator=g).to(device, dt).requires_grad_(c.mode == "fwd_bwd")

    qkv = (t(c.b, c.s, c.h, c.d), t(c.b, c.s, c.hkv, c.d), t(c.b, c.s, c.hkv, c.d))
    dout = torch.randn(c.b, c.s, c.h, c.d, generator=g).to(device, dt)
    return common.against_torch(lambda p: dense_impl(p, c), qkv, c.mode, grads=dout, tolerance=TOLERANCE)


# ---- main --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = common.parser("attention", __doc__, PROVIDERS, dtypes="fp32,bf16 on CPU, bf16 on CUDA")
    p.add_argument("--kinds", default="dense,paged")
    p.add_argument("--modes", default=None, help="dense: fwd,fwd_bwd (default: fwd on CPU, both on CUDA)")
    p.add_argument("--causal", default=None, help="dense: causal,full (default: causal on CPU, both on CUDA)")
    p.add_argument("--seqlens", default=None, help="dense seqlens, e.g. 512,2048")
    p.add_argument("--heads", default=None, help="CPU dense: n_heads[/n_kv_heads], e.g. 8 or 9/3 (default 9/3)")
    a = p.parse_args(argv)
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    kinds = common.split_list(a.kinds, "", KIND_OPS, "kind")
    wanted = common.split_list(a.providers, "", PROVIDERS, "provider")
    providers = {
        kind: common.usable_providers(
            "attention", [p for p in wanted if p in KIND_PROVIDERS[kind]], a.device, KIND_OPS[kind], usable
        )
        for kind in kinds
    }
    cases = (dense_cases(a, dev) if "dense" in kinds else []) + (paged_cases(a, dev) if "paged" in kinds else [])
    kw = dict(columns=COLUMNS, flops=attn_flops, bytes_moved=paged_bytes)
    return common.run("attention", a, cases, setup, providers=lambda c: providers[c.kind], **kw)


if __name__ == "__main__":
    sys.exit(main())
