"""ops.linear against the fp64 reference: the C++ CPU kernel (every ISA build) and F.linear fallback."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from plm_engine import ops
from plm_engine.ops import backends
from plm_engine.ops.linear import cpu_kernel_isa, kernel_max_rows, linear, linear_op
from plm_engine.ops.reference import linear_ref
from tests.utils import DTYPES, assert_2x_rule

HAVE_KERNEL = backends.availability("cpu", torch.device("cpu"), "linear_fwd")
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL[0], reason=HAVE_KERNEL[1] or "ok")
BACKENDS = [pytest.param("cpu", marks=needs_kernel), "torch"]
# (M, K, N): every M of {1, 3, 17, 33, 100}, K of {8, 40, 576, 1000} (K tails: 8 and 40 are not
# multiples of 16 or 32, 1000 neither), N of {1, 7, 1536, 5000} (a last block of 1..15 weight rows).
SHAPES = [(1, 576, 1536), (1, 1000, 5000), (3, 40, 7), (3, 1000, 1), (17, 8, 1536), (17, 576, 7),
          (33, 40, 5000), (33, 1000, 1536), (100, 576, 1), (100, 8, 7), (1, 8, 1), (4, 576, 33)]


def make(shape, dtype, seed, scale=1.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).requires_grad_(requires_grad)


def inputs(m, k, n, dtype, with_bias, requires_grad=False):
    x = make((m, k), dtype, 0, requires_grad=requires_grad)
    w = make((n, k), dtype, 1, scale=k**-0.5, requires_grad=requires_grad)
    b = make((n,), dtype, 2, requires_grad=requires_grad) if with_bias else None
    return x, w, b


def ref64(x, w, b):
    return linear_ref(x.detach().double(), w.detach().double(), None if b is None else b.detach().double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m,k,n", SHAPES, ids=str)
def test_forward(backend, dtype, with_bias, m, k, n):
    x, w, b = inputs(m, k, n, dtype, with_bias)
    out = linear(x, w, b, backend=backend)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_2x_rule(out, ref64(x, w, b), F.linear(x, w, b), dtype, what=f"linear {m}x{k}x{n}")


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_results_do_not_depend_on_batch_or_threads(dtype):
    """Row i's output is bitwise the same alone, in any batch, and with 1 or 2 threads."""
    x, w, b = inputs(37, 200, 70, dtype, True)
    full = linear(x, w, b, backend="cpu")
    for i in (0, 5, 36):
        torch.testing.assert_close(linear(x[i:i + 1], w, b, backend="cpu"), full[i:i + 1], rtol=0, atol=0)
    torch.testing.assert_close(linear(x[3:9], w, b, backend="cpu"), full[3:9], rtol=0, atol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear(x, w, b, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, full, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", [(3, 40, 7), (17, 576, 33)], ids=str)
def test_backward(backend, dtype, m, k, n):
    x, w, b = inputs(m, k, n, dtype, True, requires_grad=True)
    dy = make((m, n), dtype, 7)
    grads = torch.autograd.grad(linear(x, w, b, backend=backend), (x, w, b), dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.autograd.grad(linear_ref(x64, w64, b64), (x64, w64, b64), dy.double())
    low = torch.autograd.grad(F.linear(x, w, b), (x, w, b), dy)
    for name, ours, r, lo, t in zip("xwb", grads, ref, low, (x, w, b), strict=True):
        assert ours.dtype == dtype and ours.shape == t.shape
        assert_2x_rule(ours, r, lo, dtype, what=f"linear grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_views_and_empty(backend):
    """(..., K) inputs, a strided x (a column slice) and a transposed weight, zero-size dims, K = 0."""
    base = make((2, 3, 80), torch.bfloat16, 0)
    x = base[..., 10:50]  # rows of 40 with a row stride of 80
    w = make((40, 9), torch.bfloat16, 1).t()  # (9, 40), not contiguous
    b = make((9,), torch.bfloat16, 2)
    out = linear(x, w, b, backend=backend)
    assert out.shape == (2, 3, 9)
    torch.testing.assert_close(out, linear_ref(x.contiguous(), w.contiguous(), b), rtol=1e-2, atol=1e-2)
    assert linear(torch.empty(0, 40), torch.randn(9, 40), backend=backend).shape == (0, 9)
    assert linear(torch.randn(2, 40), torch.empty(0, 40), backend=backend).shape == (2, 0)
    bias = torch.randn(5)
    torch.testing.assert_close(linear(torch.empty(3, 0), torch.empty(5, 0), bias, backend=backend),
                               bias.expand(3, 5), rtol=0, atol=0)


@needs_kernel
def test_opcheck():
    op = linear_op()
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b = inputs(5, 40, 19, dtype, True, requires_grad=True)
        torch.library.opcheck(op, (x, w, b))
        torch.library.opcheck(op, (x, w, None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_errors(backend):
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    with pytest.raises(ValueError, match="does not end in weight's in_features 32"):
        linear(torch.randn(4, 31), w, backend=backend)
    with pytest.raises(ValueError, match="weight must have 2 dims"):
        linear(x, torch.randn(32), backend=backend)
    with pytest.raises(ValueError, match="weight dtype torch.bfloat16 differs"):
        linear(x, w.bfloat16(), backend=backend)
    with pytest.raises(ValueError, match="bias shape \\(7,\\)"):
        linear(x, w, torch.randn(7), backend=backend)
    with pytest.raises(ValueError, match="bias dtype"):
        linear(x, w, torch.randn(8).half(), backend=backend)
    with pytest.raises(ValueError, match="is on meta"):
        linear(x, w.to("meta"), backend=backend)
    with pytest.raises(ValueError, match="floating-point"):
        linear(torch.ones(4, 32, dtype=torch.int32), w, backend=backend)


@needs_kernel
def test_cpp_op_rejects_bad_arguments_without_crashing():
    op = linear_op()
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="2 dims"):
        op(torch.randn(2, 4, 8), w, None)
    with pytest.raises(RuntimeError, match="K = 8"):
        op(x, torch.randn(5, 9), None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(x, w, torch.randn(4))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        op(x.double(), w.double(), None)
    with pytest.raises(RuntimeError, match="weight is"):
        op(x, w.half(), None)


def test_automatic_choice(monkeypatch):
    """Few rows take the kernel (where it is built fast), many rows and fp64 take F.linear quietly;
    CUDA tensors have no kernel but F.linear."""
    w, x64 = torch.randn(16, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(linear(x64, w), F.linear(x64, w), rtol=0, atol=0)
    if HAVE_KERNEL[0]:
        with pytest.raises(backends.BackendUnavailable, match="float32/float16/bfloat16"):
            linear(x64, w, backend="cpu")
    with pytest.raises(backends.BackendUnavailable, match="no Triton/CUDA kernel"):
        linear(torch.randn(2, 8), w.float(), backend="triton")
    linear_mod = importlib.import_module("plm_engine.ops.linear")  # the module (ops.linear is the function)
    calls = []
    real_op = linear_mod.linear_op
    monkeypatch.setattr(linear_mod, "linear_op", lambda: calls.append(1) or real_op())
    wb = torch.randn(16, 8, dtype=torch.bfloat16)
    linear(torch.randn(2, 8, dtype=torch.bfloat16), wb)
    assert calls == ([1] if kernel_max_rows(torch.bfloat16) >= 2 else [])
    calls.clear()
    linear(torch.randn(kernel_max_rows(torch.bfloat16) + 1, 8, dtype=torch.bfloat16), wb)  # many rows
    linear(torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(8, 16, dtype=torch.bfloat16).t())  # strided W
    assert calls == []


@needs_kernel
@pytest.mark.parametrize("isa", ["avx512", "generic"])
def test_other_isa_builds(isa):
    """The builds other CPUs get (AVX-512 without BF16, generic), forced by PLM_ENGINE_CPU_ISA in a
    fresh process (the choice is made once per process)."""
    script = textwrap.dedent("""
        import torch
        from plm_engine.ops.linear import cpu_kernel_isa, linear
        from plm_engine.ops.reference import linear_ref
        print(cpu_kernel_isa())
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
            for m, k, n in ((1, 1000, 37), (5, 40, 16), (33, 17, 3)):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(m, k, generator=g).to(dtype)
                w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
                b = torch.randn(n, generator=g).to(dtype)
                err = (linear(x, w, b, backend="cpu").double() - linear_ref(x.double(), w.double(), b.double())).abs()
                assert err.max() <= tol * 4, (dtype, m, k, n, err.max().item())
        print("ok")
    """)
    env = {**os.environ, "PLM_ENGINE_CPU_ISA": isa}
    if cpu_kernel_isa() == "generic" and isa == "avx512":
        pytest.skip("this CPU has no AVX-512")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [isa, "ok"]


def test_torch_compile_fullgraph():
    """The backend choice is made at trace time; the op (fake impl, autograd) traces into one graph."""
    x = make((3, 40), torch.float32, 0, requires_grad=True)
    w = make((7, 40), torch.float32, 1, requires_grad=True)
    f = torch.compile(lambda x, w: linear(x, w) * 2, backend="aot_eager", fullgraph=True)
    out = f(x, w)
    torch.testing.assert_close(out, linear_ref(x, w) * 2, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * w.detach().sum(0).expand(3, 40), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_like_f_linear(dtype):
    x, w, b = torch.randn(3, 40), torch.randn(7, 40), torch.randn(7)
    with torch.autocast("cpu", dtype=dtype):
        y = ops.linear(x.to(dtype), w, b)
        ref = F.linear(x.to(dtype), w, b)
    assert y.dtype == ref.dtype == dtype
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
