"""ops.linear_q: GGUF-quantized weights (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) without dequantizing them first.

gguf's own dequantize is the reference for the block layouts; random bytes are valid blocks once their
fp16 scales are finite. The C++ kernel (every ISA build) must equal ops.linear's kernel on the
dequantized weight bit for bit, which has its own fp64 bound (tests/ops/test_linear.py), and the fp64
product directly within that bound.
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

gguf = pytest.importorskip("gguf")

HAVE_KERNEL = backends.availability("cpu", torch.device("cpu"), "linear_q_fwd")
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL[0], reason=HAVE_KERNEL[1] or "ok")
TYPES = list(GGUF_TYPES.items())
# Byte offsets of each type's fp16 fields within its block.
HALF_FIELDS = {2: (0,), 3: (0, 2), 8: (0,), 12: (0, 2), 14: (208,)}


def random_blocks(qtype: int, n: int, k: int, seed: int) -> torch.Tensor:
    """(n, row_bytes) uint8: random bytes, with every fp16 field a finite scale of a realistic size."""
    values, nbytes = GGUF_BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * (k // values), nbytes), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        scale = rng.uniform(-0.02, 0.02, raw.shape[0]).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(n, -1))


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


@needs_kernel
@pytest.mark.parametrize("name,qtype", TYPES, ids=[t[0] for t in TYPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,n,kb", SHAPES, ids=str)
def test_kernel_equals_linear_on_the_dequantized_weight(cpu_isa, name, qtype, dtype, m, n, kb):
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


@needs_kernel
def test_leading_dims_and_the_automatic_choice():
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
