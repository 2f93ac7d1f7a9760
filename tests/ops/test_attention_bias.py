"""T5's relative position bias inside the attention ops (issue 18 point 2): the bucket formula against
transformers, the reference against transformers' materialised bias, and every backend's biased
attention / attention_varlen (forward, dq/dk/dv and dtable) and paged_attention against the fp64
reference."""

from __future__ import annotations

import pytest
import torch

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

DENSE = device_backends("attn_rpb_fwd")
VARLEN = device_backends("attn_varlen_rpb_fwd")
PAGED = device_backends("paged_attn_rpb")

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


def test_bias_after_inference_mode_still_trains():
    """The memoised bucket lookup first built under inference_mode is still usable by autograd."""
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 5, 2, 16, generator=g), torch.randn(1, 6, 2, 16, generator=g)
    table = torch.randn(14, 2, generator=g)
    with torch.inference_mode():  # 14 buckets / 31: parameters no other test uses, so this call builds it
        ops.attention(q, k, k, position_bias=ops.RelativePositionBias(table, True, 31))
    leaf = table.clone().requires_grad_()
    for backend in backends.usable_backends(torch.device("cpu"), "attn_rpb_fwd"):
        out = ops.attention(q, k, k, position_bias=ops.RelativePositionBias(leaf, True, 31), backend=backend)
        (dtable,) = torch.autograd.grad(out.sum(), leaf)
        assert torch.isfinite(dtable).all()


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


# ---- the C++ CPU kernels: every instruction-set build, both backward paths, thread counts -------------


def _cpu_has_bias() -> bool:
    return backends.availability("cpu", torch.device("cpu"), "attn_rpb_fwd")[0]


needs_cpu = pytest.mark.skipif(not _cpu_has_bias(), reason="plm_engine._C has no CPU kernels for the bias ops")


def _cpu_bias_case(gen, dtype, b=2, sq=70, sk=75, h=4, hkv=2, d=24):
    q = torch.randn(b, sq, h, d, generator=gen).to(dtype)
    k = torch.randn(b, sk, hkv, d, generator=gen).to(dtype)
    v = torch.randn(b, sk, hkv, d, generator=gen).to(dtype)
    return q, k, v


@needs_cpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpu_bias_every_isa(cpu_isa, causal, monkeypatch):
    """Dense forward / backward (stored and recomputed dS) and paged decode with the bias, per ISA build;
    seqlen 70 / 75 spans two key tiles, max_distance 20 puts both in- and out-of-range positions in a
    tile, and dtable matches the fp64 reference."""
    g = torch.Generator().manual_seed(21 + causal)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _cpu_bias_case(g, dtype)
        pb = ops.RelativePositionBias(torch.randn(12, 4, generator=g), not causal, 20)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        table = pb.table.clone().requires_grad_()
        pbl = ops.RelativePositionBias(table, pb.bidirectional, 20)
        out = ops.attention(*leaves, causal=causal, softmax_scale=1.0, position_bias=pbl, backend="cpu")
        dout = torch.randn(out.shape, generator=g).to(dtype)
        r64 = [t.double().requires_grad_() for t in (q, k, v)]
        pb64 = as64(pb)
        ref = attention_ref(*r64, causal, 1.0, position_bias=pb64)
        ref_grads = torch.autograd.grad(ref, (*r64, pb64.table), dout.double())
        tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
        assert max_err(out, ref) <= tol * ref.abs().max().item(), f"{cpu_isa} {dtype} out"
        for budget in ("256", "0"):  # dS^T tiles stored for pass 2, or recomputed there
            monkeypatch.setenv("PLM_ENGINE_ATTN_BWD_DS_MIB", budget)
            grads = torch.autograd.grad(out, (*leaves, table), dout, retain_graph=True)
            for name, ours, r in zip(("q", "k", "v", "table"), grads, ref_grads):
                assert max_err(ours, r) <= tol * max(1.0, r.abs().max().item()), f"{cpu_isa} {dtype} d{name} {budget}"

    qp, kc, vc, bt, cs = paged_case("cpu", torch.float32, [3, 40, 130], 3, 4, 2, 16, 16, g)
    pb = ops.RelativePositionBias(torch.randn(32, 4, generator=g), False, 50)
    out = ops.paged_attention(qp, kc, vc, bt, cs, 1.0, position_bias=pb, backend="cpu")
    ref = paged_attention_ref(qp.double(), kc.double(), vc.double(), bt, cs, 1.0, as64(pb))
    assert max_err(out, ref) <= 2e-5 * ref.abs().max().item(), f"{cpu_isa} paged"


@needs_cpu
def test_cpu_bias_thread_count_independent():
    """dtable (like dq, dk, dv) is bit-identical for any thread count: fixed-order sums, no atomics."""
    g = torch.Generator().manual_seed(5)
    q, k, v = _cpu_bias_case(g, torch.float32, b=1, sq=130, sk=140)
    pb = ops.RelativePositionBias(torch.randn(8, 4, generator=g), True, 10)
    dout = torch.randn(q.shape, generator=g)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            table = pb.table.clone().requires_grad_()
            out = ops.attention(*leaves, position_bias=ops.RelativePositionBias(table, True, 10), backend="cpu")
            results.append((out, *torch.autograd.grad(out, (*leaves, table), dout)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@needs_cpu
def test_cpu_bias_opcheck():
    from plm_engine.ops.attention import backend_op

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 4, 16, generator=g).requires_grad_()
    k = torch.randn(2, 11, 2, 16, generator=g).requires_grad_()
    v = torch.randn(2, 11, 2, 16, generator=g).requires_grad_()
    table = torch.randn(10, 4, generator=g).requires_grad_()
    lut = bucket_lookup(True, 10, 12, torch.device("cpu"))
    torch.library.opcheck(backend_op("attn_rpb_fwd", "cpu"), (q, k, v, table, lut, True, 0.5))
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 11], dtype=torch.int32)
    torch.library.opcheck(
        backend_op("attn_varlen_rpb_fwd", "cpu"), (q[0], k[0], v[0], table, lut, cu_q, cu_k, 5, 6, False, 0.5)
    )
    out, lse = backend_op("attn_rpb_fwd", "cpu")(q, k, v, table, lut, True, 0.5)
    bwd_checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        backend_op("attn_rpb_bwd", "cpu"),
        (torch.randn_like(out), q, k, v, out, lse, table, lut, True, 0.5),
        test_utils=bwd_checks,
    )
    qp, kc, vc, bt, cs = paged_case("cpu", torch.float32, [9, 40], 2, 4, 2, 16, 16, g)
    torch.library.opcheck(backend_op("paged_attn_rpb", "cpu"), (qp, kc, vc, bt, cs, table.detach(), lut, 0.25))


def test_triton_bias_opcheck():
    ok, why = backends.availability("triton", torch.device("cpu"), "attn_rpb_fwd")
    if not ok:
        pytest.skip(why)
    from plm_engine.ops.triton import attention as tattn
    from plm_engine.ops.triton import paged_attention as tpaged

    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    q = torch.randn(1, 7, 2, 16, generator=g).to(dtype).requires_grad_()
    k = torch.randn(1, 5, 1, 16, generator=g).to(dtype).requires_grad_()
    v = torch.randn(1, 5, 1, 16, generator=g).to(dtype).requires_grad_()
    table = torch.randn(6, 2, generator=g).requires_grad_()
    lut = bucket_lookup(False, 6, 5, torch.device("cpu"))
    torch.library.opcheck(tattn.triton_attn_rpb_fwd, (q, k, v, table, lut, True, 1.0))
    out, lse = tattn.triton_attn_rpb_fwd(q, k, v, table, lut, True, 1.0)
    torch.library.opcheck(
        tattn.triton_attn_rpb_bwd,
        (
            torch.randn(out.shape, generator=g).to(dtype),
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            lse.detach(),
            table.detach(),
            lut,
            True,
            1.0,
        ),
    )
    qp, kc, vc, bt, cs = paged_case("cpu", dtype, [9, 20], 2, 2, 1, 16, 16, g)
    torch.library.opcheck(tpaged.paged_attn_rpb, (qp, kc, vc, bt, cs, table.detach(), lut, 1.0))


# ---- the CUDA C++ paged kernel, compiled on the CPU under csrc/testing/cuda_emu.h --------------------


@pytest.mark.parametrize(
    "case",
    [([1, 17, 70], 1, 2, 2, 64, 16, 1), ([9, 64], 4, 8, 1, 80, 16, 2), ([130], 2, 4, 1, 128, 32, 3)],
    ids=str,
)
def test_cuda_paged_bias_emulated(case):
    """csrc/cuda/paged_attention_kernels.cuh with the bias rows (row tiles of 1, 4 and 8 query rows,
    KV splits) against the reference on the gathered cache."""
    from tests import cuda_emu

    emu, why = cuda_emu.load()
    if emu is None:
        pytest.skip(why)
    seqlens, sq, h, hkv, d, block_size, splits = case
    g = torch.Generator().manual_seed(sum(seqlens) + d)
    for dtype in (torch.float16, torch.bfloat16):
        q, kc, vc, bt, cs = paged_case("cpu", dtype, seqlens, sq, h, hkv, d, block_size, g)
        pb = ops.RelativePositionBias(torch.randn(32, h, generator=g), False, 40)
        lut = bucket_lookup(False, 32, 40, torch.device("cpu"))
        rows = (pb.table.t()[:, lut.long()] * 1.4426950408889634).contiguous()
        out = emu.paged_attn(q, kc, vc, bt, cs, 1.0, splits, rows)
        ref = paged_attention_ref(q.double(), kc.double(), vc.double(), bt, cs, 1.0, as64(pb))
        lows = []
        for i, n in enumerate(seqlens):
            kb, vb = gather_paged_kv(kc, bt, n, i), gather_paged_kv(vc, bt, n, i)
            lows.append(lowp_biased(q[i : i + 1], kb[None], vb[None], True, 1.0, relative_position_bias_ref(pb, sq, n)))
        check_2x(out, ref, torch.cat(lows), dtype, f"emulated CUDA paged {case} {dtype}")


# ---- the bias variants' launch configurations are what report-kernels compiles ----------------------


def test_bias_configs_are_in_kernel_specs():
    """Every configuration a biased launch can pick (aligned only) is a HAS_BIAS spec of kernel_specs(),
    for the dense/varlen kernels and the paged kernel; an unaligned bias configuration does not exist."""
    if not backends.triton_installed()[0]:
        pytest.skip("triton is not installed")
    from plm_engine.ops.triton import attention as tattn
    from plm_engine.ops.triton import paged_attention as tpaged

    specs = [s for s in tattn.kernel_specs() if s.constexprs.get("HAS_BIAS")]
    assert specs and all(s.alignments == (16,) and ",bias," in s.name for s in specs)
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        for block_d in tattn.BLOCK_DS:
            cfg = tattn.launch_config(kernel, block_d, bias=True)
            assert any(
                s.name.startswith(f"attn_{kernel}[hd={block_d},BLOCK_M={cfg.block_m},BLOCK_N={cfg.block_n},")
                and (s.num_warps, s.num_stages) == (cfg.num_warps, cfg.num_stages)
                for s in specs
            ), (kernel, block_d)
            with pytest.raises(ValueError, match="aligned only"):
                tattn.launch_config(kernel, block_d, aligned=False, bias=True)
    paged = [s for s in tpaged.kernel_specs() if s.constexprs.get("HAS_BIAS")]
    for head_dim in (16, 40, 64, 128, 256):
        for n_rows in (1, 5, 16, 17, 40, 64, 100):
            cfg = tpaged.paged_config(n_rows, head_dim, bias=True)
            key = (cfg.block_m, cfg.block_n, cfg.block_d, cfg.num_warps, cfg.num_stages)
            assert key in {
                (s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["BLOCK_D"], s.num_warps, s.num_stages)
                for s in paged
            }, (head_dim, n_rows)


def test_triton_biased_unaligned_inputs_run_aligned(monkeypatch):
    """3 heads of 40 (row stride 120, not 16-divisible): the biased launches run the aligned bias table
    on realigned copies, and still match the reference."""
    ok, why = backends.availability("triton", torch.device("cpu"), "attn_rpb_fwd")
    if not ok:
        pytest.skip(why)
    from plm_engine.ops.triton import attention as tattn

    picked = []
    real = tattn.launch_config

    def recording(kernel, head_dim, interpret=False, aligned=True, bias=False):
        picked.append((kernel, aligned, bias))
        return real(kernel, head_dim, interpret, aligned, bias)

    monkeypatch.setattr(tattn, "launch_config", recording)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, n, 3, 40, generator=g).to(torch.bfloat16).requires_grad_() for n in (19, 23, 23))
    table = torch.randn(10, 3, generator=g).requires_grad_()
    pb = ops.RelativePositionBias(table, True, 12)
    out = ops.attention(q, k, v, softmax_scale=1.0, position_bias=pb, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v, table), torch.ones_like(out))
    assert {kern for kern, _, b in picked if b} == {"fwd", "bwd_dkdv", "bwd_dq"}
    assert all(aligned for _, aligned, b in picked if b), picked
    r64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    pb64 = as64(pb)
    ref = attention_ref(*r64, False, 1.0, position_bias=pb64)
    ref_grads = torch.autograd.grad(ref, (*r64, pb64.table), torch.ones_like(ref))
    assert max_err(out, ref) < 3e-2 * ref.abs().max().item()
    for ours, r in zip(grads, ref_grads):
        assert max_err(ours, r) < 3e-2 * max(1.0, r.abs().max().item())
