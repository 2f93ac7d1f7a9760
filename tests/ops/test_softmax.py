"""Softmax (scale, causal) on every backend against the reference: forward, gradient, edge values, errors."""

from __future__ import annotations

import pytest
import torch

from plm_engine.ops import backends
from plm_engine.ops.reference import softmax_ref
from plm_engine.ops.softmax import fused_ops, softmax
from tests.utils import DTYPES, assert_2x_rule, device_backends

DEV_BACKENDS = device_backends("softmax_fwd")
# (shape, causal): n = 1, odd, non-powers of two, one-block and looped Triton paths (> 16384), 131073
# columns; causal with sq < sk (KV prefix) and sq > sk (fully masked leading rows).
CASES = [
    ((3, 1), False),
    ((2, 3, 7), False),
    ((4, 1000), False),
    ((2, 20000), False),
    ((1, 131073), False),
    ((2, 5, 7), True),
    ((1, 9, 4), True),
    ((1, 3, 1025), True),
    ((1, 2, 131073), True),
]


def make_x(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(shape, generator=g) * 3 + 1).to(device, dtype)


def ref_and_lowp(x, scale, causal, dtype):
    """fp64 reference, and the reference's own computation rounded to the low precision (2x rule)."""
    return softmax_ref(x.double(), scale=scale, causal=causal), softmax_ref(x, scale=scale, causal=causal)


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,causal", CASES, ids=str)
def test_forward_backward(device, backend, dtype, shape, causal):
    scale = 0.37
    x = make_x(shape, dtype, device).requires_grad_()
    y = softmax(x, scale=scale, causal=causal, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    ref, lowp = ref_and_lowp(x.detach(), scale, causal, dtype)
    assert_2x_rule(y, ref, lowp, dtype, what="softmax forward")

    dy = make_x(shape, dtype, device, seed=1)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    (ref_dx,) = torch.autograd.grad(softmax_ref(x64, scale=scale, causal=causal), x64, dy.double())
    xl = x.detach().clone().requires_grad_()
    (low_dx,) = torch.autograd.grad(softmax_ref(xl, scale=scale, causal=causal), xl, dy)
    assert dx.dtype == dtype
    assert_2x_rule(dx, ref_dx, low_dx, dtype, what="softmax dx")


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inf_rows_huge_values_and_masked_rows(device, backend, dtype):
    x = make_x((6, 300), torch.float32, device)
    x[0] = float("-inf")  # all -inf: zeros, not NaN
    x[1, ::2] = float("-inf")  # half -inf: those entries 0, the rest a proper softmax
    x[2] += 1e4  # large offsets must not overflow exp
    x[3] -= 1e4
    x[4, 7] = 3e4 if dtype != torch.float16 else 6e4  # one dominant value
    x = x.to(dtype).requires_grad_()
    y = softmax(x, backend=backend)
    assert torch.isfinite(y).all()
    assert (y[0] == 0).all() and (y[1, ::2] == 0).all()
    torch.testing.assert_close(y.float().sum(-1)[1:], torch.ones(5, device=device), atol=2e-2, rtol=0)
    assert_2x_rule(y, softmax_ref(x.detach().double()), softmax_ref(x.detach()), dtype, what="edge forward")
    y.backward(torch.randn_like(y))
    assert torch.isfinite(x.grad).all() and (x.grad[0] == 0).all()

    # Causal with more queries than keys: the first sq - sk rows see no key at all -> zeros.
    s = make_x((2, 6, 4), dtype, device).requires_grad_()
    p = softmax(s, causal=True, backend=backend)
    assert (p[:, :2] == 0).all() and torch.isfinite(p).all()
    assert (p[:, 2:].float().sum(-1) - 1).abs().max() < 1e-2
    p.sum().backward()
    assert (s.grad[:, :2] == 0).all()


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
def test_other_dims_and_noncontiguous(device, backend):
    x = make_x((3, 5, 7), torch.float32, device)
    for dim in (0, 1, -2):
        torch.testing.assert_close(softmax(x, dim=dim, backend=backend), torch.softmax(x, dim=dim))
    xt = x.transpose(1, 2)
    assert not xt.is_contiguous()
    torch.testing.assert_close(softmax(xt, backend=backend), torch.softmax(xt, dim=-1))
    torch.testing.assert_close(softmax(xt, causal=True, backend=backend), softmax_ref(xt, causal=True))
    empty = torch.randn(0, 8, device=device, requires_grad=True)
    softmax(empty, backend=backend).sum().backward()
    assert empty.grad.shape == (0, 8)


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
def test_bad_input_errors(device, backend):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="floating-point"):
        softmax(torch.ones(4, 8, dtype=torch.int32, device=device), backend=backend)
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        softmax(x, dim=2, backend=backend)
    with pytest.raises(ValueError, match="scale"):
        softmax(x, scale=float("nan"), backend=backend)
    with pytest.raises(ValueError, match="scale"):
        softmax(x, scale=-1.0, backend=backend)
    with pytest.raises(ValueError, match="last"):
        softmax(x, dim=0, causal=True, backend=backend)
    with pytest.raises(ValueError, match="causal"):
        softmax(torch.randn(8, device=device), causal=True, backend=backend)


def _fused_backends():
    return [b for b in ("cpu", "triton") if backends.availability(b, torch.device("cpu"), "softmax_fwd")[0]]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    if backend not in _fused_backends():
        pytest.skip(f"{backend} backend unavailable here")
    fwd, bwd = fused_ops(backend)
    x = torch.randn(2, 3, 37, requires_grad=True)
    torch.library.opcheck(fwd, (x, 0.5, True))
    torch.library.opcheck(fwd, (x, 1.0, False))
    y = torch.softmax(torch.randn(2, 3, 37), -1)
    torch.library.opcheck(bwd, (torch.randn(2, 3, 37), y, 0.5))


def test_cpp_ops_reject_bad_arguments_without_crashing():
    if "cpu" not in _fused_backends():
        pytest.skip("plm_engine._C not built")
    fwd, bwd = fused_ops("cpu")
    with pytest.raises(RuntimeError, match="dims"):
        fwd(torch.randn(4, 8), 1.0, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        fwd(torch.randn(2, 8, 4).transpose(1, 2), 1.0, False)
    with pytest.raises(RuntimeError, match="but y is"):
        bwd(torch.randn(1, 4, 8).double(), torch.randn(1, 4, 8), 1.0)
    with pytest.raises(RuntimeError, match="shape"):
        bwd(torch.randn(1, 4, 8), torch.randn(1, 4, 9), 1.0)


# Awkward shapes for every ISA build: one element, a partial vector, more than one 2048-column block
# with a partial last vector, causal with fully masked leading rows.
ISA_CASES = [((3, 1), False), ((2, 3, 7), False), ((2, 4099), False), ((1, 9, 4), True), ((1, 3, 2050), True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_every_isa(cpu_isa, dtype):
    """Each ISA build of the CPU kernels: forward and gradient on awkward shapes, -inf / huge / masked
    rows, and a row whose first 2048-column block is all -inf (the block is skipped, not NaN)."""
    if "cpu" not in _fused_backends():
        pytest.skip("plm_engine._C not built")
    for shape, causal in ISA_CASES:
        test_forward_backward("cpu", "cpu", dtype, shape, causal)
    test_inf_rows_huge_values_and_masked_rows("cpu", "cpu", dtype)
    x = make_x((2, 5000), torch.float32, "cpu")
    x[0, :2048] = float("-inf")
    x[1, 2048:4096] = float("-inf")
    x = x.to(dtype)
    y = softmax(x, scale=0.5, backend="cpu")
    assert (y[0, :2048] == 0).all() and (y[1, 2048:4096] == 0).all()
    assert_2x_rule(y, softmax_ref(x.double(), scale=0.5), softmax_ref(x, scale=0.5), dtype, what="-inf block")


def test_cpu_kernel_thread_count_independent(cpu_isa):
    """Each row is reduced by one thread in a fixed order: 1 and 2 threads give identical bits."""
    if "cpu" not in _fused_backends():
        pytest.skip("plm_engine._C not built")
    fwd, bwd = fused_ops("cpu")
    threads = torch.get_num_threads()
    for dtype in DTYPES:
        x = make_x((2, 37, 5003), dtype, "cpu")
        dy = make_x((2, 37, 5003), dtype, "cpu", seed=1)
        try:
            torch.set_num_threads(1)
            y1 = fwd(x, 0.3, True)
            dx1 = bwd(dy, y1, 0.3)
            torch.set_num_threads(2)
            y2 = fwd(x, 0.3, True)
            dx2 = bwd(dy, y2, 0.3)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(y1, y2) and torch.equal(dx1, dx2), dtype


def test_cpu_kernel_nan_row(cpu_isa):
    """A NaN anywhere in a row makes that whole row NaN (as in PyTorch), and leaves the other rows alone."""
    if "cpu" not in _fused_backends():
        pytest.skip("plm_engine._C not built")
    fwd, _ = fused_ops("cpu")
    for dtype in DTYPES:
        x = make_x((1, 3, 3000), dtype, "cpu")
        x[0, 1, 2500] = float("nan")
        y = fwd(x, 1.0, False)
        assert torch.isnan(y[0, 1]).all() and torch.isfinite(y[0, ::2]).all(), dtype


def test_dispatch():
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(softmax(x), torch.softmax(x, -1))  # float64: the reference, quietly
    with pytest.raises(backends.BackendUnavailable, match="float32/float16/bfloat16"):
        softmax(x, backend="cpu")
    with pytest.raises(backends.BackendUnavailable, match="cuda tensors"):
        softmax(x.float(), backend="cuda")
