"""ops.linear_q's Triton kernels (ops/triton/linear.py): the split-K GEMV (up to 8 rows) and the GEMM that
dequantizes inside its K loop, for Q8_0 / Q4_0 / Q4_1, against the fp64 product of the dequantized weight
(ops.reference.dequantize_gguf_ref, bit-equal to gguf's). Under the Triton interpreter on a CPU machine;
on a GPU machine at real sizes too (cuda mark)."""

from __future__ import annotations

import pytest
import torch

from plm_engine import ops
from plm_engine.ops.backends import BackendUnavailable
from plm_engine.ops.contracts.linear import GGUF_TYPES
from plm_engine.ops.reference import GGUF_BLOCKS, dequantize_gguf_ref
from tests.utils import random_blocks, triton_test_device

DEVICE, pytestmark = triton_test_device("linear_q_fwd")
TRITON_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
# ||y - ref|| / ||ref|| bounds: fp32 math throughout for fp32 x and the GEMV; the GEMM's 16-bit dots
# take the dequantized weight rounded to x's dtype.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _case(qtype: str, m: int, n: int, k: int, dtype, bias: bool, seed: int, device=DEVICE):
    qt = GGUF_TYPES[qtype]
    q = random_blocks(qt, n, k, seed).to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(device, dtype) if bias else None
    w = dequantize_gguf_ref(q.cpu(), qt).double()
    ref = x.cpu().double() @ w.t() + (b.cpu().double() if bias else 0)
    return q, x, b, ref


def _rel(y, ref):
    return ((y.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("qtype", TRITON_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 8, 9, 37], ids=lambda m: f"m{m}")  # GEMV up to 8 rows, GEMM beyond
def test_matches_the_fp64_product(qtype, dtype, m):
    # N not a multiple of the tiles; K of 3 blocks (one partial K tile), or 2 K-quant super-blocks (all 8
    # sub-blocks of each, so every scale / min position is read).
    n, k = 67, 512 if qtype.endswith("_K") else 96
    q, x, b, ref = _case(qtype, m, n, k, dtype, bias=m % 2 == 1, seed=m)
    y = ops.linear_q(x, q, qtype, b, backend="triton")
    assert y.shape == (m, n) and y.dtype == dtype and y.device == x.device
    assert torch.isfinite(y).all()
    assert _rel(y, ref) <= TOL[dtype], _rel(y, ref)


@pytest.mark.parametrize("qtype", TRITON_TYPES)
def test_leading_dims_strided_rows_and_empty(qtype):
    k = 256 if qtype.endswith("_K") else 64
    q, x, b, ref = _case(qtype, 6, 40, k, torch.float32, bias=True, seed=1)
    y = ops.linear_q(x.view(2, 3, k), q, qtype, b, backend="triton")
    assert y.shape == (2, 3, 40) and _rel(y.reshape(6, 40), ref) <= 1e-5
    wide = torch.zeros(6, 2 * k, device=x.device)
    wide[:, :k] = x
    assert _rel(ops.linear_q(wide[:, :k], q, qtype, b, backend="triton"), ref) <= 1e-5  # row stride 2k
    assert ops.linear_q(x[:0], q, qtype, b, backend="triton").shape == (0, 40)


def test_gradients_are_not_triton():
    q8 = random_blocks(GGUF_TYPES["Q8_0"], 16, 64, 0).to(DEVICE)
    with pytest.raises(BackendUnavailable, match="gradient"):
        ops.linear_q(torch.randn(1, 64, device=DEVICE, requires_grad=True), q8, "Q8_0", backend="triton")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("qtype", TRITON_TYPES)
@pytest.mark.parametrize("m", [1, 7, 64, 512], ids=lambda m: f"m{m}")
def test_real_sizes_on_the_gpu(qtype, m):
    """A 4096 x 4096 layer: the automatic choice on CUDA is Triton, and it holds the same bounds."""
    q, x, b, ref = _case(qtype, m, 4096, 4096, torch.bfloat16, bias=False, seed=m, device="cuda")
    y = ops.linear_q(x, q, qtype)
    assert _rel(y, ref) <= TOL[torch.bfloat16], _rel(y, ref)
    q, x, b, ref = _case(qtype, m, 1000, 2048, torch.float32, bias=True, seed=m, device="cuda")
    assert _rel(ops.linear_q(x, q, qtype, b), ref) <= TOL[torch.float32]


def test_block_layouts_match_the_reference():
    from plm_engine.ops.triton import linear as triton_linear

    assert all(
        GGUF_BLOCKS[q] == (triton_linear.BLOCK_VALUES[q], nbytes) for q, nbytes in triton_linear.BLOCK_BYTES.items()
    )
    assert set(triton_linear.BLOCK_BYTES) == set(triton_linear.TRITON_TYPES) == set(GGUF_TYPES.values())
