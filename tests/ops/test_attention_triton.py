"""The Triton attention ops as torch sees them (opcheck), and what test_attention.py does not reach:
strided q/k/v views of a fused QKV projection, head_dim 8 and 256, empty sequences, fully masked rows'
gradients, bad direct calls, and memory: no (seqlen x seqlen) buffer in forward or backward."""

from __future__ import annotations

import pytest
import torch

from plm_engine.ops.reference import attention_ref, attention_varlen_ref
from tests.utils import ATOL, max_err, triton_test_device

# On a GPU machine every test here runs on the GPU and carries the cuda mark; elsewhere they run under
# the Triton interpreter on CPU tensors. Where the expectation differs by device, the test says so.
DEVICE, pytestmark = triton_test_device("attn_fwd")


def _mod():
    from plm_engine.ops.triton import attention

    return attention


def _rand(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _lowp(q, k, v, causal, scale):
    """PyTorch attention in the low dtype (scores and P @ V; softmax in fp32): the 2x-rule baseline."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    kk, vv = k.repeat_interleave(h // hkv, dim=2), v.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk).float() * scale
    if causal:
        i, j = torch.arange(sq).unsqueeze(1), torch.arange(sk).unsqueeze(0)
        s = s.masked_fill((j > i + sk - sq).to(s.device), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


def _check_2x(ours, ref, low, dtype, what):
    assert torch.isfinite(ours).all(), f"{what}: NaN/inf"
    bound = 2 * max_err(low, ref) + ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert max_err(ours, ref) <= bound, f"{what}: error {max_err(ours, ref):.3g} > {bound:.3g}"


def _dense_vs_reference(q, k, v, causal, dtype, what):
    """Forward (out, lse) and all gradients of the Triton op against fp64, with the 2x rule."""
    mod = _mod()
    scale = q.shape[-1] ** -0.5
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = mod.triton_attn_fwd(*leaves, causal, scale)
    g = torch.Generator().manual_seed(1)
    dout = _rand(*out.shape, dtype=dtype, gen=g)
    grads = torch.autograd.grad(out, leaves, dout)
    r64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention_ref(*r64, causal, scale, return_lse=True)
    ref_grads = torch.autograd.grad(ref, r64, dout.double())
    low_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low = _lowp(*low_in, causal, scale)
    low_grads = torch.autograd.grad(low, low_in, dout)
    _check_2x(out, ref, low.detach(), dtype, f"{what} out")
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert max_err(lse[fin], ref_lse[fin]) < 1e-2
    for name, ours, r, lg in zip("qkv", grads, ref_grads, low_grads):
        _check_2x(ours, r, lg, dtype, f"{what} d{name}")
    return out, lse, grads


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_opcheck(varlen):
    mod = _mod()
    g = torch.Generator().manual_seed(0)
    dtype, h, hkv, d, causal, scale = torch.bfloat16, 2, 1, 16, True, 0.3
    if varlen:
        cu_q, cu_k = _cu([3, 6]), _cu([5, 4])
        q = _rand(9, h, d, dtype=dtype, gen=g).requires_grad_()
        k = _rand(9, hkv, d, dtype=dtype, gen=g).requires_grad_()
        v = _rand(9, hkv, d, dtype=dtype, gen=g).requires_grad_()
        meta = (cu_q, cu_k, 6, 5, causal, scale)
        fwd, bwd = mod.triton_attn_varlen_fwd, mod.triton_attn_varlen_bwd
    else:
        q = _rand(1, 7, h, d, dtype=dtype, gen=g).requires_grad_()
        k = _rand(1, 5, hkv, d, dtype=dtype, gen=g).requires_grad_()
        v = _rand(1, 5, hkv, d, dtype=dtype, gen=g).requires_grad_()
        meta = (causal, scale)
        fwd, bwd = mod.triton_attn_fwd, mod.triton_attn_bwd
    torch.library.opcheck(fwd, (q, k, v, *meta))
    out, lse = fwd(q, k, v, *meta)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    torch.library.opcheck(bwd, (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), *meta))


def test_strided_qkv_from_fused_projection():
    """q, k, v as views of one (b, s, 3, h, d) QKV tensor (and of a GQA (b, s, h + 2 hkv, d) one) are read
    in place: the results equal those of contiguous copies exactly, and the reference within the 2x rule."""
    mod = _mod()
    g = torch.Generator().manual_seed(2)
    dtype = torch.bfloat16
    b, s, h, d = 2, 37, 2, 32
    qkv = _rand(b, s, 3, h, d, dtype=dtype, gen=g)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous() and q.stride(-1) == 1
    out, lse, grads = _dense_vs_reference(q, k, v, True, dtype, "fused qkv")
    leaves = [t.contiguous().requires_grad_() for t in (q, k, v)]
    out_c, lse_c = mod.triton_attn_fwd(*leaves, True, d**-0.5)
    dout = _rand(*out.shape, dtype=dtype, gen=torch.Generator().manual_seed(1))
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    for ours, ref in zip(grads, torch.autograd.grad(out_c, leaves, dout)):
        assert torch.equal(ours, ref)

    # GQA packing (Llama-style fused projection): q heads then k heads then v heads along one dim.
    hkv = 1
    packed = _rand(b, s, h + 2 * hkv, d, dtype=dtype, gen=g)
    q, k, v = packed.split([h, hkv, hkv], dim=2)
    _dense_vs_reference(q, k, v, False, dtype, "fused gqa qkv")
    # Varlen on the packed (total, heads, d) view.
    flat = packed.reshape(b * s, h + 2 * hkv, d)
    qv, kv, vv = flat.split([h, hkv, hkv], dim=1)
    cu = _cu([s] * b)
    out_v, lse_v = mod.triton_attn_varlen_fwd(qv, kv, vv, cu, cu, s, s, False, d**-0.5)
    out_d, lse_d = mod.triton_attn_fwd(q, k, v, False, d**-0.5)
    assert torch.equal(out_v.reshape(out_d.shape), out_d)
    assert torch.equal(lse_v, lse_d.permute(1, 0, 2).reshape(h, b * s))


def test_last_dim_not_contiguous():
    """A q whose head_dim is strided (a transposed view) is copied in, and the output written back
    in the layout the fake tensors promise (empty_like q)."""
    g = torch.Generator().manual_seed(3)
    dtype = torch.float16
    q = _rand(1, 19, 16, 2, dtype=dtype, gen=g).transpose(-1, -2)  # (1, 19, 2, 16), stride(-1) = 2
    k = _rand(1, 23, 2, 16, dtype=dtype, gen=g)
    v = _rand(1, 23, 2, 16, dtype=dtype, gen=g)
    out, _, grads = _dense_vs_reference(q, k, v, True, dtype, "strided head_dim")
    assert out.stride() == torch.empty_like(q).stride() and grads[0].stride() == torch.empty_like(q).stride()


@pytest.mark.parametrize("shape", [(1, 20, 27, 3, 1, 256), (2, 33, 17, 4, 2, 8)], ids=["hd256-mqa", "hd8-gqa"])
def test_head_dim_extremes(shape):
    b, sq, sk, h, hkv, d = shape
    g = torch.Generator().manual_seed(d)
    dtype = torch.bfloat16
    q, k, v = (_rand(b, n, hh, d, dtype=dtype, gen=g) for n, hh in ((sq, h), (sk, hkv), (sk, hkv)))
    _dense_vs_reference(q, k, v, True, dtype, f"head_dim {d}")


def test_fully_masked_rows_and_empty_sequences():
    """Causal with seqlen_q > seqlen_k: the first rows see no key -> zeros, lse = -inf, zero gradients,
    no NaN anywhere. Varlen sequences with no keys, or no queries, behave the same way."""
    mod = _mod()
    g = torch.Generator().manual_seed(4)
    dtype = torch.float16
    q, k, v = (
        _rand(1, 40, 2, 16, dtype=dtype, gen=g),
        _rand(1, 9, 1, 16, dtype=dtype, gen=g),
        _rand(1, 9, 1, 16, dtype=dtype, gen=g),
    )
    out, lse, (dq, dk, dv) = _dense_vs_reference(q, k, v, True, dtype, "sq > sk causal")
    assert (out[:, :31] == 0).all() and torch.isneginf(lse[:, :, :31]).all() and (dq[:, :31] == 0).all()

    lens_q, lens_k = [4, 0, 5, 3], [0, 6, 7, 2]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q = _rand(sum(lens_q), 2, 16, dtype=dtype, gen=g).requires_grad_()
    k = _rand(sum(lens_k), 2, 16, dtype=dtype, gen=g).requires_grad_()
    v = _rand(sum(lens_k), 2, 16, dtype=dtype, gen=g).requires_grad_()
    out, lse = mod.triton_attn_varlen_fwd(q, k, v, cu_q, cu_k, 5, 7, True, 0.25)
    assert (out[:4] == 0).all() and torch.isneginf(lse[:, :4]).all()
    ref, ref_lse = attention_varlen_ref(
        q.double(), k.double(), v.double(), cu_q, cu_k, causal=True, softmax_scale=0.25, return_lse=True
    )
    assert max_err(out, ref) < 2e-3 and torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    for grad in (dq, dk, dv):
        assert torch.isfinite(grad).all()
    assert (dq[:4] == 0).all() and (dk[:6] == 0).all() and (dv[:6] == 0).all()  # seq 0: no keys; seq 1: no queries
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.double(), allow_unused=True)
    for ours, r in zip((dq, dk, dv), ref_grads):
        assert max_err(ours, r) < 1e-2 * max(1.0, r.abs().max().item())


def test_bad_direct_calls():
    mod = _mod()
    q = torch.randn(1, 4, 2, 16, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        mod.triton_attn_fwd(q, q[:, :, :1].expand(1, 4, 3, 16), q[:, :, :1].expand(1, 4, 3, 16), False, 1.0)
    with pytest.raises(ValueError, match="head_dim 16 != k head_dim 8"):
        mod.triton_attn_fwd(q, q[..., :8], q[..., :8], False, 1.0)
    out, lse = mod.triton_attn_fwd(q, q, q, False, 1.0)
    with pytest.raises(ValueError, match="lse must have shape"):
        mod.triton_attn_bwd(out, q, q, q, out, lse[:, :1], False, 1.0)
    qv = q[0]
    with pytest.raises(ValueError, match="1-d"):
        mod.triton_attn_varlen_fwd(qv, qv, qv, _cu([4])[None], _cu([4]), 4, 4, False, 1.0)
    with pytest.raises(ValueError, match="lengths differ"):
        mod.triton_attn_varlen_fwd(qv, qv, qv, _cu([4]), _cu([2, 2]), 4, 4, False, 1.0)


def test_launchers_allocate_no_score_matrix():
    """Every tensor the forward and backward allocate (through torch's allocator: outputs, lse, delta,
    and the interpreter's copies of the arguments) is O(seqlen * head_dim): none is seqlen x seqlen."""
    if DEVICE != "cpu":
        pytest.skip(
            "CPU allocator accounting (interpreter only); on a GPU test_no_quadratic_memory_on_gpu "
            "measures device memory"
        )
    from torch.profiler import ProfilerActivity, profile

    mod = _mod()
    g = torch.Generator().manual_seed(5)
    s, d = 256, 16
    q, k, v = (torch.randn(1, s, 1, d, generator=g).requires_grad_() for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out, _ = mod.triton_attn_fwd(q, k, v, True, d**-0.5)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    # An op's self memory is what it allocated outside its child ops: one tensor for aten::empty & co.
    allocs = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    assert allocs, "the profiler recorded no allocations"
    q_bytes = q.numel() * q.element_size()
    # fp32 scores would take s * s * 4 B = 16 x q_bytes here.
    assert max(allocs) <= q_bytes, f"largest allocation {max(allocs)} B, q is {q_bytes} B"


@pytest.mark.cuda
def test_no_quadratic_memory_on_gpu():
    mod = _mod()
    s, d = 16384, 64
    q, k, v = (torch.randn(1, s, 1, d, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    dout = torch.randn_like(q)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, _ = mod.triton_attn_fwd(q, k, v, True, d**-0.5)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # out, lse, delta, dq, dk, dv: about 5 x q's 2 MiB; the bf16 scores would be 512 MiB.
    assert extra < 16 * q.numel() * q.element_size(), f"{extra} B allocated"
    assert all(torch.isfinite(t).all() for t in grads)


@pytest.mark.cuda
def test_head_offset_past_int32():
    """q and out in a (batch, heads, seqlen, head_dim) layout seen as (b, s, h, d) views: head 2 starts at
    2 * stride_qh = 2**31 elements while stride_qh itself (2**30) fits int32, so the head offset must be
    computed in int64. 6 GiB of bf16 for q (and as much for out); 16 keys keep the work small."""
    mod = _mod()
    h, s, d = 3, 2**22, 256
    q = torch.empty(1, h, s, d, device="cuda", dtype=torch.bfloat16).normal_().transpose(1, 2)
    assert q.stride(2) == 2**30 and q.stride(1) == d
    g = torch.Generator().manual_seed(7)
    k, v = (_rand(1, 16, 1, d, dtype=torch.bfloat16, gen=g) for _ in range(2))
    scale = d**-0.5
    out, lse = mod.triton_attn_fwd(q, k, v, False, scale)
    rows = torch.cat([torch.arange(4), torch.arange(s - 4, s)]).cuda()
    for head in (0, 2):
        qs = q[:, rows, head : head + 1]
        ref, ref_lse = attention_ref(qs.double(), k.double(), v.double(), False, scale, return_lse=True)
        assert max_err(out[:, rows, head : head + 1], ref) < 2e-2, head
        assert max_err(lse[:, head : head + 1, rows], ref_lse) < 1e-2, head


def test_unaligned_launch_picks_unaligned_config(monkeypatch):
    """3 heads of 40: row stride 120, not a multiple of 16, so Triton cannot vectorise the tile loads
    and the launchers must take the unaligned (smaller-tile) table, which report-kernels compiles as
    align1; the results still match the reference. An aligned call keeps the aligned table."""
    mod = _mod()
    picked = []
    real = mod.launch_config

    def recording(kernel, head_dim, interpret=False, aligned=True):
        picked.append((kernel, aligned))
        return real(kernel, head_dim, interpret, aligned)

    monkeypatch.setattr(mod, "launch_config", recording)
    g = torch.Generator().manual_seed(6)
    dtype = torch.bfloat16
    q, k, v = (_rand(1, n, 3, 40, dtype=dtype, gen=g) for n in (19, 23, 23))
    _dense_vs_reference(q, k, v, True, dtype, "h=3 d=40")
    assert {kern for kern, _ in picked} == set(mod.KERNELS)
    assert not any(aligned for _, aligned in picked), picked

    # head_dim 200 (row stride 600): the forward runs unaligned; the backward has no unaligned
    # configuration at BLOCK_D 256 and runs the aligned one on realigned copies of its inputs.
    picked.clear()
    q, k, v = (_rand(1, n, 3, 200, dtype=dtype, gen=g) for n in (9, 11, 11))
    _dense_vs_reference(q, k, v, False, dtype, "h=3 d=200")
    assert all(aligned == (kern != "fwd") for kern, aligned in picked), picked

    picked.clear()
    q, k, v = (_rand(1, n, 2, 32, dtype=dtype, gen=g) for n in (16, 16, 16))
    out, _ = mod.triton_attn_fwd(q.requires_grad_(), k, v, False, 0.2)
    torch.autograd.grad(out, q, torch.ones_like(out))
    assert picked and all(aligned for _, aligned in picked), picked


def test_kernel_specs_cover_both_tables():
    """kernel_specs() lists the aligned table under align16 only and the unaligned one under align1
    only, so report-kernels checks exactly what the launchers can run."""
    mod = _mod()
    specs = mod.kernel_specs()
    assert {s.alignments for s in specs} == {(16,), (1,)}
    for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
        for block_d in mod.BLOCK_DS:
            for aligned, alignment in ((True, 16), (False, 1)):
                if not aligned and block_d not in mod._GPU_CONFIGS_UNALIGNED[kernel]:
                    with pytest.raises(ValueError, match="no unaligned"):
                        mod.launch_config(kernel, block_d, aligned=False)
                    continue
                cfg = mod.launch_config(kernel, block_d, aligned=aligned)
                assert any(
                    s.name.startswith(f"attn_{kernel}[hd={block_d},BLOCK_M={cfg.block_m},BLOCK_N={cfg.block_n},")
                    and s.num_warps == cfg.num_warps
                    and s.num_stages == cfg.num_stages
                    and s.alignments == (alignment,)
                    for s in specs
                ), (kernel, block_d, aligned)
