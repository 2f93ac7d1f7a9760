"""T5's relative position bias inside the attention ops (issue 18 point 2): the bucket formula against
transformers, the reference against transformers' materialised bias, and every backend's biased
attention / attention_varlen (forward, dq/dk/dv and dtable) and paged_attention against the fp64
reference."""

from __future__ import annotations

import sys

import pytest
import torch

import plm_engine.ops.attention  # noqa: F401  (the module; ops.attention is the function)
from plm_engine import ops
from plm_engine.ops import backends
from plm_engine.ops.position_bias import bias_from_lookup, bucket_lookup
from plm_engine.ops.reference import (
    attention_bwd_ref,
    attention_ref,
    attention_varlen_bwd_ref,
    attention_varlen_ref,
    gather_paged_kv,
    paged_attention_ref,
    relative_position_bias_ref,
)
from tests.ops.test_attention import check_2x, paged_case, rand, varlen_case
from tests.utils import device_backends, max_err


def rpb_backends(op: str) -> list:
    """device_backends(op) without the backends whose kernels do not take the bias yet."""
    return [
        p
        for p in device_backends(op)
        if p.values[1] not in sys.modules["plm_engine.ops.attention"]._RPB_PENDING.get(op, {})
    ]


DENSE = rpb_backends("attn_rpb_fwd")
VARLEN = rpb_backends("attn_varlen_rpb_fwd")
PAGED = rpb_backends("paged_attn_rpb")

BUCKET_PARAMS = [(True, 32, 128), (False, 32, 128), (True, 8, 20), (False, 6, 9), (True, 33, 50), (False, 64, 300)]


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", BUCKET_PARAMS)
def test_relative_position_bucket_matches_transformers(bidirectional, num_buckets, max_distance):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-3 * max_distance - 7, 3 * max_distance + 8)
    ours = ops.relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    theirs = t5.T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)
    assert ours.min() >= 0 and ours.max() < num_buckets
    # The kernels' lookup clamps r to [-max_distance, max_distance]: exact, the buckets are flat beyond.
    lut = bucket_lookup(bidirectional, num_buckets, max_distance, torch.device("cpu"))
    assert lut.dtype == torch.int32 and lut.shape == (2 * max_distance + 1,)
    assert torch.equal(lut.long()[rel.clamp(-max_distance, max_distance) + max_distance], theirs)


@pytest.mark.parametrize("sq,sk", [(7, 7), (1, 9), (5, 12)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_reference_bias_matches_transformers_compute_bias(sq, sk, bidirectional):
    """Bottom-right alignment = transformers' compute_bias with past_seen_tokens = sk - sq (decoding)."""
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    from transformers import T5Config

    cfg = T5Config(
        d_model=16, d_kv=8, num_heads=3, relative_attention_num_buckets=10, relative_attention_max_distance=20
    )
    cfg.is_decoder = not bidirectional
    layer = t5.T5Attention(cfg, has_relative_attention_bias=True)
    with torch.no_grad():
        layer.relative_attention_bias.weight.normal_()
        theirs = layer.compute_bias(sq, sk, past_seen_tokens=sk - sq)[0]
    pb = ops.RelativePositionBias(layer.relative_attention_bias.weight.detach(), bidirectional, 20)
    assert torch.equal(relative_position_bias_ref(pb, sq, sk), theirs)
    lut = bucket_lookup(bidirectional, 10, 20, torch.device("cpu"))
    assert torch.equal(bias_from_lookup(pb.table, lut, sq, sk), theirs)


def dtypes_for(device, backend):
    low = [torch.float16, torch.bfloat16]
    return low if device == "cuda" or backend == "triton" else [torch.float32] + low


def lowp_biased(q, k, v, causal, scale, bias):
    """PyTorch attention in the inputs' low precision plus the fp32 bias (h, sq, sk): the 2x baseline."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    kk, vv = k.repeat_interleave(h // hkv, dim=2), v.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk).float() * scale + bias
    if causal:
        i, j = torch.arange(sq).unsqueeze(1), torch.arange(sk).unsqueeze(0)
        s = s.masked_fill((j > i + sk - sq).to(s.device), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


def make_bias(device, h, bidirectional, gen, num_buckets=16, max_distance=24):
    table = torch.randn(num_buckets, h, generator=gen).to(device)
    return ops.RelativePositionBias(table, bidirectional, max_distance)


def as64(pb):
    return ops.RelativePositionBias(pb.table.detach().double().requires_grad_(), pb.bidirectional, pb.max_distance)


# (batch, seqlen_q, seqlen_k, n_heads, n_kv_heads, head_dim, num_buckets, max_distance)
DENSE_SHAPES = [
    (2, 17, 17, 4, 2, 64, 32, 128),  # T5's defaults; every distance in the exact + log range
    (1, 1, 45, 3, 3, 40, 16, 24),  # a decode-like row; distances past max_distance
    (1, 37, 23, 2, 1, 32, 12, 10),  # seqlen_q > seqlen_k: causal rows with no key
    (2, 30, 61, 4, 4, 16, 8, 6),  # seqlen_k > seqlen_q; a tiny exact range
    (1, 130, 140, 2, 1, 16, 6, 7),  # tiles far off the diagonal lie in one bucket
]


@pytest.mark.parametrize("device,backend", DENSE)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_bias_forward_backward(device, backend, shape, causal):
    b, sq, sk, h, hkv, d, nb, md = shape
    scale = 1.0 if d <= 32 else d**-0.5  # T5 scales by 1
    for dtype in dtypes_for(device, backend):
        g = torch.Generator().manual_seed(sum(shape) + causal)
        q = rand(b, sq, h, d, device=device, dtype=dtype, gen=g).mul_(0.5).requires_grad_()
        k = rand(b, sk, hkv, d, device=device, dtype=dtype, gen=g).requires_grad_()
        v = rand(b, sk, hkv, d, device=device, dtype=dtype, gen=g).requires_grad_()
        pb = make_bias(device, h, not causal, g, nb, md)
        pb.table.requires_grad_()
        dout = rand(b, sq, h, d, device=device, dtype=dtype, gen=g)
        out, lse = ops.attention(
            q, k, v, causal=causal, softmax_scale=scale, return_lse=True, position_bias=pb, backend=backend
        )
        assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, h, sq)
        r64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        pb64 = as64(pb)
        ref, ref_lse = attention_ref(*r64, causal, scale, return_lse=True, position_bias=pb64)
        low_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        low_table = pb.table.detach().clone().requires_grad_()
        low_pb = ops.RelativePositionBias(low_table, pb.bidirectional, md)
        low = lowp_biased(*low_in, causal, scale, relative_position_bias_ref(low_pb, sq, sk))
        check_2x(out, ref, low.detach(), dtype, f"{backend} {dtype} out")
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), fin)
        assert max_err(lse[fin], ref_lse[fin]) < 1e-2 + 1e-3 * ref_lse[fin].abs().max().item()

        grads = torch.autograd.grad(out, (q, k, v, pb.table), dout)
        ref_grads = torch.autograd.grad(ref, (*r64, pb64.table), dout.double())
        low_grads = torch.autograd.grad(low, (*low_in, low_table), dout)
        for name, ours, r, lg in zip(("q", "k", "v", "table"), grads, ref_grads, low_grads):
            assert ours.dtype == (dtype if name != "table" else torch.float32)
            check_2x(ours, r, lg, dtype, f"{backend} {dtype} d{name}")


@pytest.mark.parametrize("device,backend", VARLEN)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_varlen_bias(device, backend, causal):
    lens_q, lens_k = [1, 17, 40, 5, 0, 9], [1, 23, 31, 5, 3, 9]  # different q / k lengths, an empty query
    h, hkv, d = 4, 2, 32
    for dtype in dtypes_for(device, backend):
        g = torch.Generator().manual_seed(7 + causal)
        q, k, v, cu_q, cu_k = varlen_case(device, dtype, lens_q, lens_k, h, hkv, d, g)
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        pb = make_bias(device, h, not causal, g, 12, 16)
        pb.table.requires_grad_()
        out, lse = ops.attention_varlen(
            q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal, 1.0, True, position_bias=pb, backend=backend
        )
        assert lse.shape == (h, q.shape[0])
        r64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        pb64 = as64(pb)
        ref = attention_varlen_ref(*r64, cu_q, cu_k, causal=causal, softmax_scale=1.0, position_bias=pb64)
        tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
        assert max_err(out, ref) <= tol * max(1.0, ref.abs().max().item()), "varlen out"
        dout = torch.randn(out.shape, generator=g).to(device, dtype)
        grads = torch.autograd.grad(out, (q, k, v, pb.table), dout)
        ref_grads = torch.autograd.grad(ref, (*r64, pb64.table), dout.double())
        for name, ours, r in zip(("q", "k", "v", "table"), grads, ref_grads):
            assert max_err(ours, r) <= tol * max(1.0, r.abs().max().item()), f"varlen d{name}"


@pytest.mark.parametrize("device,backend", PAGED)
@pytest.mark.parametrize("block_size,sq", [(16, 1), (32, 5)])
def test_paged_attention_bias(device, backend, block_size, sq):
    seqlens = [sq, 17, 150, 64]
    h, hkv, d = 6, 2, 32
    for dtype in dtypes_for(device, backend):
        g = torch.Generator().manual_seed(block_size + sq)
        q, kc, vc, bt, cs = paged_case(device, dtype, seqlens, sq, h, hkv, d, block_size, g)
        pb = make_bias(device, h, False, g, 32, 128)
        out = ops.paged_attention(q, kc, vc, bt, cs, 1.0, position_bias=pb, backend=backend)
        ref = paged_attention_ref(q.double(), kc.double(), vc.double(), bt, cs, 1.0, as64(pb))
        lows = []
        for i, n in enumerate(seqlens):
            kb, vb = gather_paged_kv(kc, bt, n, i), gather_paged_kv(vc, bt, n, i)
            bias = relative_position_bias_ref(pb, sq, n)
            lows.append(lowp_biased(q[i : i + 1], kb[None], vb[None], True, 1.0, bias))
        check_2x(out, ref, torch.cat(lows), dtype, f"{backend} {dtype} paged")


def test_bwd_reference_matches_autograd():
    """attention_bwd_ref / attention_varlen_bwd_ref's dtable (the op-level oracle) equals autograd's."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 9, 4, 8), (2, 13, 2, 8), (2, 13, 2, 8)))
    pb = ops.RelativePositionBias(torch.randn(10, 4, generator=g, dtype=torch.float64).requires_grad_(), True, 12)
    out, lse = attention_ref(q, k, v, True, 0.7, return_lse=True, position_bias=pb)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (dtable,) = torch.autograd.grad(out, pb.table, dout)
    *_, dtable_ref = attention_bwd_ref(dout, q, k, v, out, lse, True, 0.7, pb)
    torch.testing.assert_close(dtable_ref.double(), dtable, rtol=1e-5, atol=1e-6)
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    cuk = torch.tensor([0, 13, 26], dtype=torch.int32)
    qv, kv, vv, dv = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), dout.flatten(0, 1)
    outv, lsev = attention_varlen_ref(
        qv, kv, vv, cu, cuk, causal=True, softmax_scale=0.7, return_lse=True, position_bias=pb
    )
    *_, dtable_v = attention_varlen_bwd_ref(dv, qv, kv, vv, outv, lsev, cu, cuk, True, 0.7, pb)
    torch.testing.assert_close(dtable_v.double(), dtable, rtol=1e-5, atol=1e-6)


def test_bad_position_bias():
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16)
    with pytest.raises(TypeError, match="RelativePositionBias"):
        ops.attention(q, k, k, position_bias=torch.randn(32, 2))
    with pytest.raises(ValueError, match="3 heads, q has 2"):
        ops.attention(q, k, k, position_bias=ops.RelativePositionBias(torch.randn(32, 3), True))
    with pytest.raises(ValueError, match="num_buckets >= 4"):
        ops.attention(q, k, k, position_bias=ops.RelativePositionBias(torch.randn(3, 2), True))
    with pytest.raises(ValueError, match="max_distance must lie"):
        ops.attention(q, k, k, position_bias=ops.RelativePositionBias(torch.randn(32, 2), True, 8))
    with pytest.raises(ValueError, match="float"):
        ops.attention(q, k, k, position_bias=ops.RelativePositionBias(torch.zeros(32, 2, dtype=torch.long), True))
    with pytest.raises(ValueError, match="is on meta"):
        ops.attention(q, k, k, position_bias=ops.RelativePositionBias(torch.randn(32, 2, device="meta"), True))
    g = torch.Generator().manual_seed(0)
    qp, kc, vc, bt, cs = paged_case("cpu", torch.float32, [20, 5], 1, 4, 2, 64, 16, g)
    with pytest.raises(ValueError, match="2 heads, q has 4"):
        ops.paged_attention(qp, kc, vc, bt, cs, position_bias=ops.RelativePositionBias(torch.randn(32, 2), False))
    with pytest.raises(backends.BackendUnavailable):
        ops.attention(q, k, k, position_bias=ops.RelativePositionBias(torch.randn(32, 2), True), backend="cuda")


def test_unbiased_calls_unchanged():
    """position_bias=None takes exactly the path it took before (same op, same bits)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(1, 9, 2, 16, generator=g),
        torch.randn(1, 9, 2, 16, generator=g),
        torch.randn(1, 9, 2, 16, generator=g),
    )
    for backend in backends.usable_backends(torch.device("cpu"), "attn_fwd"):
        a = ops.attention(q, k, v, causal=True, backend=backend)
        b = ops.attention(q, k, v, causal=True, position_bias=None, backend=backend)
        assert torch.equal(a, b)
