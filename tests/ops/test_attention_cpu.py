"""The C++ CPU attention kernels (csrc/cpu/attention.cpp) beyond the shared backend tests: every
instruction-set build (the `cpu_isa` fixture) forward, backward and paged decode on awkward shapes,
op registration (opcheck), strided inputs, head_dim 256, fully masked rows, long contexts split across
tasks, and thread-count independence."""

from __future__ import annotations

import pytest
import torch

from plm_engine import ops
from plm_engine.ops import backends
from plm_engine.ops.attention import backend_op
from plm_engine.ops.reference import attention_ref, attention_varlen_ref, gather_paged_kv, paged_attention_ref
from tests.ops.test_attention import check_2x, lowp_attention, paged_case, varlen_case

pytestmark = pytest.mark.skipif(
    not backends.availability("cpu", torch.device("cpu"), "attn_fwd")[0],
    reason="plm_engine._C has no CPU attention kernels",
)


def rand(*shape, dtype=torch.float32, gen):
    return torch.randn(*shape, generator=gen).to(dtype)


def check_dense(q, k, v, causal, what):
    """ops.attention on the cpu backend against the fp64 reference with the 2x rule; returns (out, lse)."""
    d = q.shape[-1]
    out, lse = ops.attention(q, k, v, causal=causal, return_lse=True, backend="cpu")
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), causal, return_lse=True)
    check_2x(out, ref, lowp_attention(q, k, v, causal, d**-0.5), q.dtype, what)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max().item() < 1e-3
    return out, lse


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    q = rand(2, 19, 4, 40, gen=g).requires_grad_()
    k = rand(2, 23, 2, 40, gen=g).requires_grad_()
    v = rand(2, 23, 2, 40, gen=g).requires_grad_()
    torch.library.opcheck(backend_op("attn_fwd", "cpu"), (q, k, v, True, 0.3))
    cu_q = torch.tensor([0, 5, 5, 19], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 10, 23], dtype=torch.int32)
    torch.library.opcheck(backend_op("attn_varlen_fwd", "cpu"), (q[0], k[0], v[0], cu_q, cu_k, 14, 13, True, 0.3))
    out, lse = backend_op("attn_fwd", "cpu")(q, k, v, True, 0.3)
    dout = torch.randn_like(out)
    # The backward ops are not differentiable themselves (no double backward): no autograd checks.
    bwd_checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(backend_op("attn_bwd", "cpu"), (dout, q, k, v, out, lse, True, 0.3), test_utils=bwd_checks)
    out, lse = backend_op("attn_varlen_fwd", "cpu")(q[0], k[0], v[0], cu_q, cu_k, 14, 13, True, 0.3)
    torch.library.opcheck(
        backend_op("attn_varlen_bwd", "cpu"),
        (dout[0], q[0], k[0], v[0], out, lse, cu_q, cu_k, 14, 13, True, 0.3),
        test_utils=bwd_checks,
    )
    qp, kc, vc, bt, cs = paged_case("cpu", torch.bfloat16, [9, 40], 2, 4, 2, 64, 16, g)
    torch.library.opcheck(backend_op("paged_attn", "cpu"), (qp, kc, vc, bt, cs, 0.125))
    slots = torch.tensor([3, -1, 17], dtype=torch.int32)
    kn, vn = rand(3, 2, 64, dtype=torch.bfloat16, gen=g), rand(3, 2, 64, dtype=torch.bfloat16, gen=g)
    torch.library.opcheck(backend_op("write_kv_cache", "cpu"), (kn, vn, kc.clone(), vc.clone(), slots))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs(dtype):
    """q, k, v as views: (batch, heads, seq, dim) storage transposed, and every other head."""
    g = torch.Generator().manual_seed(1)
    q = rand(2, 6, 70, 64, dtype=dtype, gen=g).transpose(1, 2)[:, :, ::2]  # (2, 70, 3, 64)
    kv = rand(2, 70, 2, 2, 64, dtype=dtype, gen=g)  # a packed (k, v) projection
    k, v = kv[:, :, 0, :1], kv[:, :, 1, :1]  # (2, 70, 1, 64), MQA
    assert not q.is_contiguous() and not k.is_contiguous()
    for causal in (False, True):
        out, _ = check_dense(q, k, v, causal, f"strided {dtype} causal={causal}")
        expect, _ = check_dense(q.contiguous(), k.contiguous(), v.contiguous(), causal, "contiguous")
        assert torch.equal(out, expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_head_dim_256(dtype):
    g = torch.Generator().manual_seed(2)
    q, k, v = (rand(1, 77, 2, 256, dtype=dtype, gen=g) for _ in range(3))
    check_dense(q, k, v, True, f"head_dim 256 {dtype}")


def test_causal_more_queries_than_keys():
    """Bottom-right alignment: the first sq - sk queries see no key: zeros and lse = -inf, no NaN."""
    g = torch.Generator().manual_seed(3)
    q, k, v = rand(2, 90, 3, 32, gen=g), rand(2, 20, 3, 32, gen=g), rand(2, 20, 3, 32, gen=g)
    out, lse = check_dense(q, k, v, True, "sq > sk")
    assert not out.isnan().any()
    assert (out[:, :70] == 0).all() and torch.isneginf(lse[:, :, :70]).all()
    assert torch.isfinite(lse[:, :, 70:]).all()
    # varlen: a sequence with no keys at all, one with sq > sk
    qv, kv = rand(12, 3, 32, gen=g), rand(4, 3, 32, gen=g)
    cu_q, cu_k = torch.tensor([0, 5, 12], dtype=torch.int32), torch.tensor([0, 0, 4], dtype=torch.int32)
    out, lse = ops.attention_varlen(qv, kv, kv, cu_q, cu_k, causal=True, return_lse=True, backend="cpu")
    ref = attention_varlen_ref(qv.double(), kv.double(), kv.double(), cu_q, cu_k, causal=True)
    assert not out.isnan().any() and (out[:8] == 0).all() and torch.isneginf(lse[:, :8]).all()
    assert (out.double() - ref).abs().max().item() < 1e-5


def _check_paged_cpu(dtype, seqlens, sq, h, hkv, d, block_size, g, what):
    """The CPU paged kernel on a shuffled cache against the fp64 reference, with the 2x rule."""
    q, kc, vc, bt, cs = paged_case("cpu", dtype, seqlens, sq, h, hkv, d, block_size, g)
    out = ops.paged_attention(q, kc, vc, bt, cs, backend="cpu")
    ref = paged_attention_ref(q.double(), kc.double(), vc.double(), bt, cs)
    lows = [
        lowp_attention(
            q[i : i + 1], gather_paged_kv(kc, bt, n, i)[None], gather_paged_kv(vc, bt, n, i)[None], True, d**-0.5
        )
        for i, n in enumerate(seqlens)
    ]
    check_2x(out, ref, torch.cat(lows), dtype, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_long_context_and_chunked_prefill(dtype):
    """Contexts long enough to be split across tasks (and merged), and seqlen_q * group > 64 rows."""
    h, hkv, d = 9, 3, 64
    for block_size, sq, seqlens in ((16, 1, [3000, 5]), (128, 30, [700, 30, 1000])):
        g = torch.Generator().manual_seed(block_size)
        _check_paged_cpu(dtype, seqlens, sq, h, hkv, d, block_size, g, f"paged bs={block_size} sq={sq}")


def test_thread_count_independence(cpu_isa):
    """Forward, backward and paged decode are bit-identical on 1 and 2 threads (fixed task arithmetic,
    no float atomics), on every build."""
    g = torch.Generator().manual_seed(4)
    q, k, v = rand(1, 150, 6, 64, gen=g), rand(1, 150, 2, 64, gen=g), rand(1, 150, 2, 64, gen=g)
    dout = rand(1, 150, 6, 64, gen=g)
    qv, kv, vv, cu_q, cu_k = varlen_case("cpu", torch.bfloat16, [70, 0, 66], [5, 9, 130], 4, 2, 40, g)
    dv_out = rand(136, 4, 40, dtype=torch.bfloat16, gen=g)
    qp, kc, vc, bt, cs = paged_case("cpu", torch.bfloat16, [2000, 77, 300], 2, 6, 2, 64, 32, g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = [t.clone().requires_grad_() for t in (q, k, v, qv, kv, vv)]
            out, lse = ops.attention(*leaves[:3], causal=True, return_lse=True, backend="cpu")
            outv = ops.attention_varlen(*leaves[3:], cu_q, cu_k, causal=True, backend="cpu")
            grads = torch.autograd.grad((out, outv), leaves, (dout, dv_out))
            results.append((out, lse, outv, *grads, ops.paged_attention(qp, kc, vc, bt, cs, backend="cpu")))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_backward_paths_agree(cpu_isa, monkeypatch):
    """The backward stores dS tiles for its dQ pass within a memory budget and recomputes them beyond
    it; both paths must give the same bits (the tests above run the stored path)."""
    g = torch.Generator().manual_seed(6)
    q, k, v = rand(1, 100, 4, 40, gen=g), rand(1, 130, 2, 40, gen=g), rand(1, 130, 2, 40, gen=g)
    dout = rand(1, 100, 4, 40, gen=g)
    qv, kv, vv, cu_q, cu_k = varlen_case("cpu", torch.bfloat16, [70, 0, 3], [5, 9, 130], 4, 2, 64, g)
    dv_out = rand(73, 4, 64, dtype=torch.bfloat16, gen=g)
    results = []
    for budget in (None, "0"):
        if budget is not None:
            monkeypatch.setenv("PLM_ENGINE_ATTN_BWD_DS_MIB", budget)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, qv, kv, vv)]
        out = ops.attention(*leaves[:3], causal=True, backend="cpu")
        outv = ops.attention_varlen(*leaves[3:], cu_q, cu_k, causal=True, backend="cpu")
        results.append(torch.autograd.grad((out, outv), leaves, (dout, dv_out)))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_hidden_keys_get_exactly_zero(cpu_isa):
    """The kernels' exp2 floors its result at 2^-126 (x below -126 is clamped) and the masks then select
    exact zeros: a key hidden by the causal mask whose value is near the fp32 maximum must add nothing
    to the queries that cannot see it (2^-126 * 3e38 would add about 3.5). Odd sizes, GQA; the
    backward too, with dout 0 in that column (dO . V would overflow, as it would anywhere)."""
    g = torch.Generator().manual_seed(8)
    s, h, hkv, d = 67, 4, 2, 40
    q, k, v = rand(1, s, h, d, gen=g), rand(1, s, hkv, d, gen=g), rand(1, s, hkv, d, gen=g)
    v[:, -1, :, 0] = 3e38  # only the last query sees the last key
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.attention(*leaves, causal=True, backend="cpu")
    ref = attention_ref(q[:, :-1].double(), k[:, :-1].double(), v[:, :-1].double(), True)
    assert (out[:, :-1].double() - ref).abs().max().item() < 1e-5
    dout = rand(1, s, h, d, gen=g)
    dout[..., 0] = 0
    dout[:, -1] = 0
    dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t[:, :-1].double().requires_grad_() for t in (q, k, v)]
    rq, rk, rv = torch.autograd.grad(attention_ref(*ref_leaves, True), ref_leaves, dout[:, :-1].double())
    for got, want in ((dq[:, :-1], rq), (dk[:, :-1], rk), (dv[:, :-1], rv)):
        assert (got.double() - want).abs().max().item() < 1e-4


def test_workspace_reuse(cpu_isa):
    """The forward and the backward keep their fp32 workspaces between calls: a call after a larger one
    (the buffers full of that call's values) and calls running at once on two threads give the same
    outputs and gradients, bit for bit, as alone."""
    import threading

    g = torch.Generator().manual_seed(7)

    def case(s, h, hkv, d, causal):
        leaves = [rand(2, s, n, d, gen=g) for n in (h, hkv, hkv)]
        return leaves, rand(2, s, h, d, gen=g), causal

    def grads(c):
        leaves, dout, causal = c
        leaves = [t.clone().requires_grad_() for t in leaves]
        out = ops.attention(*leaves, causal=causal, backend="cpu")
        return (out.detach(), *torch.autograd.grad(out, leaves, dout))

    small, large = case(77, 6, 2, 40, True), case(200, 4, 4, 64, False)
    first = grads(small)
    large_alone = grads(large)
    for a, b in zip(first, grads(small), strict=True):
        assert torch.equal(a, b)
    results = {}
    threads = [
        threading.Thread(target=lambda n=n, c=c: results.__setitem__(n, grads(c)))
        for n, c in (("small", small), ("large", large))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip((*first, *large_alone), (*results["small"], *results["large"]), strict=True):
        assert torch.equal(a, b)


def test_bad_input_errors():
    op = torch.ops.plm_engine
    backend_op("attn_fwd", "cpu")
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(RuntimeError, match="contiguous in head_dim"):
        op.attn_fwd(q, q, q.transpose(-1, -2).contiguous().transpose(-1, -2), False, 0.1)
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0"):
        op.attn_varlen_fwd(
            q[0],
            q[0],
            q[0],
            torch.tensor([0, 3], dtype=torch.int32),
            torch.tensor([0, 4], dtype=torch.int32),
            4,
            4,
            False,
            0.1,
        )
    g = torch.Generator().manual_seed(0)
    qp, kc, vc, bt, cs = paged_case("cpu", torch.float32, [20, 5], 1, 4, 2, 64, 16, g)
    bad = bt.clone()
    bad[0, 1] = -3
    with pytest.raises(RuntimeError, match="outside"):
        op.paged_attn(qp, kc, vc, bad, cs, 0.1)
    with pytest.raises(RuntimeError, match="out of range"):
        op.write_kv_cache(
            torch.randn(1, 2, 64), torch.randn(1, 2, 64), kc, vc, torch.tensor([kc.shape[0] * 16], dtype=torch.int32)
        )


# ---- every instruction-set build: forward, backward and paged decode on awkward shapes ----------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (batch, seqlen_q, seqlen_k, n_heads, n_kv_heads, head_dim, causal): seqlen 1, 17, 123, tiles crossed
# (65, 130), head_dim 40 / 64 / 80 / 128, GQA / MQA / MHA, causal with seqlen_q > and < seqlen_k.
ISA_SHAPES = [
    (1, 1, 17, 4, 2, 40, True),
    (2, 17, 17, 2, 1, 64, True),
    (1, 123, 70, 2, 1, 80, True),
    (1, 70, 123, 2, 2, 128, False),
    (1, 65, 130, 3, 1, 64, True),
]


def grads_2x(ours, ref_out, ref_leaves, low_out, low_leaves, dout, dtype, what):
    """dq, dk, dv against the fp64 reference with the 2x rule (low precision torch's error as the yardstick)."""
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.double())
    low_grads = torch.autograd.grad(low_out, low_leaves, dout)
    for name, o, r, lo in zip("qkv", ours, ref_grads, low_grads, strict=True):
        assert o.dtype == dtype
        check_2x(o, r, lo, dtype, f"{what} d{name}")


@pytest.mark.parametrize("shape", ISA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_isa_forward_backward(cpu_isa, shape):
    b, sq, sk, h, hkv, d, causal = shape
    scale = 0.7 / d**0.5  # not the default: the scale must reach both passes
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(sum(shape))
        q, k, v = (
            rand(b, sq, h, d, dtype=dtype, gen=g),
            rand(b, sk, hkv, d, dtype=dtype, gen=g),
            rand(b, sk, hkv, d, dtype=dtype, gen=g),
        )
        dout = rand(b, sq, h, d, dtype=dtype, gen=g)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = ops.attention(*leaves, causal=causal, softmax_scale=scale, return_lse=True, backend="cpu")
        grads = torch.autograd.grad(out, leaves, dout)
        ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
        ref, ref_lse = attention_ref(*ref_leaves, causal, scale, return_lse=True)
        low_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        low = lowp_attention(*low_leaves, causal, scale)
        what = f"{cpu_isa} {dtype} {shape}"
        check_2x(out, ref, low.detach(), dtype, what)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        assert (lse[finite].double() - ref_lse[finite]).abs().max().item() < 1e-3
        grads_2x(grads, ref, ref_leaves, low, low_leaves, dout, dtype, what)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_isa_varlen(cpu_isa, causal):
    """Packed sequences with empty ones (no queries; no keys), length 1, sq < sk and sq > sk, GQA, head_dim 40."""
    lens_q, lens_k = [0, 17, 1, 66, 5, 3], [9, 17, 0, 40, 5, 1]
    h, hkv, d = 4, 2, 40
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(11 + causal)
        q, k, v, cu_q, cu_k = varlen_case("cpu", dtype, lens_q, lens_k, h, hkv, d, g)
        dout = rand(*q.shape, dtype=dtype, gen=g)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ops.attention_varlen(*leaves, cu_q, cu_k, causal=causal, backend="cpu")
        grads = torch.autograd.grad(out, leaves, dout)
        ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
        ref = attention_varlen_ref(*ref_leaves, cu_q, cu_k, causal=causal)
        low_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        lows = []
        for i in range(len(lens_q)):
            sl_q, sl_k = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            lq, lk, lv = (t[sl][None] for t, sl in zip(low_leaves, (sl_q, sl_k, sl_k), strict=True))
            lows.append(lowp_attention(lq, lk, lv, causal, d**-0.5)[0])
        low = torch.cat(lows)
        what = f"{cpu_isa} {dtype} varlen causal={causal}"
        check_2x(out, ref, low.detach(), dtype, what)
        # A sequence without keys outputs zeros and gets zero gradients.
        assert (out[int(cu_q[2]) : int(cu_q[3])] == 0).all()
        grads_2x(grads, ref, ref_leaves, low, low_leaves, dout, dtype, what)


@pytest.mark.parametrize("block_size,sq,d", [(16, 1, 40), (64, 3, 80)])
def test_isa_paged(cpu_isa, block_size, sq, d):
    seqlens = [sq, 17, 123, 64]
    h, hkv = 6, 2
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(block_size + sq)
        what = f"{cpu_isa} {dtype} paged bs={block_size} sq={sq} d={d}"
        _check_paged_cpu(dtype, seqlens, sq, h, hkv, d, block_size, g, what)
