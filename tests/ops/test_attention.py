"""Attention on every backend against the fp64 reference: dense, varlen, paged decode, KV writes."""

from __future__ import annotations

import pytest
import torch

from plm_engine import ops
from plm_engine.ops import backends
from plm_engine.ops.reference import (
    attention_ref,
    attention_varlen_ref,
    gather_paged_kv,
    paged_attention_ref,
    write_kv_cache_ref,
)
from tests.utils import ATOL, device_backends, max_err

DENSE = device_backends("attn_fwd")
VARLEN = device_backends("attn_varlen_fwd")
PAGED = device_backends("paged_attn")
WRITE = device_backends("write_kv_cache")


def dtypes_for(device, backend):
    # fp32 runs on the CPU kernels and the reference; the GPU kernels are fp16/bf16 only.
    low = [torch.float16, torch.bfloat16]
    return low if device == "cuda" or backend == "triton" else [torch.float32] + low


def lowp_attention(q, k, v, causal, scale):
    """PyTorch attention in the inputs' low precision (FlashAttention's test baseline): scores and P @ V
    in the low dtype, softmax in fp32. The 2x rule compares our error against this one's."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    kk, vv = k.repeat_interleave(h // hkv, dim=2), v.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk).float() * scale
    if causal:
        i = torch.arange(sq).unsqueeze(1)
        j = torch.arange(sk).unsqueeze(0)
        s = s.masked_fill((j > i + sk - sq).to(s.device), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


def check_2x(ours, ref, lowp, dtype, what):
    assert torch.isfinite(ours).all(), f"{what}: NaN/inf in output"
    e_ours, e_low = max_err(ours, ref), max_err(lowp, ref)
    bound = 2 * e_low + ATOL[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
    assert e_ours <= bound, f"{what}: error {e_ours:.3g} > 2 x low-precision torch's {e_low:.3g} + atol ({bound:.3g})"


def rand(*shape, device, dtype, gen):
    return torch.randn(*shape, generator=gen).to(device, dtype)


# (batch, seqlen_q, seqlen_k, n_heads, n_kv_heads, head_dim): seqlens 1, 17, 97, 128, 257, sq != sk,
# MHA / GQA / MQA, head_dim 40 / 64 / 80 / 128.
DENSE_SHAPES = [
    (2, 17, 17, 4, 2, 64),
    (1, 97, 128, 2, 1, 40),
    (1, 1, 257, 3, 3, 128),
    (2, 128, 97, 4, 4, 80),
    (1, 257, 257, 2, 1, 64),
]


@pytest.mark.parametrize("device,backend", DENSE)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_forward_backward(device, backend, shape, causal):
    b, sq, sk, h, hkv, d = shape
    for dtype in dtypes_for(device, backend):
        g = torch.Generator().manual_seed(sum(shape) + causal)
        q = rand(b, sq, h, d, device=device, dtype=dtype, gen=g).requires_grad_()
        k = rand(b, sk, hkv, d, device=device, dtype=dtype, gen=g).requires_grad_()
        v = rand(b, sk, hkv, d, device=device, dtype=dtype, gen=g).requires_grad_()
        dout = rand(b, sq, h, d, device=device, dtype=dtype, gen=g)
        out, lse = ops.attention(q, k, v, causal=causal, return_lse=True, backend=backend)
        assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, h, sq) and lse.dtype == torch.float32
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, ref_lse = attention_ref(q64, k64, v64, causal, return_lse=True)
        scale = d**-0.5
        check_2x(
            out, ref, lowp_attention(q.detach(), k.detach(), v.detach(), causal, scale), dtype, f"{backend} {dtype} out"
        )
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly where every key is masked"
        assert max_err(lse[finite], ref_lse[finite]) < 1e-2 + 1e-3 * ref_lse[finite].abs().max().item()
        if causal and sq > sk:
            assert (out[:, : sq - sk] == 0).all(), "queries with every key masked must output zeros"

        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        low_grads = torch.autograd.grad(lowp_attention(ql, kl, vl, causal, scale), (ql, kl, vl), dout)
        for name, ours, r, lowg in zip("qkv", grads, ref_grads, low_grads):
            assert ours.dtype == dtype
            check_2x(ours, r, lowg, dtype, f"{backend} {dtype} d{name}")


def varlen_case(device, dtype, lens_q, lens_k, h, hkv, d, gen):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    q = rand(sum(lens_q), h, d, device=device, dtype=dtype, gen=gen)
    k = rand(sum(lens_k), hkv, d, device=device, dtype=dtype, gen=gen)
    v = rand(sum(lens_k), hkv, d, device=device, dtype=dtype, gen=gen)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("device,backend", VARLEN)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_varlen(device, backend, causal):
    lens_q, lens_k = [1, 17, 64, 5, 33], [1, 17, 97, 5, 40]  # mixed, including 1, some sk > sq
    h, hkv, d = 4, 2, 64
    for dtype in dtypes_for(device, backend):
        g = torch.Generator().manual_seed(3)
        q, k, v, cu_q, cu_k = varlen_case(device, dtype, lens_q, lens_k, h, hkv, d, g)
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        out, lse = ops.attention_varlen(
            q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, return_lse=True, backend=backend
        )
        assert lse.shape == (h, q.shape[0])
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = attention_varlen_ref(q64, k64, v64, cu_q, cu_k, causal=causal)
        # Each sequence's low-precision baseline, packed like the output.
        lows = []
        for i in range(len(lens_q)):
            sl_q, sl_k = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            lows.append(
                lowp_attention(q[sl_q][None].detach(), k[sl_k][None].detach(), v[sl_k][None].detach(), causal, d**-0.5)[
                    0
                ]
            )
        check_2x(out, ref, torch.cat(lows), dtype, f"{backend} {dtype} varlen out")
        dout = torch.randn(out.shape, generator=g).to(device, dtype)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
        for name, ours, r in zip("qkv", grads, ref_grads):
            # Per-sequence low-precision grads would repeat the dense test; bound by the dtype instead.
            tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
            assert max_err(ours, r) <= tol * max(1.0, r.abs().max().item()), f"varlen d{name}"


def paged_case(device, dtype, seqlens, sq, h, hkv, d, block_size, gen):
    """A paged cache whose blocks are shuffled across sequences, with unused blocks in between."""
    b = len(seqlens)
    max_blocks = max((n + block_size - 1) // block_size for n in seqlens) + 1
    num_blocks = b * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = perm[: b * max_blocks].reshape(b, max_blocks).to(torch.int32).to(device)
    k_cache = rand(num_blocks, block_size, hkv, d, device=device, dtype=dtype, gen=gen)
    v_cache = rand(num_blocks, block_size, hkv, d, device=device, dtype=dtype, gen=gen)
    q = rand(b, sq, h, d, device=device, dtype=dtype, gen=gen)
    cache_seqlens = torch.tensor(seqlens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, block_table, cache_seqlens


@pytest.mark.parametrize("device,backend", PAGED)
@pytest.mark.parametrize("block_size,sq", [(16, 1), (32, 4), (256, 1)])
def test_paged_attention(device, backend, block_size, sq):
    seqlens = [1 if sq == 1 else sq, 17, 300, 64]  # partly filled last blocks, one full block
    h, hkv, d = 6, 2, 64
    for dtype in dtypes_for(device, backend):
        g = torch.Generator().manual_seed(block_size + sq)
        q, kc, vc, bt, cs = paged_case(device, dtype, seqlens, sq, h, hkv, d, block_size, g)
        out = ops.paged_attention(q, kc, vc, bt, cs, backend=backend)
        ref = paged_attention_ref(q.double(), kc.double(), vc.double(), bt, cs)
        lows = []
        for i, n in enumerate(seqlens):
            kb, vb = gather_paged_kv(kc, bt, n, i), gather_paged_kv(vc, bt, n, i)
            lows.append(lowp_attention(q[i : i + 1], kb[None], vb[None], True, d**-0.5))
        check_2x(out, ref, torch.cat(lows), dtype, f"{backend} {dtype} paged")


@pytest.mark.parametrize("device,backend", WRITE)
def test_write_kv_cache(device, backend):
    g = torch.Generator().manual_seed(5)
    for dtype in dtypes_for(device, backend):
        k_cache = torch.full((6, 16, 2, 64), float("nan"), dtype=dtype, device=device)
        v_cache = k_cache.clone()
        k = rand(20, 2, 64, device=device, dtype=dtype, gen=g)
        v = rand(20, 2, 64, device=device, dtype=dtype, gen=g)
        slots = torch.randperm(96, generator=g)[:20].to(device)
        slots[3] = -1  # padding token: skipped
        ek, ev = k_cache.clone(), v_cache.clone()
        write_kv_cache_ref(k, v, ek, ev, slots)
        ops.write_kv_cache(k, v, k_cache, v_cache, slots.to(torch.int32), backend=backend)
        assert torch.equal(k_cache.nan_to_num(7.0), ek.nan_to_num(7.0))
        assert torch.equal(v_cache.nan_to_num(7.0), ev.nan_to_num(7.0))


def test_bad_input_errors():
    q, k, v = torch.randn(1, 4, 6, 64), torch.randn(1, 4, 4, 64), torch.randn(1, 4, 4, 64)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ops.attention(q, k, v)
    with pytest.raises(ValueError, match="multiple of 8"):
        ops.attention(torch.randn(1, 4, 2, 12), torch.randn(1, 4, 2, 12), torch.randn(1, 4, 2, 12))
    with pytest.raises(ValueError, match=r"\[8, 256\]"):
        ops.attention(torch.randn(1, 4, 2, 264), torch.randn(1, 4, 2, 264), torch.randn(1, 4, 2, 264))
    with pytest.raises(ValueError, match="is torch.float16 but q"):
        ops.attention(torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64).half(), torch.randn(1, 4, 2, 64))
    with pytest.raises(ValueError, match="is on meta"):
        ops.attention(torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64, device="meta"), torch.randn(1, 4, 2, 64))
    qv, kv = torch.randn(10, 2, 64), torch.randn(10, 2, 64)
    with pytest.raises(ValueError, match="never decrease"):
        ops.attention_varlen(
            qv, kv, kv, torch.tensor([0, 6, 4, 10], dtype=torch.int32), torch.tensor([0, 4, 6, 10], dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="int32"):
        ops.attention_varlen(qv, kv, kv, torch.tensor([0, 10]), torch.tensor([0, 10]))
    g = torch.Generator().manual_seed(0)
    q, kc, vc, bt, cs = paged_case("cpu", torch.float32, [20, 5], 1, 4, 2, 64, 16, g)
    bad = bt.clone()
    bad[0, 1] = kc.shape[0]  # used block (20 tokens need 2 blocks) pointing past the cache
    with pytest.raises(ValueError, match="block ids outside"):
        ops.paged_attention(q, kc, vc, bad, cs)
    with pytest.raises(ValueError, match="cache_seqlens must lie"):
        ops.paged_attention(q, kc, vc, bt, torch.tensor([20, 10_000], dtype=torch.int32))
    with pytest.raises(ValueError, match="power of two"):
        ops.paged_attention(q, kc[:, :12].contiguous(), vc[:, :12].contiguous(), bt, cs)
    with pytest.raises(ValueError, match="out of range"):
        ops.write_kv_cache(
            torch.randn(2, 2, 64), torch.randn(2, 2, 64), kc, vc, torch.tensor([0, kc.shape[0] * 16], dtype=torch.int32)
        )
    with pytest.raises(backends.BackendUnavailable):
        ops.attention(torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64), backend="cuda")
