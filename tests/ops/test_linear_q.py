"""ops.linear_q: GGUF-quantized weights (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) without dequantizing them first.

gguf's own dequantize is the reference for the block layouts; random bytes are valid blocks once their
fp16 scales are finite. The C++ kernel has two paths (csrc/cpu/linear.cpp):
- exact (every type; PLM_ENGINE_LINEAR_Q=exact forces it): must equal ops.linear's kernel on the
  dequantized weight bit for bit, which has its own fp64 bound (tests/ops/test_linear.py), and the fp64
  product directly within that bound;
- int8 (Q8_0 / Q4_0 / Q4_1, few rows; PLM_ENGINE_LINEAR_Q=int8 forces it): x quantized per block of
  32 to int8 (quantize_x_q8 below, the kernel's fp32 operations), integer dot products: within a tight
  bound of the fp64 product of the weight's blocks with x so quantized (only the fp32 scaling rounds),
  and within the stated quantization bound of the product with x itself.
Every ISA build (cpu_isa fixture) runs both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plm_engine import ops
from plm_engine.ops import backends
from plm_engine.ops.contracts.linear import GGUF_TYPES
from plm_engine.ops.reference import GGUF_BLOCKS, dequantize_gguf_ref, linear_q_ref
from tests.ops.test_linear import kernel_error_bound
from tests.utils import random_blocks

gguf = pytest.importorskip("gguf")

HAVE_KERNEL = backends.availability("cpu", torch.device("cpu"), "linear_q_fwd")
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL[0], reason=HAVE_KERNEL[1] or "ok")
TYPES = list(GGUF_TYPES.items())


@pytest.mark.parametrize("name,qtype", TYPES, ids=[t[0] for t in TYPES])
def test_reference_dequantize_is_ggufs(name, qtype):
    """dequantize_gguf_ref returns gguf.quants.dequantize's values, bit for bit."""
    values, _ = GGUF_BLOCKS[qtype]
    q = random_blocks(qtype, 5, 2 * max(values, 256), seed=qtype)
    ref = gguf.quants.dequantize(q.numpy(), gguf.GGMLQuantizationType[name])
    ours = dequantize_gguf_ref(q, qtype)
    assert ours.shape == ref.shape
    assert np.array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))


# (M, N, K in blocks of 256 values): one row and several, tiles of 4 rows and their remainders, a last
# block of 1..15 weight rows.
SHAPES = [(1, 37, 1), (3, 16, 2), (9, 1, 1), (33, 17, 3)]


@pytest.fixture
def linear_q_path(request, monkeypatch):
    """PLM_ENGINE_LINEAR_Q for the test: the C++ kernel reads it at every call."""
    monkeypatch.setenv("PLM_ENGINE_LINEAR_Q", request.param)
    return request.param


@needs_kernel
@pytest.mark.parametrize("linear_q_path", ["exact"], indirect=True)
@pytest.mark.parametrize("name,qtype", TYPES, ids=[t[0] for t in TYPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,n,kb", SHAPES, ids=str)
def test_kernel_equals_linear_on_the_dequantized_weight(cpu_isa, linear_q_path, name, qtype, dtype, m, n, kb):
    k = 256 * kb
    q = random_blocks(qtype, n, k, seed=m + n + kb)
    g = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    w = dequantize_gguf_ref(q, qtype)
    for bias in (None, b):
        y = ops.linear_q(x, q, name, bias, backend="cpu")
        assert y.dtype == dtype and y.shape == (m, n)
        same = ops.linear(x.float(), w, None if bias is None else bias.float(), backend="cpu").to(dtype)
        assert torch.equal(y, same), (y - same).abs().max()
    if dtype == torch.float32:
        bound, y64 = kernel_error_bound(x, w, b, dtype)
        err = (ops.linear_q(x, q, qtype, b, backend="cpu").double() - y64).abs()
        assert bool((err <= bound).all()), (err - bound).max()


# ---- the int8 path -----------------------------------------------------------------------------------

INT8_TYPES = [(n, t) for n, t in TYPES if n in ("Q8_0", "Q4_0", "Q4_1")]


def quantize_x_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's quantization of fp32 x (M, K) per block of 32: d = amax / 127, q = round(x / d)
    (half to even; 0 where d = 0), s = d * sum(q), all in fp32. Returns d (M, K/32), q (M, K) int64, s."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1) / torch.tensor(127.0)
    q = torch.round(xb / torch.where(d > 0, d, torch.ones_like(d))[..., None])
    s = d * q.sum(-1)
    return d, q.reshape(x.shape).long(), s


def parse_blocks(q: torch.Tensor, qtype: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q8_0 / Q4_0 / Q4_1 rows -> d (N, nb), c (N, nb), v (N, K) int64 with w = d * v + c exactly."""
    values, nbytes = GGUF_BLOCKS[qtype]
    n = q.shape[0]
    raw = q.numpy().reshape(n, -1, nbytes)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if qtype == 8:
        v = raw[..., 2:].view(np.int8).astype(np.int64)
        c = np.zeros_like(d)
    else:
        nib = raw[..., -16:].astype(np.int64)
        v = np.concatenate([nib & 15, nib >> 4], axis=-1)
        c = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64) if qtype == 3 else -8.0 * d
    return d, c, v.reshape(n, -1)


def int8_reference(x: torch.Tensor, q: torch.Tensor, qtype: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 y of the weight's blocks against x quantized as the kernel does (exact but for fp64
    rounding), and the bound on the kernel's fp32 rounding of it: (nb + 8) 2^-23 * sum |terms|."""
    dx, qx, sx = quantize_x_q8(x)
    dw, c, v = parse_blocks(q, qtype)
    m, k = qx.shape
    nb = k // 32
    isum = np.einsum("nbj,mbj->mnb", v.reshape(-1, nb, 32), qx.numpy().reshape(m, nb, 32))
    iabs = np.einsum("nbj,mbj->mnb", np.abs(v.reshape(-1, nb, 32)), np.abs(qx.numpy().reshape(m, nb, 32)))
    scale = dw[None] * dx.double().numpy()[:, None]  # (m, n, nb)
    off = c[None] * sx.double().numpy()[:, None]
    y = (scale * isum + off).sum(-1)
    mag = (np.abs(scale) * iabs + np.abs(off)).sum(-1)
    return torch.from_numpy(y), torch.from_numpy((nb + 8) * 2.0**-23 * mag)


def quantization_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|W x - W x~| where x~ is x quantized per block: |x - x~| <= d / 2 (1 + 2^-20) with d = amax / 127."""
    xb = x.double().reshape(x.shape[0], -1, 32)
    half_step = (xb.abs().amax(-1, keepdim=True) / 254 * (1 + 2.0**-20)).expand_as(xb).reshape(x.shape)
    return half_step @ w.double().abs().t()


# (M, N, K): every row count of the decode tiles (1..8: a 4-row tile plus 1..3), odd N (a last weight
# block of 1..15 rows), K of 1, 2, 3 blocks and a long row.
INT8_SHAPES = [(1, 37, 32), (2, 17, 64), (3, 1, 96), (4, 16, 32), (5, 33, 64), (6, 7, 96), (7, 19, 32), (8, 5, 4096)]


@needs_kernel
@pytest.mark.parametrize("linear_q_path", ["int8"], indirect=True)
@pytest.mark.parametrize("name,qtype", INT8_TYPES, ids=[t[0] for t in INT8_TYPES])
@pytest.mark.parametrize("m,n,k", INT8_SHAPES, ids=str)
def test_int8_path_against_the_quantized_product(cpu_isa, linear_q_path, name, qtype, m, n, k):
    q = random_blocks(qtype, n, k, seed=m * 7 + n + k)
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g) * torch.rand(m, k // 32, 1, generator=g).repeat_interleave(32, 1).reshape(m, k)
    x[0, :32] = 0.0  # a block of zeros: scale 0
    bias = torch.randn(n, generator=g)
    y64, bound = int8_reference(x, q, qtype)
    y = ops.linear_q(x, q, name, backend="cpu")
    err = (y.double() - y64).abs()
    assert bool((err <= bound).all()), (err - bound).max()
    # ... and the product with x itself, within the quantization bound.
    w = dequantize_gguf_ref(q, qtype)
    exact = x.double() @ w.double().t()
    assert bool(((y.double() - exact).abs() <= bound + quantization_bound(x, w)).all())
    # The bias is added in fp32 before the one rounding; bf16 / fp16 x are widened exactly first.
    yb = ops.linear_q(x, q, name, bias, backend="cpu")
    assert torch.equal(yb, y + bias)
    for dtype in (torch.bfloat16, torch.float16):
        x16, b16 = x.to(dtype), bias.to(dtype)
        y16 = ops.linear_q(x16, q, name, b16, backend="cpu")
        assert torch.equal(y16, ops.linear_q(x16.float(), q, name, b16.float(), backend="cpu").to(dtype))


@needs_kernel
@pytest.mark.parametrize("linear_q_path", ["int8"], indirect=True)
def test_int8_path_is_independent_of_threads_and_rows(cpu_isa, linear_q_path):
    q = random_blocks(3, 67, 576, seed=5)
    x = torch.randn(7, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.linear_q(x, q, "Q4_1", backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ops.linear_q(x, q, "Q4_1", backend="cpu"), one)
    for r in range(7):
        assert torch.equal(ops.linear_q(x[r : r + 1], q, "Q4_1", backend="cpu"), one[r : r + 1])


@needs_kernel
@pytest.mark.parametrize("linear_q_path", ["int8"], indirect=True)
def test_int8_path_keeps_nan_and_inf_visible(cpu_isa, linear_q_path):
    """A NaN or inf in a block of x makes that block's scale NaN: the row's outputs are NaN, never finite."""
    q = random_blocks(8, 9, 96, seed=6)
    x = torch.randn(3, 96)
    x[0, 40] = float("nan")
    x[1, 70] = float("inf")
    y = ops.linear_q(x, q, "Q8_0", backend="cpu")
    assert bool(y[:2].isnan().all()) and bool(y[2].isfinite().all())


@needs_kernel
@pytest.mark.parametrize("rows,path", [(1, "int8"), (64, "exact")])
def test_automatic_choice_by_rows(cpu_isa, monkeypatch, rows, path):
    """Unset, PLM_ENGINE_LINEAR_Q lets the rows choose: the int8 path for a decode step's few rows,
    the exact path for a prefill's many; K-quants always take the exact path."""
    monkeypatch.delenv("PLM_ENGINE_LINEAR_Q", raising=False)
    q = random_blocks(3, 21, 256, seed=7)
    x = torch.randn(rows, 256)
    y = ops.linear_q(x, q, "Q4_1", backend="cpu")
    monkeypatch.setenv("PLM_ENGINE_LINEAR_Q", path)
    assert torch.equal(y, ops.linear_q(x, q, "Q4_1", backend="cpu"))
    qk = random_blocks(12, 21, 256, seed=7)
    yk = ops.linear_q(x, qk, "Q4_K", backend="cpu")
    monkeypatch.setenv("PLM_ENGINE_LINEAR_Q", "exact")
    assert torch.equal(yk, ops.linear_q(x, qk, "Q4_K", backend="cpu"))


@needs_kernel
def test_bad_path_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PLM_ENGINE_LINEAR_Q", "fast")
    with pytest.raises(RuntimeError, match="PLM_ENGINE_LINEAR_Q must be exact, int8 or auto"):
        torch.ops.plm_engine.linear_q_fwd.default(torch.randn(1, 32), random_blocks(8, 2, 32, seed=0), 8, None)


@needs_kernel
def test_leading_dims_and_the_automatic_choice(monkeypatch):
    # 6 rows: the exact path (the int8 path takes up to 4 rows on AVX-512 + VNNI but 8-16 on AVX2 / generic).
    monkeypatch.setenv("PLM_ENGINE_LINEAR_Q", "exact")
    q = random_blocks(GGUF_TYPES["Q4_1"], 24, 256, seed=3)
    x = torch.randn(2, 3, 256)
    y = ops.linear_q(x, q, "q4_1")
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, linear_q_ref(x.reshape(6, 256), q, 3).view(2, 3, 24), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,qtype", TYPES, ids=[t[0] for t in TYPES])
def test_torch_backend_matches_the_reference(name, qtype):
    q = random_blocks(qtype, 7, 512, seed=1)
    x = torch.randn(4, 512, dtype=torch.float64)
    y = ops.linear_q(x.float(), q, qtype, backend="torch")
    ref = x @ dequantize_gguf_ref(q, qtype).double().t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_x_that_needs_a_gradient_gets_one():
    """The kernel has no backward: x that needs a gradient takes the torch path, the weight gets none."""
    q = random_blocks(GGUF_TYPES["Q8_0"], 5, 256, seed=2)
    x = torch.randn(3, 256, requires_grad=True)
    ops.linear_q(x, q, "Q8_0").sum().backward()
    torch.testing.assert_close(x.grad, dequantize_gguf_ref(q, 8).sum(0).expand(3, 256))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"qtype": "Q5_0"}, "unsupported GGUF type 'Q5_0'"),
        ({"qtype": 7}, "unsupported GGUF type id 7"),
        ({"qtype": True}, "unsupported GGUF type id True"),
        ({"k": 255}, "multiple of the type's block of 32 values"),
        ({"row_bytes": 19}, "rows hold 19 bytes, but 256 values of this type take 160"),
        ({"qdtype": torch.int8}, "2-dim uint8 tensor"),
        ({"bias_shape": (4,)}, r"bias must be a tensor of shape \(5,\)"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    k = kwargs.get("k", 256)
    q = random_blocks(3, 5, 256, seed=0)
    if "row_bytes" in kwargs:
        q = q[:, : kwargs["row_bytes"]]
    if "qdtype" in kwargs:
        q = q.to(kwargs["qdtype"])
    bias = torch.zeros(kwargs["bias_shape"]) if "bias_shape" in kwargs else None
    with pytest.raises(ValueError, match=match):
        ops.linear_q(torch.randn(2, k), q, kwargs.get("qtype", "Q4_1"), bias)


@needs_kernel
def test_cpp_checks_guard_direct_calls():
    """The _C op itself refuses what it would index out of bounds (a direct torch.ops call)."""
    op = torch.ops.plm_engine.linear_q_fwd.default
    q = random_blocks(3, 5, 256, seed=0)
    with pytest.raises(RuntimeError, match="rows hold"):
        op(torch.randn(2, 288), q, 3, None)
    with pytest.raises(RuntimeError, match="unsupported GGUF type id"):
        op(torch.randn(2, 256), q, 9, None)


@needs_kernel
def test_opcheck():
    """Schema, fake impl and dispatch of the _C op (no autograd: the weight is integer blocks)."""
    backends.prepare("linear_q_fwd", "cpu")
    op = torch.ops.plm_engine.linear_q_fwd.default
    q = random_blocks(12, 19, 512, seed=4)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 512).to(dtype)
        torch.library.opcheck(op, (x, q, 12, torch.randn(19).to(dtype)), test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(op, (x, q, 12, None), test_utils=("test_schema", "test_faketensor"))


@needs_kernel
def test_int8_path_perplexity_is_bounded(monkeypatch):
    """bench_quant's gguf_int8 row on 256 tokens of Hamlet: SmolLM2-135M's Q4_1 + Q8_0 blocks with every
    linear_q call on the int8 path stay within 3% of the dequantized model's perplexity (on 4096 tokens
    +0.34%, llama.cpp's own int8 path +0.25%: benchmarks/results/NOTES.md)."""
    import sys

    from tests.models.test_gguf import smollm2_path

    smollm2_path()
    sys.path.insert(0, "benchmarks")
    try:
        import bench_quant
    finally:
        sys.path.remove("benchmarks")
    from plm_engine.models import load_tokenizer

    monkeypatch.delenv("PLM_ENGINE_LINEAR_Q", raising=False)
    ids = bench_quant.play_tokens(load_tokenizer("smollm2-135m"), "hamlet", 256)
    ref = bench_quant.perplexity(bench_quant.load("smollm2-135m", "float32"), ids, 256)
    model = bench_quant.load("smollm2-135m", "gguf_int8")
    exact = bench_quant.perplexity_of("gguf", model, ids, 256)
    int8 = bench_quant.perplexity_of("gguf_int8", model, ids, 256)
    assert abs(exact / ref - 1) < 1e-4, (exact, ref)
    # 256 tokens is a noisy measure, and each build sums the blocks' products in its own order: measured
    # +1.5% (avx512 + VNNI), +2.2% (avx2), +1.7% (generic) here; on 4096 tokens +0.34% (NOTES.md).
    assert int8 != exact and abs(int8 / ref - 1) < 0.03, (int8, ref)
