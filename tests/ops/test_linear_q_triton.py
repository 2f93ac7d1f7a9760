"""ops.linear_q's Triton kernels (plm_engine/ops/triton/linear_q.py): the GGUF blocks decoded inside the
K loop of a GEMM, and the split-K GEMV for decode, for Q8_0, Q4_1, Q4_0, Q4_K and Q6_K.

Without a GPU they run on CPU tensors under Triton's interpreter (small shapes: it is slow); the
`cuda`-marked cases run the compiled kernels on a GPU at real sizes. Every case is checked against the
fp64 product of the dequantized weight (gguf's dequantize, ops.reference) with the 2x rule: no more
than twice the error of F.linear on the dequantized weight in x's dtype (the torch backend), plus
tests/utils.ATOL.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plm_engine import ops
from plm_engine.ops import backends
from plm_engine.ops.backends import BackendUnavailable
from plm_engine.ops.contracts.linear import GGUF_TYPES
from plm_engine.ops.reference import GGUF_BLOCKS, dequantize_gguf_ref
from tests.utils import DTYPES, assert_2x_rule, gpu_backends

OP = "linear_q_fwd"
TYPES = list(GGUF_TYPES.items())
_CPU_OK = backends.availability("triton", torch.device("cpu"), OP)
# (device, backend): the interpreter here, the compiled kernels on a GPU (cuda mark).
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _CPU_OK[0], reason=_CPU_OK[1] or "ok"), id="cpu-interp"),
    *[pytest.param(p.values[0], marks=p.marks, id=p.id) for p in gpu_backends(OP) if p.values[1] == "triton"],
]
CUDA = pytest.mark.cuda
# Byte offsets of each type's fp16 fields within its block.
HALF_FIELDS = {2: (0,), 3: (0, 2), 8: (0,), 12: (0, 2), 14: (208,)}


def random_blocks(qtype: int, n: int, k: int, seed: int) -> torch.Tensor:
    """(n, row_bytes) uint8: random bytes, with every fp16 field a finite scale of a realistic size.
    (test_linear_q.py's twin: that module needs gguf, which a GPU machine may lack.)"""
    values, nbytes = GGUF_BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * (k // values), nbytes), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        scale = rng.uniform(-0.02, 0.02, raw.shape[0]).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(n, -1))


def check_against_fp64(device, qtype, dtype, m, n, k, bias, seed=0):
    q = random_blocks(qtype, n, k, seed=seed).to(device)
    x = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    y = ops.linear_q(x, q, qtype, b, backend="triton")
    w = dequantize_gguf_ref(q, qtype)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    lowp = ops.linear_q(x, q, qtype, b, backend="torch")
    assert y.dtype == dtype and y.shape == (m, n)
    assert_2x_rule(y, ref, lowp, what=f"qtype {qtype} {dtype} m={m} n={n} k={k} bias={bias}")


def k_for(qtype: int, blocks: int) -> int:
    return GGUF_BLOCKS[qtype][0] * blocks


# (M, N, blocks of K): the GEMV (M <= 16, split over K: 2-3 uneven slices under the interpreter) with one
# row and an odd count, and the GEMM (M > 16) with partial M and N tiles. K: 3 or 5 blocks of 32 values
# (a K tile half full), or 1-2 super-blocks of 256 for the K-quants.
SHAPES = [(1, 37, 1), (7, 70, 2), (19, 33, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,qtype", TYPES, ids=[t[0] for t in TYPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,kb", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_fp64_product_of_dequantized_weight(device, name, qtype, dtype, m, n, kb, bias):
    blocks = kb if GGUF_BLOCKS[qtype][0] == 256 else 2 * kb + 1
    check_against_fp64(device, qtype, dtype, m, n, k_for(qtype, blocks), bias, seed=m + qtype)


@CUDA
@pytest.mark.parametrize("device", [p for p in DEVICES if p.id != "cpu-interp"])
@pytest.mark.parametrize("name,qtype", TYPES, ids=[t[0] for t in TYPES])
@pytest.mark.parametrize("m", [1, 7, 64, 512])
def test_real_sizes_on_the_gpu(device, name, qtype, m):
    """4096 x 4096 weights as a 7B model's, bf16 and fp16 activations, decode and prefill row counts."""
    for dtype in (torch.bfloat16, torch.float16):
        check_against_fp64(device, qtype, dtype, m, 4096, 4096, bias=m == 7, seed=m)


def test_gemv_splits_k_and_gemm_does_not():
    """The decode path really cuts K into slices (the reduce runs) on long rows; the GEMM keeps one."""
    from plm_engine.ops.triton import linear_q as tq

    assert tq.split_k(1, 4096, 4096, torch.device("cpu")) > 1
    if torch.cuda.is_available():
        assert tq.split_k(1, 4096, 4096, torch.device("cuda")) > 1
    assert tq.GEMV_MAX_ROWS == tq.GEMV_CONFIG[0] == 16


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_noncontiguous_x(device):
    q = random_blocks(8, 24, 64, seed=3).to(device)
    x = torch.randn(2, 3, 128, device=device)[..., ::2]
    y = ops.linear_q(x, q, "Q8_0", backend="triton")
    ref = ops.linear_q(x.contiguous(), q, "Q8_0", backend="torch")
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_x_that_needs_a_gradient_is_refused_by_triton_and_served_by_torch(device):
    q = random_blocks(3, 8, 32, seed=4).to(device)
    x = torch.randn(2, 32, device=device, requires_grad=True)
    with pytest.raises(BackendUnavailable, match="gradient"):
        ops.linear_q(x, q, "Q4_1", backend="triton")
    ops.linear_q(x, q, "Q4_1").sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_cpu_tensors_take_the_triton_kernels_only_when_asked():
    """The automatic choice for CPU tensors never picks the (interpreted) Triton kernels."""
    assert backends.choose(torch.device("cpu"), OP, None, {}) != "triton"


@CUDA
@pytest.mark.parametrize("device", [p for p in DEVICES if p.id != "cpu-interp"])
def test_cuda_tensors_take_the_triton_kernels_automatically(device, monkeypatch):
    from plm_engine.ops.triton import linear_q as tq

    calls = []
    launch = tq._launch
    monkeypatch.setattr(tq, "_launch", lambda *a: calls.append(1) or launch(*a))
    q = random_blocks(3, 64, 256, seed=5).to(device)
    x = torch.randn(1, 256, device=device, dtype=torch.bfloat16)
    y = ops.linear_q(x, q, "Q4_1")
    assert calls == [1]
    torch.testing.assert_close(y, ops.linear_q(x, q, "Q4_1", backend="triton"), rtol=0, atol=0)


@CUDA
@pytest.mark.parametrize("device", [p for p in DEVICES if p.id != "cpu-interp"])
def test_quant_linear_moves_to_cuda_with_its_blocks(device):
    from plm_engine.layers.linear import QuantLinear

    layer = QuantLinear(256, 48, GGUF_TYPES["Q8_0"], bias=True, dtype=torch.bfloat16)
    layer.qweight.copy_(random_blocks(8, 48, 256, seed=6))
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    cpu = layer(x)
    layer = layer.to(device)
    assert layer.qweight.is_cuda
    torch.testing.assert_close(layer(x.to(device)).cpu(), cpu, rtol=2e-2, atol=2e-2)
