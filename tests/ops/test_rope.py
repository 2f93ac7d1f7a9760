"""RoPE on every backend against the reference: forward, gradients, in place, varlen, tables, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from plm_engine.ops import backends
from plm_engine.ops.reference import rope_ref
from plm_engine.ops.rope import fused_ops, rope, rope_cos_sin, rope_inv_freq
from tests.utils import DTYPES, assert_2x_rule, cpu_backends, device_backends

DEV_BACKENDS = device_backends("rope")
# The accuracy grids for the other backends; the C++ CPU kernels have their own tests under every
# instruction-set build (test_cpu_kernel_*, below).
OTHER_BACKENDS = [p for p in DEV_BACKENDS if p.values[1] != "cpu"]
# (batch, seqlen, q_heads, k_heads, head_dim, rotary_dim): GQA head counts, head_dim 40/64/80/128,
# seqlen 1 and 17, partial rotary (the rest passes through). Small token counts keep the Triton
# interpreter fast; seqlen 97 has its own test.
SHAPES = [(2, 17, 3, 1, 64, 64), (1, 1, 4, 2, 128, 128), (2, 3, 2, 2, 40, 40), (2, 5, 2, 1, 80, 32)]
MAX_POS = 128


def make_qk(device, dtype, batch, seqlen, hq, hk, head_dim, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    # Scaled and offset so that a dropped term or a swapped sin sign is far outside the tolerance.
    q = (torch.randn(batch, seqlen, hq, head_dim, generator=g) * 2 + 0.3).to(device, dtype)
    k = (torch.randn(batch, seqlen, hk, head_dim, generator=g) * 2 - 0.2).to(device, dtype)
    return q.requires_grad_(requires_grad), k.requires_grad_(requires_grad)


def tables(device, rotary_dim, n=MAX_POS, theta=10000.0):
    return rope_cos_sin(n, rotary_dim, theta, device=device)


def eager_lowp(q, k, cos, sin, interleaved, position_ids=None):
    """PyTorch eager RoPE in q's own precision (the HF rotate_half formula): the 2x rule's baseline."""
    half = cos.shape[-1]

    def rotate(x):
        c = cos[: x.shape[-3]] if position_ids is None else cos[position_ids]
        s = sin[: x.shape[-3]] if position_ids is None else sin[position_ids]
        c, s = c.to(x.dtype).unsqueeze(-2), s.to(x.dtype).unsqueeze(-2)
        if interleaved:
            c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
            xr = x[..., : 2 * half]
            rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
        else:
            c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
            xr = x[..., : 2 * half]
            rot = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
        return torch.cat((xr * c + rot * s, x[..., 2 * half :]), dim=-1)

    return rotate(q), rotate(k)


def reference(q, k, cos, sin, interleaved, position_ids=None):
    up = lambda t: t.detach().double()
    return rope_ref(up(q), up(k), cos.double(), sin.double(), interleaved, position_ids)


@pytest.mark.parametrize("device,backend", OTHER_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_forward(device, backend, dtype, shape, interleaved):
    *qk_shape, rotary_dim = shape
    q, k = make_qk(device, dtype, *qk_shape)
    cos, sin = tables(device, rotary_dim)
    q_out, k_out = rope(q, k, cos, sin, interleaved, backend=backend)
    q_ref, k_ref = reference(q, k, cos, sin, interleaved)
    q_low, k_low = eager_lowp(q, k, cos, sin, interleaved)
    for name, ours, ref, low, x in (("q", q_out, q_ref, q_low, q), ("k", k_out, k_ref, k_low, k)):
        assert ours.dtype == dtype and ours.shape == x.shape
        assert_2x_rule(ours, ref, low, dtype, what=f"rope {name}")
        # Features past rotary_dim are copied bit for bit.
        assert torch.equal(ours[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_long_sequence_with_fp16_tables(device, backend, interleaved):
    """seqlen 97, and cos/sin in q's dtype (the HF layout) rather than fp32."""
    q, k = make_qk(device, torch.float16, 1, 97, 1, 1, 80)
    cos, sin = (t.half() for t in tables(device, 80))
    q_out, k_out = rope(q, k, cos, sin, interleaved, backend=backend)
    q_ref, k_ref = reference(q, k, cos, sin, interleaved)
    q_low, k_low = eager_lowp(q, k, cos, sin, interleaved)
    assert_2x_rule(q_out, q_ref, q_low, what="rope q")
    assert_2x_rule(k_out, k_ref, k_low, what="rope k")


@pytest.mark.parametrize("device,backend", OTHER_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_backward(device, backend, dtype, interleaved, inplace):
    q0, k0 = make_qk(device, dtype, 2, 5, 3, 1, 64, seed=3, requires_grad=True)
    cos, sin = tables(device, 48)  # partial rotary: the pass-through part's gradient is the identity
    g = torch.Generator().manual_seed(11)
    dq = torch.randn(q0.shape, generator=g).to(device, dtype)
    dk = torch.randn(k0.shape, generator=g).to(device, dtype)
    loss = lambda a, b: (a.float() * dq.float()).sum() + (b.float() * dk.float()).sum()

    # In place needs non-leaf tensors; the gradient still reaches the leaves q0, k0.
    q, k = (q0 * 1, k0 * 1) if inplace else (q0, k0)
    q_out, k_out = rope(q, k, cos, sin, interleaved, inplace=inplace, backend=backend)
    if inplace:
        assert q_out is q and k_out is k
    grads = torch.autograd.grad(loss(q_out, k_out), (q0, k0))

    q64, k64 = (t.detach().double().requires_grad_() for t in (q0, k0))
    ref = rope_ref(q64, k64, cos.double(), sin.double(), interleaved)
    ref_grads = torch.autograd.grad((ref[0] * dq.double()).sum() + (ref[1] * dk.double()).sum(), (q64, k64))
    low_grads = torch.autograd.grad(loss(*eager_lowp(q0, k0, cos, sin, interleaved)), (q0, k0))
    for name, ours, ref_g, low in zip("qk", grads, ref_grads, low_grads, strict=True):
        assert ours.dtype == dtype
        assert_2x_rule(ours, ref_g, low, dtype, what=f"rope d{name}")


# ---- the C++ CPU kernels, under every instruction-set build this machine runs ------------------------

# (batch, seqlen, q_heads, k_heads, head_dim, rotary_dim): one pair; rotary halves of 1, 19, 23 and 65 (tails
# for W = 4, 8, 16, interleaved steps at both edges); partial rotary (odd half 23).
ISA_SHAPES = [(2, 2, 1, 1, 2, 2), (2, 3, 3, 1, 38, 38), (1, 5, 2, 2, 82, 46), (1, 3, 2, 1, 136, 130)]
U32 = 2.0**-24  # unit roundoff of fp32, the kernels' arithmetic


def _pair_magnitude(x, rotary_dim, interleaved):
    """|x_i| + |x_j| for each rotated feature i and its partner j, in fp64."""
    xr = x[..., :rotary_dim].detach().double().abs()
    half = rotary_dim // 2
    if interleaved:
        partner = xr.unflatten(-1, (half, 2)).flip(-1).flatten(-2)
    else:
        partner = torch.cat((xr[..., half:], xr[..., :half]), -1)
    return xr + partner


def _assert_rope_bound(ours, ref, x, rotary_dim, interleaved, what):
    """The kernel's bound: x1 c - x2 s in fp32 with one FMA (<= 2 u32 (|x1| + |x2|), as |c|, |s| <= 1),
    then one rounding to T (u_T |ref|, or half a subnormal step). Pass-through features are exact."""
    dtype = ours.dtype
    u = torch.finfo(dtype).eps / 2
    ref_r = ref[..., :rotary_dim]
    bound = u * ref_r.abs() + 3 * U32 * _pair_magnitude(x, rotary_dim, interleaved) + torch.finfo(dtype).tiny * 2 * u
    err = (ours[..., :rotary_dim].double() - ref_r).abs()
    assert (err <= bound).all(), f"{what}: error {err.max().item():.3g} over the bound"
    assert torch.equal(ours[..., rotary_dim:].double(), ref[..., rotary_dim:]), f"{what}: pass-through changed"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ISA_SHAPES, ids=str)
def test_cpu_kernel_forward(cpu_isa, dtype, shape):
    """Both layouts, out of place and in place, with fp32 and q-dtype tables, against fp64."""
    *qk_shape, rotary_dim = shape
    q, k = make_qk("cpu", dtype, *qk_shape, seed=sum(shape))
    for interleaved in (False, True):
        for tables_dtype in {torch.float32, dtype}:
            cos, sin = (t.to(tables_dtype) for t in tables("cpu", rotary_dim))
            q_ref, k_ref = reference(q, k, cos, sin, interleaved)
            what = f"{cpu_isa} {'interleaved' if interleaved else 'half'} tables {tables_dtype}"
            q_out, k_out = rope(q, k, cos, sin, interleaved, backend="cpu")
            qi, ki = q.clone(), k.clone()
            rope(qi, ki, cos, sin, interleaved, inplace=True, backend="cpu")
            for name, ours, ref, x in (("q", q_out, q_ref, q), ("k", k_out, k_ref, k)):
                assert ours.dtype == dtype and ours.shape == x.shape
                _assert_rope_bound(ours, ref, x, rotary_dim, interleaved, f"{what} {name}")
            assert torch.equal(qi, q_out) and torch.equal(ki, k_out), f"{what}: in place differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ISA_SHAPES[1:3], ids=str)
def test_cpu_kernel_backward(cpu_isa, dtype, shape):
    """The gradient is the conjugate rotation of the output gradient: same bound, with dq for q."""
    *qk_shape, rotary_dim = shape
    cos, sin = tables("cpu", rotary_dim)
    g = torch.Generator().manual_seed(11)
    for interleaved in (False, True):
        for inplace in (False, True):
            q0, k0 = make_qk("cpu", dtype, *qk_shape, seed=3, requires_grad=True)
            dq = torch.randn(q0.shape, generator=g).to(dtype)
            dk = torch.randn(k0.shape, generator=g).to(dtype)
            q, k = (q0 * 1, k0 * 1) if inplace else (q0, k0)
            q_out, k_out = rope(q, k, cos, sin, interleaved, inplace=inplace, backend="cpu")
            grads = torch.autograd.grad((q_out, k_out), (q0, k0), (dq, dk))
            q64, k64 = (t.detach().double().requires_grad_() for t in (q0, k0))
            ref = rope_ref(q64, k64, cos.double(), sin.double(), interleaved)
            ref_grads = torch.autograd.grad(ref, (q64, k64), (dq.double(), dk.double()))
            for name, ours, ref_g, d in zip("qk", grads, ref_grads, (dq, dk), strict=True):
                assert ours.dtype == dtype
                what = f"{cpu_isa} {'interleaved' if interleaved else 'half'} {'inplace' if inplace else 'out'} d{name}"
                _assert_rope_bound(ours, ref_g, d, rotary_dim, interleaved, what)


def test_cpu_kernel_thread_count_independent():
    """Each output element is computed by one thread from its own inputs: 1 and 2 threads agree bitwise."""
    if not backends.availability("cpu", torch.device("cpu"), "rope")[0]:
        pytest.skip("plm_engine._C not built")
    threads = torch.get_num_threads()
    cos, sin = tables("cpu", 64)
    for dtype in DTYPES:
        for interleaved in (False, True):
            q, k = make_qk("cpu", dtype, 2, 97, 8, 2, 80)
            results = []
            try:
                for n_threads in (1, 2):
                    torch.set_num_threads(n_threads)
                    results.append(rope(q, k, cos, sin, interleaved, backend="cpu"))
            finally:
                torch.set_num_threads(threads)
            assert all(torch.equal(a, b) for a, b in zip(*results)), (dtype, interleaved)


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_positions_and_packed_varlen(device, backend, interleaved):
    dtype = torch.bfloat16
    cos, sin = tables(device, 64)
    g = torch.Generator().manual_seed(5)
    # Per-batch positions (a decode step of sequences at different offsets) and shared (seqlen,) ones.
    q, k = make_qk(device, dtype, 3, 2, 2, 1, 64)
    for pos in (torch.randint(0, MAX_POS, (3, 2), generator=g), torch.tensor([7, 100])):
        pos = pos.to(device)
        q_out, k_out = rope(q, k, cos, sin, interleaved, position_ids=pos, backend=backend)
        q_ref, k_ref = reference(q, k, cos, sin, interleaved, pos)
        q_low, k_low = eager_lowp(q, k, cos, sin, interleaved, pos)
        assert_2x_rule(q_out, q_ref, q_low, what="rope q, positions")
        assert_2x_rule(k_out, k_ref, k_low, what="rope k, positions")
    # Packed varlen: sequences of lengths 3, 1, 5 laid end to end, positions restart per sequence.
    lengths = [3, 1, 5]
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device, torch.int32)
    qp, kp = make_qk(device, dtype, 1, sum(lengths), 2, 1, 64, seed=9)
    qp, kp = qp[0], kp[0]  # (total_tokens, heads, head_dim)
    q_out, k_out = rope(qp, kp, cos, sin, interleaved, position_ids=pos, backend=backend)
    assert q_out.shape == qp.shape and k_out.shape == kp.shape
    q_ref, k_ref = reference(qp, kp, cos, sin, interleaved, pos.long())
    q_low, k_low = eager_lowp(qp, kp, cos, sin, interleaved, pos.long())
    assert_2x_rule(q_out, q_ref, q_low, what="rope q, packed")
    assert_2x_rule(k_out, k_ref, k_low, what="rope k, packed")
    # Each packed sequence matches rotating it alone as a batch of one.
    start = 0
    for n in lengths:
        q1, k1 = rope(qp[None, start : start + n], kp[None, start : start + n], cos, sin, interleaved, backend=backend)
        torch.testing.assert_close(q_out[start : start + n], q1[0], rtol=0, atol=0)
        torch.testing.assert_close(k_out[start : start + n], k1[0], rtol=0, atol=0)
        start += n


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_inplace_on_fused_qkv_views(device, backend, interleaved):
    """q and k as strided views of one (batch, seqlen, 3, heads, head_dim) projection, rotated in place."""
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 3, 3, 2, 80, generator=g).to(device, torch.bfloat16)
    cos, sin = tables(device, 40)  # partial rotary: features 40..79 must stay untouched
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    expected = rope(q, k, cos, sin, interleaved, backend=backend)
    before = qkv.clone()
    q_out, k_out = rope(q, k, cos, sin, interleaved, inplace=True, backend=backend)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(k, expected[1], rtol=0, atol=0)
    assert torch.equal(qkv[:, :, 2], before[:, :, 2]), "v must not change"
    assert torch.equal(qkv[..., 40:], before[..., 40:]), "pass-through features must not change"


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
def test_full_width_hf_tables(device, backend):
    """HF's (max_seqlen, head_dim) tables, cat(f, f) or repeat-interleaved, give the same result."""
    q, k = make_qk(device, torch.float32, 1, 4, 2, 2, 64)
    cos, sin = tables(device, 64)
    for interleaved in (False, True):
        widen = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: torch.cat((t, t), -1))
        half_form = rope(q, k, cos, sin, interleaved, backend=backend)
        full_form = rope(q, k, widen(cos), widen(sin), interleaved, backend=backend)
        torch.testing.assert_close(full_form, half_form, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
def test_empty_and_head_count_zero(device, backend):
    cos, sin = tables(device, 64)
    q, k = torch.randn(2, 0, 3, 64, device=device), torch.randn(2, 0, 1, 64, device=device)
    q_out, k_out = rope(q, k, cos, sin, backend=backend)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    q, k = make_qk(device, torch.float32, 1, 3, 2, 0, 64)
    q_out, k_out = rope(q, k, cos, sin, backend=backend)
    assert k_out.shape == k.shape
    torch.testing.assert_close(q_out, reference(q, k, cos, sin, False)[0].float())


def _inputs_for_opcheck(device, interleaved, with_positions):
    q, k = make_qk(device, torch.float32, 2, 3, 2, 1, 40, requires_grad=True)
    cos, sin = tables(device, 32, n=8)
    pos = torch.tensor([[0, 5, 2], [7, 1, 3]], device=device) if with_positions else None
    return q, k, cos, sin, pos, interleaved


@pytest.mark.parametrize("device,backend", [p for p in DEV_BACKENDS if p.values[1] in ("cpu", "cuda", "triton")])
def test_opcheck(device, backend):
    out_of_place, in_place = fused_ops(backend)
    for interleaved, with_pos in ((False, True), (True, False)):
        args = _inputs_for_opcheck(device, interleaved, with_pos)
        torch.library.opcheck(out_of_place, (*args, False))
        q, k, *rest = args
        torch.library.opcheck(in_place, (q.detach().clone(), k.detach().clone(), *rest, True))


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
def test_bad_input_errors(device, backend):
    q, k = make_qk(device, torch.float32, 1, 4, 2, 1, 64)
    cos, sin = tables(device, 64, n=8)
    call = lambda *a, **kw: rope(*a, backend=backend, **kw)
    with pytest.raises(ValueError, match="head_dim must be positive and even"):
        call(q[..., :63], k[..., :63], cos[:, :30], sin[:, :30])
    with pytest.raises(ValueError, match="cos/sin have 8 positions but seqlen is 9"):
        call(*make_qk(device, torch.float32, 1, 9, 2, 1, 64), cos, sin)
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 8\)"):
        call(q, k, cos, sin, position_ids=torch.tensor([0, 1, 2, 8], device=device))
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 8\)"):
        call(q, k, cos, sin, position_ids=torch.tensor([0, -1, 2, 3], device=device))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        call(q, k, cos, sin, position_ids=torch.arange(3, device=device))
    with pytest.raises(ValueError, match="need position_ids"):
        call(q[0], k[0], cos, sin)
    with pytest.raises(ValueError, match="k dtype"):
        call(q, k.half(), cos, sin)
    with pytest.raises(ValueError, match="float32 or q's dtype"):
        call(q.half(), k.half(), cos.bfloat16(), sin.bfloat16())
    with pytest.raises(ValueError, match="is on meta"):
        call(q, k, cos.to("meta"), sin)
    with pytest.raises(ValueError, match="does not match q shape"):
        call(q, k[..., :32], cos, sin)
    with pytest.raises(ValueError, match="cos/sin last dim"):
        call(q, k, torch.randn(8, 40, device=device), torch.randn(8, 40, device=device))
    with pytest.raises(ValueError, match="cos and sin must both be"):
        call(q, k, cos, sin[:, :16])
    with pytest.raises(ValueError, match="integer tensor"):
        call(q, k, cos, sin, position_ids=torch.zeros(4, device=device))
    with pytest.raises(ValueError, match="inplace needs"):
        call(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, cos, sin, inplace=True)


def test_cpp_ops_reject_bad_arguments_without_crashing():
    """The _C entry points validate on their own too: direct calls get RuntimeError, not a segfault."""
    if not backends.availability("cpu", torch.device("cpu"), "rope")[0]:
        pytest.skip("plm_engine._C not built")
    op, op_ = fused_ops("cpu")
    q, k = torch.randn(1, 4, 2, 64), torch.randn(1, 4, 1, 64)
    cos, sin = rope_cos_sin(8, 64)
    with pytest.raises(RuntimeError, match="outside the cos/sin table"):
        op(q, k, cos, sin, torch.tensor([[0, 1, 2, 99]]), False, False)
    with pytest.raises(RuntimeError, match="int64"):
        op(q, k, cos, sin, torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), False, False)
    with pytest.raises(RuntimeError, match="exceeds head_dim"):
        op(q[..., :32], k[..., :32], cos, sin, None, False, False)
    with pytest.raises(RuntimeError, match="4 dims"):
        op_(q[0], k[0], cos, sin, None, False, False)
    with pytest.raises(RuntimeError, match="last dim"):
        op(q.transpose(2, 3), torch.randn(1, 4, 2, 64).transpose(2, 3), cos[:, :1], sin[:, :1], None, False, False)


# ---- cos/sin tables --------------------------------------------------------------------------------


def test_cos_sin_tables_match_the_direct_formula():
    theta, dim = 500000.0, 64
    cos, sin = rope_cos_sin(torch.tensor([0, 3, 4095]), dim, theta)
    for row, p in enumerate((0, 3, 4095)):
        for i in range(dim // 2):
            angle = p * theta ** (-2 * i / dim)
            assert math.isclose(cos[row, i].item(), math.cos(angle), abs_tol=1e-6)
            assert math.isclose(sin[row, i].item(), math.sin(angle), abs_tol=1e-6)
    assert rope_cos_sin(5, 8)[0].shape == (5, 4)


def test_llama3_scaling_matches_the_direct_formula():
    """Llama 3.1's rope_scaling, frequency by frequency from its definition."""
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    dim, theta = 128, 500000.0
    got = rope_inv_freq(dim, theta, scaling)
    for i in range(dim // 2):
        f = 1.0 / theta ** (2 * i / dim)
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:  # high frequencies: unchanged
            want = f
        elif wavelen > 8192 / 1.0:  # low frequencies: interpolated by the factor
            want = f / 8.0
        else:  # in between: a smooth blend of the two
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want = (1 - smooth) * f / 8.0 + smooth * f
        assert math.isclose(got[i].item(), want, rel_tol=1e-12), i
    cos, sin = rope_cos_sin(torch.tensor([10000]), dim, theta, scaling)
    torch.testing.assert_close(cos[0].double(), torch.cos(10000 * got), rtol=0, atol=1e-6)
    # Without "rope_type" the llama3 keys are recognised; "linear" divides every frequency.
    no_type = {key: v for key, v in scaling.items() if key != "rope_type"}
    torch.testing.assert_close(rope_inv_freq(dim, theta, no_type), got)
    torch.testing.assert_close(
        rope_inv_freq(dim, theta, {"rope_type": "linear", "factor": 2.0}), rope_inv_freq(dim, theta) / 2
    )


def test_table_errors():
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin(4, 7)
    with pytest.raises(ValueError, match="unsupported rope_type"):
        rope_inv_freq(8, scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="needs original_max_position_embeddings"):
        rope_inv_freq(
            8, scaling={"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        )
    with pytest.raises(ValueError, match="integers"):
        rope_cos_sin(torch.tensor([0.5]), 8)


def test_automatic_choice_and_explicit_errors():
    q, k = make_qk("cpu", torch.float64, 1, 2, 1, 1, 8)
    cos, sin = rope_cos_sin(4, 8, dtype=torch.float64)
    # float64 has no fused kernel: automatic dispatch runs the reference instead of failing.
    torch.testing.assert_close(rope(q, k, cos, sin), rope_ref(q, k, cos, sin))
    with pytest.raises(backends.BackendUnavailable, match="float32/float16/bfloat16"):
        rope(q, k, cos, sin, backend="cpu")
    with pytest.raises(backends.BackendUnavailable, match="cuda tensors"):
        rope(q.float(), k.float(), cos.float(), sin.float(), backend="cuda")
    assert [p.id for p in cpu_backends("rope")] == ["cpu", "triton", "torch"]
