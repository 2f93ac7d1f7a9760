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

rope_bytes() is what GB/s counts: q and k read and written once, plus the cos/sin rows used. The
harness (benchmarks/common.py) appends the rows to <out-dir>/rope.csv.

    python benchmarks/bench_rope.py                     # CPU (or CUDA if present), full set
    python benchmarks/bench_rope.py --quick --no-csv    # smoke test
    python benchmarks/bench_rope.py --device cuda --out-dir $OUT --json
"""

from __future__ import annotations

import itertools
import sys

import common
import torch

from plm_engine.ops.rope import rope, rope_cos_sin

SHAPES = {
    # (batch, seqlen, q_heads, k_heads, head_dim): a Llama-3-8B-like prefill, SmolLM2 (9/3 heads of 64)
    # prefill, and a batched decode step (one token per sequence).
    ("cpu", False): [(1, 2048, 32, 8, 128), (4, 512, 9, 3, 64), (64, 1, 32, 8, 128)],
    ("cpu", True): [(1, 128, 8, 2, 128), (8, 1, 9, 3, 64)],
    ("cuda", False): [(8, 4096, 32, 8, 128), (32, 2048, 9, 3, 64), (256, 1, 32, 8, 128)],
    ("cuda", True): [(2, 1024, 32, 8, 128), (64, 1, 32, 8, 128)],
}
DEFAULT_DTYPES = {"cpu": "fp32,bf16", "cuda": "bf16,fp16,fp32"}
COLUMNS = ["op", "variant", "mode", "dtype", "shape", "provider", "ms", "gbps", "speedup_vs_torch", "check"]


class Case(common.Case):
    """variant: half (NeoX/Llama rotate_half) | interleaved (GPT-J); shape: (batch, seqlen, q_heads,
    k_heads, head_dim)."""

    interleaved = property(lambda self: self.variant == "interleaved")
    batch, seqlen, hq, hk, head_dim = (property(lambda self, i=i: self.shape[i]) for i in range(5))


def rope_bytes(c: Case) -> int:
    """Bytes a perfect kernel moves: q and k read and written once, and the fp32 cos/sin rows of the
    positions used (seqlen rows of head_dim / 2 each). fwd_bwd adds the backward: dq, dk read, dq, dk
    written, the cos/sin rows again."""
    e = common.DTYPES[c.dtype].itemsize
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


def setup(c: Case, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = common.DTYPES[c.dtype]
    grad = c.mode == "fwd_bwd"
    q = torch.randn(c.batch, c.seqlen, c.hq, c.head_dim, generator=g).to(device, dt).requires_grad_(grad)
    k = torch.randn(c.batch, c.seqlen, c.hk, c.head_dim, generator=g).to(device, dt).requires_grad_(grad)
    cos, sin = rope_cos_sin(c.seqlen, c.head_dim, 500000.0, device=device)
    widen = (lambda t: t.repeat_interleave(2, -1)) if c.interleaved else (lambda t: torch.cat((t, t), -1))
    cos_full, sin_full = widen(cos).to(dt), widen(sin).to(dt)
    grads = [torch.randn(q.shape, generator=g).to(device, dt), torch.randn(k.shape, generator=g).to(device, dt)]

    def impl_of(p):  # eager is also the baseline of in place: it has no in-place form
        return eager_rope(c, cos_full, sin_full) if p == "torch" else ours_rope(c, p, cos, sin)

    # In place rotates its own copies every call (the values drift, the cost does not).
    return common.against_torch(impl_of, (q, k), c.mode, grads=grads, inplace=c.mode == "fwd_inplace")


# ---- main ----------------------------------------------------------------------------------------------


def cases(a) -> list[Case]:
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    shapes = common.parse_shapes(a.shapes) if a.shapes else SHAPES[(dev, a.quick)]
    if any(len(s) != 5 for s in shapes):
        raise SystemExit("--shapes takes BxSxHQxHKxD entries")
    dtypes = common.split_list(a.dtypes, DEFAULT_DTYPES[dev], common.DTYPES, "dtype")
    axes = itertools.product(shapes, dtypes, a.variants.split(","), a.modes.split(","))
    return [Case("rope", variant, mode, dt, shape) for shape, dt, variant, mode in axes]


def main(argv=None) -> int:
    modes, shapes = "fwd,fwd_inplace,fwd_bwd", "BxSxHQxHKxD, e.g. 1x2048x32x8x128"
    p = common.parser("rope", __doc__, dtypes="fp32,bf16 on CPU, bf16,fp16,fp32 on CUDA", modes=modes, shapes=shapes)
    p.add_argument("--variants", default="half,interleaved")
    a = p.parse_args(argv)
    return common.run("rope", a, cases(a), setup, op="rope", columns=COLUMNS, bytes_moved=rope_bytes)


if __name__ == "__main__":
    sys.exit(main())
