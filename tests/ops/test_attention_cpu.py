"""The C++ CPU attention kernels (csrc/cpu/attention.cpp) beyond the shared backend tests: op
registration (opcheck), strided inputs, head_dim 256, fully masked rows, long contexts split across
tasks, thread-count independence and the generic (non-AVX-512) build."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from plm_engine import ops
from plm_engine.ops import backends
from plm_engine.ops.attention import backend_op
from plm_engine.ops.reference import attention_ref, attention_varlen_ref, gather_paged_kv, paged_attention_ref
from tests.ops.test_attention import check_2x, lowp_attention, paged_case

pytestmark = pytest.mark.skipif(not backends.availability("cpu", torch.device("cpu"), "attn_fwd")[0],
                                reason="plm_engine._C has no CPU attention kernels")


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
    # Not test_aot_dispatch_dynamic: the registered backward recomputes through attention_varlen_ref,
    # which reads cu_seqlens on the host (data-dependent under tracing). The kernel itself is forward-only.
    torch.library.opcheck(backend_op("attn_varlen_fwd", "cpu"), (q[0], k[0], v[0], cu_q, cu_k, 14, 13, True, 0.3),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_long_context_and_chunked_prefill(dtype):
    """Contexts long enough to be split across tasks (and merged), and seqlen_q * group > 64 rows."""
    h, hkv, d = 9, 3, 64
    for block_size, sq, seqlens in ((16, 1, [3000, 5]), (128, 30, [700, 30, 1000])):
        g = torch.Generator().manual_seed(block_size)
        q, kc, vc, bt, cs = paged_case("cpu", dtype, seqlens, sq, h, hkv, d, block_size, g)
        out = ops.paged_attention(q, kc, vc, bt, cs, backend="cpu")
        ref = paged_attention_ref(q.double(), kc.double(), vc.double(), bt, cs)
        lows = [lowp_attention(q[i:i + 1], gather_paged_kv(kc, bt, n, i)[None], gather_paged_kv(vc, bt, n, i)[None],
                               True, d**-0.5) for i, n in enumerate(seqlens)]
        check_2x(out, ref, torch.cat(lows), dtype, f"paged bs={block_size} sq={sq}")


def test_thread_count_independence():
    g = torch.Generator().manual_seed(4)
    q, k, v = rand(1, 200, 6, 64, gen=g), rand(1, 200, 2, 64, gen=g), rand(1, 200, 2, 64, gen=g)
    qp, kc, vc, bt, cs = paged_case("cpu", torch.bfloat16, [2000, 77, 300], 2, 6, 2, 64, 32, g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((ops.attention(q, k, v, causal=True, return_lse=True, backend="cpu"),
                            ops.paged_attention(qp, kc, vc, bt, cs, backend="cpu")))
    finally:
        torch.set_num_threads(threads)
    (o1, l1), p1 = results[0]
    (o2, l2), p2 = results[1]
    assert torch.equal(o1, o2) and torch.equal(l1, l2) and torch.equal(p1, p2)


_GENERIC_SCRIPT = """
import torch
from plm_engine import ops
from plm_engine.ops.reference import attention_ref, paged_attention_ref
from tests.ops.test_attention import paged_case
g = torch.Generator().manual_seed(5)
for dtype in (torch.float32, torch.bfloat16):
    q, k, v = (torch.randn(1, 70, 2, 40, generator=g).to(dtype) for _ in range(3))
    out = ops.attention(q, k, v, causal=True, backend="cpu")
    err = (out.double() - attention_ref(q.double(), k.double(), v.double(), True)).abs().max().item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), (dtype, err)
    qp, kc, vc, bt, cs = paged_case("cpu", dtype, [100, 9], 1, 4, 2, 40, 16, g)
    out = ops.paged_attention(qp, kc, vc, bt, cs, backend="cpu")
    err = (out.double() - paged_attention_ref(qp.double(), kc.double(), vc.double(), bt, cs)).abs().max().item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), (dtype, err)
print("ok")
"""


def test_generic_build():
    """The portable build (what a CPU without AVX-512 runs), forced by PLM_ENGINE_CPU_ISA=generic."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PLM_ENGINE_CPU_ISA="generic", PYTHONPATH=root)
    res = subprocess.run([sys.executable, "-c", _GENERIC_SCRIPT], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_bad_input_errors():
    op = torch.ops.plm_engine
    backend_op("attn_fwd", "cpu")
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(RuntimeError, match="contiguous in head_dim"):
        op.attn_fwd(q, q, q.transpose(-1, -2).contiguous().transpose(-1, -2), False, 0.1)
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0"):
        op.attn_varlen_fwd(q[0], q[0], q[0], torch.tensor([0, 3], dtype=torch.int32),
                           torch.tensor([0, 4], dtype=torch.int32), 4, 4, False, 0.1)
    g = torch.Generator().manual_seed(0)
    qp, kc, vc, bt, cs = paged_case("cpu", torch.float32, [20, 5], 1, 4, 2, 64, 16, g)
    bad = bt.clone()
    bad[0, 1] = -3
    with pytest.raises(RuntimeError, match="outside"):
        op.paged_attn(qp, kc, vc, bad, cs, 0.1)
    with pytest.raises(RuntimeError, match="out of range"):
        op.write_kv_cache(torch.randn(1, 2, 64), torch.randn(1, 2, 64), kc, vc,
                          torch.tensor([kc.shape[0] * 16], dtype=torch.int32))
