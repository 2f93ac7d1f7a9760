"""Paged decode attention and KV-cache writes beyond test_attention.py: the Triton ops as torch sees them
(opcheck), the flash-decoding split/merge (many splits == one split, empty splits), long contexts, large
GQA groups (several row tiles), write_kv_cache casts / int64 slots / strided inputs, the CUDA kernels'
registration, and GPU-only comparisons of both GPU backends with forced split counts."""

from __future__ import annotations

import pytest
import torch

from plm_engine import ops
from plm_engine.ops import backends, extension
from plm_engine.ops.reference import gather_paged_kv, paged_attention_ref, write_kv_cache_ref
from tests.ops.test_attention import check_2x, lowp_attention, paged_case

SPLITS_ENV = "PLM_ENGINE_PAGED_ATTN_SPLITS"
HERE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK, TRITON_WHY = backends.availability("triton", torch.device(HERE), "paged_attn")
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=TRITON_WHY)
if HERE == "cuda":  # these tests then run on the GPU: carry the cuda mark (`-m cuda` selects them)
    needs_triton = pytest.mark.cuda(needs_triton)


def _triton():
    from plm_engine.ops.triton import paged_attention

    return paged_attention


def _lowp(q, kc, vc, bt, seqlens, scale):
    outs = []
    for i, n in enumerate(seqlens):
        kb, vb = gather_paged_kv(kc, bt, n, i), gather_paged_kv(vc, bt, n, i)
        outs.append(lowp_attention(q[i : i + 1], kb[None], vb[None], True, scale))
    return torch.cat(outs)


def _check_vs_ref(out, q, kc, vc, bt, cs, seqlens, what):
    d = q.shape[-1]
    ref = paged_attention_ref(q.double(), kc.double(), vc.double(), bt, cs)
    check_2x(out, ref, _lowp(q, kc, vc, bt, seqlens, d**-0.5), q.dtype, what)


@needs_triton
def test_opcheck_paged_attn():
    pa = _triton()
    g = torch.Generator().manual_seed(1)
    seqlens = [2, 21]
    q, kc, vc, bt, cs = paged_case(HERE, torch.float16, seqlens, 2, 4, 2, 32, 16, g)
    torch.library.opcheck(pa.paged_attn, (q, kc, vc, bt, cs, 32**-0.5))


@needs_triton
def test_opcheck_write_kv_cache():
    pa = _triton()
    g = torch.Generator().manual_seed(2)
    k_cache = torch.randn(3, 16, 2, 32, generator=g).to(HERE, torch.bfloat16)
    v_cache = torch.randn(3, 16, 2, 32, generator=g).to(HERE, torch.bfloat16)
    k = torch.randn(5, 2, 32, generator=g).to(HERE, torch.bfloat16)
    v = torch.randn(5, 2, 32, generator=g).to(HERE, torch.bfloat16)
    slots = torch.tensor([0, 17, -1, 47, 3], dtype=torch.int32, device=HERE)
    torch.library.opcheck(pa.write_kv_cache, (k, v, k_cache, v_cache, slots))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_splits_equal_one_split(dtype):
    """Flash-decoding's merge is exact up to rounding: 1, 3 and 7 splits agree; sequences of 3 tokens
    leave most of the 7 splits empty (lse -inf), and seqlen_q = 3 gives queries with fewer keys."""
    pa = _triton()
    g = torch.Generator().manual_seed(3)
    seqlens = [3, 40, 101]
    q, kc, vc, bt, cs = paged_case(HERE, dtype, seqlens, 3, 6, 2, 64, 16, g)
    outs = [pa.launch_paged_attn(q, kc, vc, bt, cs, 0.125, num_splits=n) for n in (1, 3, 7)]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for out in outs[1:]:
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, outs[0], atol=tol, rtol=tol)
    _check_vs_ref(outs[-1], q, kc, vc, bt, cs, seqlens, "triton 7 splits")


@needs_triton
def test_splits_env_override(monkeypatch):
    pa = _triton()
    g = torch.Generator().manual_seed(4)
    q, kc, vc, bt, cs = paged_case(HERE, torch.float16, [30], 1, 2, 1, 32, 16, g)
    monkeypatch.setenv(SPLITS_ENV, "5")
    assert pa.choose_num_splits(q.device, 1, 10_000) == 5
    out_env = ops.paged_attention(q, kc, vc, bt, cs, backend="triton")
    monkeypatch.delenv(SPLITS_ENV)
    torch.testing.assert_close(
        out_env, pa.launch_paged_attn(q, kc, vc, bt, cs, 32**-0.5, num_splits=1), atol=1e-3, rtol=1e-3
    )


def _check_triton(seed, dtype, seqlens, sq, h, hkv, d, block_size, what):
    q, kc, vc, bt, cs = paged_case(HERE, dtype, seqlens, sq, h, hkv, d, block_size, torch.Generator().manual_seed(seed))
    out = ops.paged_attention(q, kc, vc, bt, cs, backend="triton")
    _check_vs_ref(out, q, kc, vc, bt, cs, seqlens, what)


@needs_triton
def test_long_context():
    """4096 cached tokens in 16 shuffled blocks of 256, one sequence, GQA 4:1, head_dim 128."""
    _check_triton(5, torch.bfloat16, [4096], 1, 4, 1, 128, 256, "triton long context")


@needs_triton
def test_large_group_several_row_tiles():
    """MQA with 24 query heads x 3 new tokens = 72 rows per kv head: more than one row tile."""
    _check_triton(6, torch.float16, [3, 50], 3, 24, 1, 40, 32, "triton row tiles")


@needs_triton
def test_strided_q():
    """q as a slice of a fused projection (heads not contiguous with each other)."""
    g = torch.Generator().manual_seed(7)
    seqlens = [9, 33]
    _, kc, vc, bt, cs = paged_case(HERE, torch.bfloat16, seqlens, 2, 4, 2, 64, 16, g)
    fused = torch.randn(2, 2, 8, 64, generator=g).to(HERE, torch.bfloat16)
    q = fused[:, :, 2:6]
    out = ops.paged_attention(q, kc, vc, bt, cs, backend="triton")
    _check_vs_ref(out, q.contiguous(), kc, vc, bt, cs, seqlens, "triton strided q")


@needs_triton
def test_write_kv_cache_cast_int64_strided():
    """fp32 keys into a bf16 cache (rounded to nearest), int64 slots, k/v slices of a fused tensor."""
    g = torch.Generator().manual_seed(8)
    k_cache = torch.full((4, 16, 3, 24), float("nan"), dtype=torch.bfloat16, device=HERE)
    v_cache = k_cache.clone()
    fused = torch.randn(10, 8, 24, generator=g).to(HERE)
    k, v = fused[:, :3], fused[:, 4:7]
    slots = torch.randperm(64, generator=g)[:10].to(HERE)
    slots[[2, 7]] = -1
    ek, ev = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(k, v, ek, ev, slots)
    ops.write_kv_cache(k, v, k_cache, v_cache, slots, backend="triton")
    assert torch.equal(k_cache.nan_to_num(7.0), ek.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), ev.nan_to_num(7.0))


@needs_triton
def test_triton_bad_input():
    pa = _triton()
    g = torch.Generator().manual_seed(9)
    q, kc, vc, bt, cs = paged_case(HERE, torch.float16, [5], 1, 2, 1, 32, 16, g)
    with pytest.raises(ValueError, match="the caches have 1 kv heads of 32"):
        pa.launch_paged_attn(q[..., :16], kc, vc, bt, cs, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        pa.launch_paged_attn(q, kc[:, :12].contiguous(), vc[:, :12].contiguous(), bt, cs, 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        pa.launch_paged_attn(q, kc, vc, bt, cs, 1.0, num_splits=0)
    with pytest.raises(ValueError, match="cache_seqlens"):
        pa.launch_paged_attn(q, kc, vc, bt, cs[:0], 1.0)
    with pytest.raises(ValueError, match="slot_mapping"):
        pa.launch_write_kv_cache(q[:, 0, :1], q[:, 0, :1], kc, vc, torch.zeros(2, dtype=torch.int32))


def test_cuda_kernels_registered(cuda_build):
    for op in ("paged_attn", "write_kv_cache"):
        assert extension.has_kernel(op, "CUDA"), f"_C has CUDA kernels but none for plm_engine::{op}"


# ---- GPU only ----------------------------------------------------------------------------------------

GPU_BACKENDS = [pytest.param(b, marks=pytest.mark.cuda, id=b) for b in ("triton", "cuda")]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("head_dim", [64, 128, 256, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_splits_and_shapes(backend, head_dim, dtype, monkeypatch):
    """Both GPU backends: forced 1 / 5 / 64 splits agree and match the reference; GQA 8:1 with 1 and 4
    new tokens, a one-token sequence, a partial last block, shuffled tables."""
    g = torch.Generator().manual_seed(head_dim)
    for sq, bs in ((1, 16), (4, 256)):
        seqlens = [sq, 37, 1000, 2049]
        q, kc, vc, bt, cs = paged_case("cuda", dtype, seqlens, sq, 16, 2, head_dim, bs, g)
        outs = []
        for n in (1, 5, 64):
            monkeypatch.setenv(SPLITS_ENV, str(n))
            out = ops.paged_attention(q, kc, vc, bt, cs, backend=backend)
            outs.append(out)
        monkeypatch.delenv(SPLITS_ENV)
        outs.append(ops.paged_attention(q, kc, vc, bt, cs, backend=backend))  # automatic split count
        for out in outs:
            _check_vs_ref(out, q, kc, vc, bt, cs, seqlens, f"{backend} d{head_dim} sq{sq}")
            torch.testing.assert_close(out, outs[0], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_large_group_and_empty(backend):
    """MQA 32:1 with 16 new tokens (several row tiles) and a batch whose first sequence has only its
    queries cached."""
    g = torch.Generator().manual_seed(11)
    seqlens = [16, 300]
    q, kc, vc, bt, cs = paged_case("cuda", torch.bfloat16, seqlens, 16, 32, 1, 128, 32, g)
    out = ops.paged_attention(q, kc, vc, bt, cs, backend=backend)
    _check_vs_ref(out, q, kc, vc, bt, cs, seqlens, f"{backend} large group")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_write_kv_cache(backend, src_dtype):
    g = torch.Generator().manual_seed(12)
    k_cache = torch.full((8, 16, 4, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    v_cache = k_cache.clone()
    fused = torch.randn(50, 9, 128, generator=g).to("cuda", src_dtype)
    for k, v in ((fused[:, :4], fused[:, 4:8]), (fused[:, :4].contiguous(), fused[:, 4:8].contiguous())):
        slots = torch.randperm(128, generator=g)[:50].to("cuda")
        slots[::7] = -1
        ek, ev = k_cache.clone(), v_cache.clone()
        write_kv_cache_ref(k, v, ek, ev, slots)
        ops.write_kv_cache(k, v, k_cache, v_cache, slots.to(torch.int32), backend=backend)
        assert torch.equal(k_cache.nan_to_num(7.0), ek.nan_to_num(7.0))
        assert torch.equal(v_cache.nan_to_num(7.0), ev.nan_to_num(7.0))
