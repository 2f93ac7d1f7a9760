"""The CUDA C++ kernels (csrc/cuda/*_kernels.cuh) on the CPU, under the thread-model emulation of
csrc/testing/cuda_emu.h, against the references with the same 2x rule as every other backend; and tests
of the emulator itself (barrier, shuffles, votes, and broken kernels that must fail, not hang or pass).

The kernels run one emulated thread at a time, so shapes are small but awkward: 1, odd sizes,
non-powers of two, partial warps of rows, grids smaller than the work (grid-stride loops), both the
16-byte-pack and the element-wise paths, and the chunked paths of rows longer than the register cache.
Skipped with the reason when the emulation cannot be built here (no C++ compiler or no CUDA headers).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plm_engine.ops.reference import (
    gather_paged_kv,
    gelu_ref,
    layer_norm_ref,
    paged_attention_ref,
    rms_norm_ref,
    rope_ref,
    softmax_ref,
    swiglu_ref,
    write_kv_cache_ref,
)
from tests import cuda_emu
from tests.ops.test_attention import check_2x, lowp_attention, paged_case
from tests.utils import DTYPES, assert_2x_rule


@pytest.fixture(scope="module")
def emu():
    try:
        ops, why = cuda_emu.load()
    except Exception as e:  # noqa: BLE001 - the compiler's message is the failure
        pytest.fail(f"the CUDA emulation extension failed to build: {e}")
    if ops is None:
        pytest.skip(why)
    return ops


def randn(shape, dtype, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + shift).to(dtype)


# ---- the emulator itself -------------------------------------------------------------------------


def test_barrier_exchanges_through_shared_memory(emu):
    blocks, threads = 3, 96
    out = emu.selftest("neighbour", blocks * threads, blocks, threads).view(blocks, threads)
    t = torch.arange(threads)
    expected = ((t + 1) % threads * 7 + 17).unsqueeze(0) + 1000 * torch.arange(blocks).unsqueeze(1)
    assert torch.equal(out, expected.int())


def test_missing_barrier_is_caught_by_the_comparison(emu):
    """Without __syncthreads a thread reads its neighbour's slot before (forward order) or after
    (reverse order) it is written; the alternating order gets the first kind in block 0."""
    blocks, threads = 2, 64
    out = emu.selftest("neighbour_no_barrier", blocks * threads, blocks, threads).view(blocks, threads)
    good = emu.selftest("neighbour", blocks * threads, blocks, threads).view(blocks, threads)
    assert not torch.equal(out, good)


def test_lanes_of_a_warp_are_not_implicitly_synchronous(emu):
    threads = 64
    t = torch.arange(threads)
    neighbour = t - t % 32 + (t % 32 + 1) % 32
    assert torch.equal(emu.selftest("warp_neighbour", threads, 1, threads), (neighbour * 3 + 5).int())
    # Lane l reads lane l + 1's slot before lane l + 1 has run (forward order in block 0).
    assert not torch.equal(emu.selftest("warp_neighbour_no_sync", threads, 1, threads), (neighbour * 3 + 9).int())


def _shfl_expected(threads):
    """CUDA's shuffle semantics, written independently of the emulator: a source lane outside the
    caller's width-segment (or past the warp) gives the caller's own value."""

    def val(warp, lane):
        return 1 + lane * 10 + warp * 1000

    def seg(warp, lane, w, src):
        base = lane - lane % w
        return val(warp, src if base <= src < base + w else lane)

    rows = []
    for t in range(threads):
        lane, warp = t % 32, t // 32
        rows.append(
            [
                val(warp, lane ^ 1),
                val(warp, lane ^ 16),
                seg(warp, lane, 32, lane + 3),
                seg(warp, lane, 32, lane - 5),
                val(warp, 7),
                seg(warp, lane, 8, lane ^ 4),
                seg(warp, lane, 16, lane + 3),
                seg(warp, lane, 8, lane - 2),
                val(warp, lane - lane % 4 + 6 % 4),
                val(warp, lane ^ 2),
            ]
        )
    return torch.tensor(rows, dtype=torch.int32)


def test_shuffles(emu):
    threads = 64
    out = emu.selftest("shfl", threads * 10, 1, threads).view(threads, 10)
    assert torch.equal(out, _shfl_expected(threads))


def test_shuffle_with_a_partial_mask(emu):
    out = emu.selftest("shfl_half_mask", 32, 1, 32)
    lane = torch.arange(32)
    expected = torch.where(lane < 16, 100 + (lane ^ 8), 100 + lane)
    assert torch.equal(out, expected.int())


def test_votes(emu):
    threads = 64
    out = emu.selftest("vote", threads * 4, 1, threads).view(threads, 4)
    ballot = sum(1 << lane for lane in range(32) if lane % 3 == 0)
    ballot = ballot - (1 << 32) if ballot >= 1 << 31 else ballot  # as int32
    assert (out[:, 0] == ballot).all() and (out[:, 1] == 1).all()
    assert (out[:, 2] == 1).all() and (out[:, 3] == 0).all()


def test_atomics_and_builtin_indices(emu):
    assert emu.selftest("atomic", 2, 5, 96).tolist() == [5 * 96, 5 * 96 - 1]
    out = emu.selftest("indices", 2 * 3 * 2 * 4 * 2 * 3 * 6, 1, 1).view(2, 3, 2, 3, 2, 4, 6)  # bz,by,bx,tz,ty,tx
    for bz, by, bx, tz, ty, tx in [(0, 0, 0, 0, 0, 0), (1, 2, 1, 2, 1, 3), (0, 1, 1, 1, 0, 2)]:
        assert out[bz, by, bx, tz, ty, tx].tolist() == [tx, ty, tz, bx, by, bz]


@pytest.mark.parametrize(
    "name,message",
    [
        ("broken_divergent_shfl", "exited while .* waits for it in __shfl_xor_sync"),
        ("broken_partial_barrier", "exited while 16 thread\\(s\\) wait at __syncthreads"),
        ("broken_two_barriers", "divergent __syncthreads"),
        ("broken_deadlock", "deadlock in block \\(0,0,0\\): no thread can make progress"),
        ("broken_shfl_outside_mask", "reads lane 16, which is not in the mask"),
        ("invalid_block", "invalid launch: block \\(2048,1,1\\)"),
    ],
)
def test_broken_kernels_fail_with_a_clear_error(emu, name, message):
    # Each is undefined behaviour (a hang, at best) or a launch error on a GPU: here a clear error.
    with pytest.raises(RuntimeError, match=message):
        emu.selftest(name, 64, 1, 64)
    # The emulator is usable again after the error.
    assert emu.selftest("atomic", 2, 1, 32).tolist() == [32, 31]


@pytest.fixture
def thread_order(emu, request):
    """Runs the test with the emulator resuming threads in the given order, restored afterwards."""
    old = emu.set_order(request.param)
    yield request.param
    emu.set_order(old)


# ---- norms ---------------------------------------------------------------------------------------

# (rows, n, fwd max_blocks, bwd blocks): n = 1; odd n (element-wise path); n = 40 on warp-per-row blocks
# of 4 rows with a partial last block and a grid-stride loop; n = 1024 (16-byte packs, several warps);
# n = 8193 (longer than the register cache of 1024 x 8 / 512 x 16 elements: the chunked paths).
NORM_SHAPES = [(3, 1, 0, 0), (5, 123, 2, 2), (37, 40, 3, 3), (4, 1024, 0, 2), (2, 8193, 0, 1)]


def _norm_case(dtype, rows, n, kind, residual, weight_fp32=False):
    seed = rows * 10007 + n
    wdtype = torch.float32 if weight_fp32 else dtype
    x = randn((rows, n), dtype, seed, 2.0, 0.5)
    w = (torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) + 0.5).to(wdtype)
    b = randn(n, wdtype, seed + 2, 0.3) if kind == "layer" else None
    r = randn((rows, n), dtype, seed + 3) if residual else None
    dy = randn((rows, n), dtype, seed + 4)
    dh = randn((rows, n), dtype, seed + 5) if residual else None
    return x, w, b, r, dy, dh


def _norm_refs(kind, x, w, b, r, dy, dh, dtype):
    """fp64 reference outputs and gradients (through the rounded h = x + r, like the kernels), and the same
    computation in PyTorch's low precision (the 2x rule's baseline)."""
    eps = 1e-5 if kind == "layer" else 1e-6
    h = x if r is None else x + r
    n = x.shape[-1]

    def graph(h_, w_, b_, lowp):
        if kind == "layer":
            if lowp:
                return F.layer_norm(h_, (n,), w_, b_, eps)
            return layer_norm_ref(h_, w_, b_, eps)
        return F.rms_norm(h_, (n,), w_, eps) if lowp else rms_norm_ref(h_, w_, eps)

    out = {}
    for name, conv, lowp in (("ref", lambda t: t.double(), False), ("low", lambda t: t.to(dtype), True)):
        hh = conv(h).requires_grad_()
        ww = conv(w).requires_grad_()
        bb = conv(b).requires_grad_() if b is not None else None
        y = graph(hh, ww, bb, lowp)
        loss = (y.double() * dy.double()).sum()
        grads = torch.autograd.grad(loss, [hh, ww] + ([bb] if bb is not None else []))
        dx = grads[0] + (dh.to(grads[0].dtype) if dh is not None else 0)
        out[name] = (y.detach(), dx, grads[1], grads[2] if b is not None else None)
    return out["ref"], out["low"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n,max_blocks,bwd_blocks", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_norm_forward_backward(emu, dtype, rows, n, max_blocks, bwd_blocks, kind, residual):
    is_rms = kind == "rms"
    x, w, b, r, dy, dh = _norm_case(dtype, rows, n, kind, residual)
    eps = 1e-6 if is_rms else 1e-5
    y, h, mean, rstd = emu.norm_fwd(x, w, b, r, eps, is_rms, max_blocks)
    ref, low = _norm_refs(kind, x, w, b, r, dy, dh, dtype)
    if residual:
        assert torch.equal(h, x + r), "h must be x + residual rounded to x's dtype"
    assert_2x_rule(y, ref[0], low[0], dtype, what=f"{kind} forward")
    h_used = h if residual else x
    hf = h_used.double()
    exp_mean = hf.mean(-1) if not is_rms else None
    var = hf.var(-1, unbiased=False) if not is_rms else hf.square().mean(-1)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(var + eps), rtol=2e-5, atol=0)
    if not is_rms:
        torch.testing.assert_close(mean.double(), exp_mean, rtol=1e-5, atol=1e-6)

    dx, dw, db = emu.norm_bwd(dy, dh, h_used, w, mean, rstd, b is not None, is_rms, bwd_blocks)
    assert_2x_rule(dx, ref[1], low[1], dtype, what=f"{kind} dx")
    assert_2x_rule(dw, ref[2], low[2], dtype, what=f"{kind} dweight")
    if b is not None:
        assert_2x_rule(db, ref[3], low[3], dtype, what=f"{kind} dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,residual", [("layer", True), ("rms", False)])
def test_norm_chunked_rows_in_packs(emu, dtype, kind, residual):
    """n = 16392: 16-byte packs on a row longer than the forward's register cache (1024 threads x 16)
    and the backward's (512 x 16), so both run their chunked loops on the packed path."""
    test_norm_forward_backward(emu, dtype, 1, 16392, 0, 1, kind, residual)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_fp32_weight_with_bf16_input(emu, kind):
    is_rms = kind == "rms"
    x, w, b, r, dy, dh = _norm_case(torch.bfloat16, 6, 96, kind, True, weight_fp32=True)
    y, h, mean, rstd = emu.norm_fwd(x, w, b, r, 1e-6 if is_rms else 1e-5, is_rms, 0)
    ref, low = _norm_refs(kind, x, w, b, r, dy, dh, torch.bfloat16)
    assert_2x_rule(y, ref[0], low[0], torch.bfloat16, what="mixed forward")
    dx, dw, db = emu.norm_bwd(dy, dh, h, w, mean, rstd, b is not None, is_rms, 2)
    assert dw.dtype == torch.float32
    assert_2x_rule(dx, ref[1], low[1], torch.bfloat16, what="mixed dx")
    # The baseline runs all in bf16 (its dweight too), so the fp32 dweight is held to that bound.
    assert_2x_rule(dw, ref[2], low[2], torch.bfloat16, what="mixed dweight")


@pytest.mark.parametrize("thread_order", ["forward", "reverse"], indirect=True)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_in_one_block_under_both_thread_orders(emu, thread_order, kind):
    """One row, one block of 8 warps: alternating orders alone would run it forward only."""
    is_rms = kind == "rms"
    dtype = torch.float16
    x, w, b, r, dy, dh = _norm_case(dtype, 1, 2000, kind, True)
    y, h, mean, rstd = emu.norm_fwd(x, w, b, r, 1e-6 if is_rms else 1e-5, is_rms, 0)
    ref, low = _norm_refs(kind, x, w, b, r, dy, dh, dtype)
    assert_2x_rule(y, ref[0], low[0], dtype, what=f"{kind} forward ({thread_order})")
    dx, dw, db = emu.norm_bwd(dy, dh, h, w, mean, rstd, b is not None, is_rms, 1)
    assert_2x_rule(dx, ref[1], low[1], dtype, what=f"{kind} dx ({thread_order})")
    assert_2x_rule(dw, ref[2], low[2], dtype, what=f"{kind} dweight ({thread_order})")


# ---- softmax -------------------------------------------------------------------------------------

SOFTMAX_CASES = [
    ((3, 1, 1), False),
    ((2, 3, 7), False),
    ((1, 2, 1000), False),
    ((2, 5, 7), True),
    ((1, 9, 4), True),
    ((1, 3, 1025), True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,causal", SOFTMAX_CASES, ids=str)
def test_softmax_forward_backward(emu, dtype, shape, causal):
    scale = 0.37
    x = randn(shape, dtype, sum(shape), 3.0, 1.0)
    y = emu.softmax_fwd(x, scale, causal)
    assert_2x_rule(
        y,
        softmax_ref(x.double(), scale=scale, causal=causal),
        softmax_ref(x, scale=scale, causal=causal),
        dtype,
        what="softmax forward",
    )
    dy = randn(shape, dtype, sum(shape) + 1, 3.0, 1.0)
    dx = emu.softmax_bwd(dy, y, scale)
    x64 = x.double().requires_grad_()
    (ref_dx,) = torch.autograd.grad(softmax_ref(x64, scale=scale, causal=causal), x64, dy.double())
    xl = x.clone().requires_grad_()
    (low_dx,) = torch.autograd.grad(softmax_ref(xl, scale=scale, causal=causal), xl, dy)
    assert_2x_rule(dx, ref_dx, low_dx, dtype, what="softmax dx")


@pytest.mark.parametrize("thread_order", ["forward", "reverse"], indirect=True)
def test_softmax_one_row_under_both_thread_orders(emu, thread_order):
    x = randn((1, 1, 3001), torch.float32, 11, 3.0)
    y = emu.softmax_fwd(x, 0.5, False)
    assert_2x_rule(
        y,
        softmax_ref(x.double(), scale=0.5),
        softmax_ref(x, scale=0.5),
        torch.float32,
        what=f"softmax ({thread_order})",
    )


def test_softmax_masked_and_infinite_rows(emu):
    x = randn((1, 4, 33), torch.float32, 3)
    x[0, 1] = float("-inf")  # every entry masked: zeros
    x[0, 2, ::2] = float("-inf")
    y = emu.softmax_fwd(x, 1.0, False)
    assert torch.equal(y[0, 1], torch.zeros(33))
    assert_2x_rule(y, softmax_ref(x.double()), softmax_ref(x), torch.float32, what="masked rows")


# ---- activations ---------------------------------------------------------------------------------

# (rows, n, strided, max_grid_y): one element; odd rows that are flattened into one; 16-byte packs
# (n = 2048); gate/up as column halves of one (rows, 2n) tensor (not flattenable) with a row grid
# smaller than the rows.
ACT_SHAPES = [(1, 1, False, 0), (3, 123, False, 0), (2, 2048, False, 0), (5, 40, True, 2), (7, 37, True, 3)]
ACT_OPS = ["swiglu", "gelu", "gelu_tanh"]


def _act_inputs(op, dtype, rows, n, strided):
    seed = rows * 1009 + n
    if op != "swiglu":
        base = randn((rows, 2 * n), dtype, seed, 3.0, 0.1)
        return [base[:, :n] if strided else base[:, :n].contiguous()]
    gu = randn((rows, 2 * n), dtype, seed, 3.0, 0.1)
    gate, up = gu[:, :n], gu[:, n:]
    return [gate, up] if strided else [gate.contiguous(), up.contiguous()]


def _act_fn(op, lowp):
    if op == "swiglu":
        return (lambda g, u: F.silu(g) * u) if lowp else swiglu_ref
    approx = "tanh" if op == "gelu_tanh" else "none"
    return (lambda x: F.gelu(x, approximate=approx)) if lowp else (lambda x: gelu_ref(x, approx))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n,strided,max_grid_y", ACT_SHAPES, ids=str)
@pytest.mark.parametrize("op", ACT_OPS)
def test_activation_forward_backward(emu, dtype, rows, n, strided, max_grid_y, op):
    inputs = _act_inputs(op, dtype, rows, n, strided)
    tanh = op == "gelu_tanh"
    kind = "swiglu" if op == "swiglu" else "gelu"
    (y,) = emu.activation(f"{kind}_fwd", tanh, inputs, 1, max_grid_y)
    up64 = [t.double().requires_grad_() for t in inputs]
    low = [t.clone().requires_grad_() for t in inputs]
    ref_y, low_y = _act_fn(op, False)(*up64), _act_fn(op, True)(*low)
    assert_2x_rule(y, ref_y, low_y.detach(), dtype, what=f"{op} forward")

    dy = randn((rows, n), dtype, rows + n, 1.0)
    grads = emu.activation(f"{kind}_bwd", tanh, [dy] + inputs, len(inputs), max_grid_y)
    ref_g = torch.autograd.grad(ref_y, up64, dy.double())
    low_g = torch.autograd.grad(low_y, low, dy)
    for i, (ours, r, lo) in enumerate(zip(grads, ref_g, low_g, strict=True)):
        assert_2x_rule(ours, r, lo, dtype, what=f"{op} grad {i}")


# ---- RoPE ----------------------------------------------------------------------------------------

# (batch, seqlen, hq, hk, head_dim, rotary_dim, positions): one pair; full rotary on 16-byte packs;
# partial rotary (a copy pass) with a half that breaks the packs; GQA with explicit positions.
ROPE_SHAPES = [
    (1, 1, 1, 1, 2, 2, False),
    (2, 3, 4, 2, 64, 64, False),
    (1, 5, 3, 1, 80, 40, False),
    (2, 4, 3, 1, 48, 48, True),
]


def _rope_tables(rotary_dim, n_pos, dtype):
    inv = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rope_lowp(x, cos, sin, interleaved, pos):
    """PyTorch in x's own precision (rotate_half formula): the 2x rule's baseline."""
    half = cos.shape[-1]
    c, s = (cos[pos] if pos is not None else cos[: x.shape[1]]), (sin[pos] if pos is not None else sin[: x.shape[1]])
    c, s = c.to(x.dtype).unsqueeze(-2), s.to(x.dtype).unsqueeze(-2)
    xr = x[..., : 2 * half]
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    else:
        c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        rot = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    return torch.cat((xr * c + rot * s, x[..., 2 * half :]), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("mode", ["out", "inplace", "conjugate"])
def test_rope(emu, dtype, shape, interleaved, mode):
    b, s, hq, hk, d, rd, with_pos = shape
    n_pos = 16
    q = randn((b, s, hq, d), dtype, b * 100 + d, 2.0, 0.3)
    k = randn((b, s, hk, d), dtype, b * 100 + d + 1, 2.0, -0.2)
    # fp32 tables for fp32 inputs and for one 16-bit case each; tables in the input dtype otherwise.
    cos, sin = _rope_tables(rd, n_pos, torch.float32 if (dtype == torch.float32 or with_pos) else dtype)
    pos = torch.randint(0, n_pos, (b, s), generator=torch.Generator().manual_seed(5)) if with_pos else None
    sin_used = -sin if mode == "conjugate" else sin
    if mode == "inplace":
        q_out, k_out = q.clone(), k.clone()
        emu.rope_(q_out, k_out, cos, sin, pos, interleaved, False)
    else:
        q_out, k_out = emu.rope(q, k, cos, sin, pos, interleaved, mode == "conjugate")
    ref = rope_ref(q.double(), k.double(), cos.double(), sin_used.double(), interleaved, pos)
    for name, ours, x, r in (("q", q_out, q, ref[0]), ("k", k_out, k, ref[1])):
        low = _rope_lowp(x, cos, sin_used, interleaved, pos)
        assert_2x_rule(ours, r, low, dtype, what=f"rope {name} ({mode})")


# ---- paged decode attention and the KV-cache write -----------------------------------------------

# (cache seqlens, seqlen_q, n_heads, n_kv_heads, head_dim, block_size, num_splits): every row tile
# kind (1, 4 and 8 query rows per block, several tiles for a big group), head_dim padded (40 -> 64,
# 80 -> 128) or not, splits that end up empty, and sequences shorter than the query count window.
PAGED_CASES = [
    ([1, 17, 70], 1, 2, 2, 64, 16, 1),
    ([33, 5], 1, 4, 2, 40, 8, 3),
    ([9, 64], 4, 8, 1, 80, 16, 2),
    ([130], 2, 4, 1, 128, 32, 4),
    ([20], 1, 1, 1, 256, 16, 1),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PAGED_CASES, ids=str)
def test_paged_attention(emu, dtype, case):
    seqlens, sq, h, hkv, d, block_size, splits = case
    gen = torch.Generator().manual_seed(sum(seqlens) + d)
    q, kc, vc, bt, cs = paged_case("cpu", dtype, seqlens, sq, h, hkv, d, block_size, gen)
    scale = d**-0.5
    out = emu.paged_attn(q, kc, vc, bt, cs, scale, splits)
    ref = paged_attention_ref(q.double(), kc.double(), vc.double(), bt, cs)
    lows = []
    for i, n in enumerate(seqlens):
        kb, vb = gather_paged_kv(kc, bt, n, i), gather_paged_kv(vc, bt, n, i)
        lows.append(lowp_attention(q[i : i + 1], kb[None], vb[None], True, scale))
    check_2x(out, ref, torch.cat(lows), dtype, f"paged attention {case}")


# (in dtype, cache dtype, head_dim, slot dtype): 16-byte packs with a conversion, the element-wise path
# (head_dim 12), and int32 slots.
WRITE_CASES = [
    (torch.float32, torch.bfloat16, 64, torch.int64),
    (torch.float16, torch.float16, 12, torch.int32),
    (torch.bfloat16, torch.float32, 40, torch.int64),
]


@pytest.mark.parametrize("tin,tout,d,slot_dtype", WRITE_CASES, ids=str)
def test_write_kv_cache(emu, tin, tout, d, slot_dtype):
    n_tokens, hkv, num_blocks, block_size = 9, 3, 5, 4
    k = randn((n_tokens, hkv, d), tin, 1)
    v = randn((n_tokens, hkv, d), tin, 2)
    perm = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(3))[:n_tokens]
    slots = perm.to(slot_dtype)
    slots[[2, 6]] = -1  # padding tokens are skipped
    kc = randn((num_blocks, block_size, hkv, d), tout, 4)
    vc = randn((num_blocks, block_size, hkv, d), tout, 5)
    k_ref, v_ref = kc.clone(), vc.clone()
    write_kv_cache_ref(k, v, k_ref, v_ref, slots)
    emu.write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref)
    # k one element off 16-byte alignment takes the element-wise path and lands the same.
    kc2, vc2 = randn(kc.shape, tout, 4), randn(vc.shape, tout, 5)
    kw = torch.empty(k.numel() + 1, dtype=tin)[1:].view(k.shape).copy_(k)
    emu.write_kv_cache(kw, v, kc2, vc2, slots)
    assert torch.equal(kc2, k_ref) and torch.equal(vc2, v_ref)
