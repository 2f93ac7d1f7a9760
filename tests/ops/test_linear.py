"""ops.linear against the fp64 reference: the C++ CPU kernel (every ISA build) and F.linear fallback."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from plm_engine import ops
from plm_engine.ops import backends, extension
from plm_engine.ops.linear import KERNEL_MAX_ROWS, cpu_kernel_isa, kernel_max_rows, linear, linear_op
from plm_engine.ops.reference import linear_ref
from tests.utils import DTYPES, assert_2x_rule

HAVE_KERNEL = backends.availability("cpu", torch.device("cpu"), "linear_fwd")
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL[0], reason=HAVE_KERNEL[1] or "ok")
BACKENDS = [pytest.param("cpu", marks=needs_kernel), "torch"]
# (M, K, N) for the kernel under every ISA build: every M of {1, 2, 3, 7, 8, 9, 33} (tiles of 4 rows and
# their 1..3-row remainders), K and N of {1, 7, 17, 576, 1003} (K tails of every vector width 4, 8, 16
# and 32; a last block of 1..15 weight rows). Small: each case runs under up to four ISAs.
KERNEL_SHAPES = [
    (1, 576, 1003),
    (2, 17, 576),
    (3, 1003, 7),
    (7, 7, 17),
    (8, 576, 1),
    (9, 1003, 33),
    (33, 576, 17),
    (1, 1, 7),
    (4, 1003, 1003),
]
# Relative error of one rounding to the output dtype (round to nearest).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


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


def kernel_error_bound(x, w, b, out_dtype):
    """The kernel's own error bound against the fp64 result of the same (rounded) inputs.

    Each output is an fp32 sum of K exact products (FMA; VDPBF16PS multiplies bf16 pairs exactly):
    each of the W lanes accumulates ceil(K / W) of them with one rounding each (VDPBF16PS: two rounded
    adds per 32 elements of K), then a log2(W)-level tree, then the bias: at most n = ceil(K / 4) + 6
    roundings for every W >= 4, so |s - y| <= gamma_n * S with S = sum_k |x_k w_k| + |b| and
    gamma_n = n u / (1 - n u), u = 2^-24. The one rounding to the output dtype adds u_T * |s|.
    """
    n = -(-x.shape[1] // 4) + 6
    u = 2.0**-24
    gamma = n * u / (1 - n * u)
    s = x.detach().double().abs() @ w.detach().double().abs().t()
    if b is not None:
        s = s + b.detach().double().abs()
    y = ref64(x, w, b)
    return gamma * s + UNIT_ROUNDOFF[out_dtype] * (y.abs() + gamma * s), y


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m,k,n", KERNEL_SHAPES, ids=str)
def test_kernel_forward_within_its_bound(cpu_isa, dtype, with_bias, m, k, n):
    """The C++ kernel (each ISA build) against fp64, within the kernel's own rounding-error bound."""
    x, w, b = inputs(m, k, n, dtype, with_bias)
    out = linear(x, w, b, backend="cpu")
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.isfinite(out).all()
    bound, y = kernel_error_bound(x, w, b, dtype)
    err = (out.double() - y).abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{cpu_isa} {m}x{k}x{n}: error {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_backend_is_f_linear(dtype):
    x, w, b = inputs(5, 40, 19, dtype, True)
    torch.testing.assert_close(linear(x, w, b, backend="torch"), F.linear(x, w, b), rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_results_do_not_depend_on_batch_or_threads(cpu_isa, dtype):
    """Row i's output is bitwise the same alone, in any batch (any tile shape), and with 1 or 2
    threads (the 2-thread run splits N: 5 blocks of 16 weight rows, each at least the grain)."""
    x, w, b = inputs(37, 200, 70, dtype, True)
    full = linear(x, w, b, backend="cpu")
    for i in (0, 5, 36):
        torch.testing.assert_close(linear(x[i : i + 1], w, b, backend="cpu"), full[i : i + 1], rtol=0, atol=0)
    for lo, hi in ((3, 9), (1, 4), (30, 37), (10, 18), (20, 25), (2, 14)):  # 8-row tiles for 5..8 rows
        torch.testing.assert_close(linear(x[lo:hi], w, b, backend="cpu"), full[lo:hi], rtol=0, atol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = linear(x, w, b, backend="cpu")
        torch.set_num_threads(1)
        one = linear(x, w, b, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, full, rtol=0, atol=0)
    torch.testing.assert_close(two, full, rtol=0, atol=0)


@needs_kernel
def test_isa_reported_and_followed_at_run_time(cpu_isa):
    """linear_cpu_isa() and cpu_kernel_isa() name the build set_cpu_isa() selected, at once."""
    assert torch.ops.plm_engine.linear_cpu_isa() == cpu_isa
    assert cpu_kernel_isa() == cpu_isa


@needs_kernel
def test_isa_switch_changes_the_build():
    """avx2 (W = 8) and avx512 (W = 16) sum K in different lane orders, so their fp32 results differ in
    the last bits: set_cpu_isa() really switches the code that runs."""
    available = [i for i in extension.cpu_isas_available() if i in ("avx2", "avx512")]
    if len(available) < 2:
        pytest.skip("needs both AVX2 and AVX-512")
    x, w, _ = inputs(3, 1003, 64, torch.float32, False)
    outs = {}
    for isa in available:
        with extension.cpu_isa_cap(isa):
            outs[isa] = linear(x, w, backend="cpu")
    assert not torch.equal(outs["avx2"], outs["avx512"])


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
    torch.testing.assert_close(
        linear(torch.empty(3, 0), torch.empty(5, 0), bias, backend=backend), bias.expand(3, 5), rtol=0, atol=0
    )


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_automatic_choice(cpu_isa, dtype, monkeypatch):
    """The automatic choice follows KERNEL_MAX_ROWS for the ISA that runs now: the kernel up to the
    table's row count (contiguous weight), F.linear beyond and for a strided weight."""
    assert kernel_max_rows(dtype) == KERNEL_MAX_ROWS.get(cpu_isa, {}).get(dtype, 0)
    linear_mod = importlib.import_module("plm_engine.ops.linear")  # the module (ops.linear is the function)
    calls = []
    real_op = linear_mod.linear_op()

    class Counting:  # the op as the general path calls it
        def __call__(self, *args):
            calls.append(1)
            return real_op(*args)

    kernel = backends._cpu_kernel("linear_fwd")
    if kernel is not None:  # the eager short path's kernel (_C.linear_fwd: the op's CPU kernel, no autograd)

        def counted(*args):
            calls.append(1)
            return kernel(*args)

        monkeypatch.setitem(backends._CPU_KERNELS, "linear_fwd", counted)
    monkeypatch.setattr(linear_mod, "linear_op", Counting)
    limit = kernel_max_rows(dtype)
    w = torch.randn(16, 8, dtype=dtype)
    if limit > 0:
        linear(torch.randn(1, 8, dtype=dtype), w)
        linear(torch.randn(limit, 8, dtype=dtype), w)
        assert calls == [1, 1]
        calls.clear()
    linear(torch.randn(limit + 1, 8, dtype=dtype), w)  # too many rows (no fast build: any rows)
    linear(torch.randn(2, 8, dtype=dtype), torch.randn(8, 16, dtype=dtype).t())  # strided W
    assert calls == []
    # backend="cpu" runs the kernel at any row count, by the short path or the general one (grad).
    if HAVE_KERNEL[0]:
        x = torch.randn(limit + 1, 8, dtype=dtype)
        assert torch.equal(linear(x, w, backend="cpu"), real_op(x, w, None))
        linear(x.requires_grad_(), w, backend="cpu")
        assert calls == [1, 1]


def test_automatic_choice_fp64_and_cuda():
    """fp64 takes F.linear quietly (an explicit cpu request fails); CUDA tensors have no kernel."""
    w, x64 = torch.randn(16, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(linear(x64, w), F.linear(x64, w), rtol=0, atol=0)
    if HAVE_KERNEL[0]:
        with pytest.raises(backends.BackendUnavailable, match="float32/float16/bfloat16"):
            linear(x64, w, backend="cpu")
    with pytest.raises(backends.BackendUnavailable, match="no Triton/CUDA kernel"):
        linear(torch.randn(2, 8), w.float(), backend="triton")


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


def test_eager_fast_path_is_the_general_path():
    """The eager no-grad shortcut of ops.linear gives the bits of the general path (the op through its
    autograd wrapper), and autograd, vmap and a dispatch mode still see the op."""
    if not HAVE_KERNEL[0] or kernel_max_rows(torch.float32) < 3:
        pytest.skip("the automatic choice does not take the kernel here")
    x, w, b = make((3, 40), torch.float32, 0), make((7, 40), torch.float32, 1), make((7,), torch.float32, 2)
    ref = importlib.import_module("plm_engine.ops.linear").linear_op()(x, w, b)
    assert torch.equal(linear(x, w, b, backend="cpu"), ref)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert torch.equal(linear(x, w, b), ref)
            assert torch.equal(linear(x.view(1, 3, 40), w, b), ref.view(1, 3, 7))
    xg = x.clone().requires_grad_()
    y = linear(xg, w, b)
    assert y.grad_fn is not None and torch.equal(y, ref)
    y.sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand(3, 40), rtol=1e-5, atol=1e-5)
    xb = make((2, 3, 40), torch.float32, 3)
    out = torch.func.vmap(lambda t: linear(t, w, b))(xb)
    torch.testing.assert_close(out, linear_ref(xb, w, b), rtol=1e-5, atol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fy = linear(mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b))
    assert fy.shape == (3, 7)
