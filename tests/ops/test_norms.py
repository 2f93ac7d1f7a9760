"""LayerNorm / RMSNorm on every backend against the reference: forward, all gradients, bad input."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from plm_engine import ops
from plm_engine.ops import backends
from plm_engine.ops.reference import layer_norm_ref, rms_norm_ref
from tests.utils import DTYPES, assert_2x_rule, device_backends

DEV_BACKENDS = device_backends("norm_fwd")
# (leading shape, hidden): n = 1, odd, non-powers of two, and the largest hidden size we promise.
SHAPES = [((3,), 1), ((2, 3), 123), ((37,), 1025), ((2, 2), 4096), ((2,), 16384), ((1, 1), 40)]
KINDS = ["layer", "rms"]


def make_inputs(device, dtype, lead, n, kind, residual, bias, weight_fp32=False, requires_grad=False):
    g = torch.Generator().manual_seed(hash((lead, n, kind, residual, bias)) % 2**31)
    wdtype = torch.float32 if weight_fp32 else dtype
    # Offsets and scales away from 0/1 so a wrong mean or a missing weight cannot pass unnoticed.
    x = (torch.randn(*lead, n, generator=g) * 2 + 0.5).to(device, dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(device, wdtype)
    b = (torch.randn(n, generator=g) * 0.3).to(device, wdtype) if bias else None
    r = torch.randn(*lead, n, generator=g).to(device, dtype) if residual else None
    ts = [t for t in (x, w, b, r) if t is not None]
    for t in ts:
        t.requires_grad_(requires_grad)
    return x, w, b, r


def call(kind, x, w, b, r, backend):
    if kind == "layer":
        return ops.layer_norm(x, w, b, eps=1e-5, residual=r, backend=backend)
    return ops.rms_norm(x, w, eps=1e-6, residual=r, backend=backend)


def reference(kind, x, w, b, r, dtype):
    """fp64 reference on upcast inputs, and PyTorch eager in the low precision (for the 2x rule)."""
    up = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)
    x64, w64, b64, r64 = map(up, (x, w, b, r))
    # The fp64 reference adds the residual after rounding to the input dtype, like every kernel does.
    h64 = x64 if r is None else (x.detach() + r.detach()).double()
    ref = layer_norm_ref(h64, w64, b64, 1e-5) if kind == "layer" else rms_norm_ref(h64, w64, 1e-6)
    h = x if r is None else x + r
    n = x.shape[-1]
    if kind == "layer":
        lowp = F.layer_norm(h, (n,), w.to(dtype), None if b is None else b.to(dtype), 1e-5)
    else:
        lowp = F.rms_norm(h, (n,), w.to(dtype), 1e-6)
    return ref, lowp, h


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n", SHAPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_forward(device, backend, dtype, lead, n, kind, residual):
    bias = kind == "layer"
    x, w, b, r = make_inputs(device, dtype, lead, n, kind, residual, bias)
    out = call(kind, x, w, b, r, backend)
    ref, lowp, h = reference(kind, x, w, b, r, dtype)
    if residual:
        out, h_out = out
        assert h_out.dtype == dtype and torch.equal(h_out, h), "h must be x + residual rounded to x's dtype"
    assert out.dtype == dtype and out.shape == x.shape
    assert_2x_rule(out, ref, lowp, dtype, what=f"{kind} forward")


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n", [((3,), 1), ((2, 5), 123), ((37,), 1025), ((3,), 4096)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_backward(device, backend, dtype, lead, n, kind, residual):
    bias = kind == "layer"
    x, w, b, r = make_inputs(device, dtype, lead, n, kind, residual, bias, requires_grad=True)
    inputs = [t for t in (x, w, b, r) if t is not None]
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(x.shape, generator=g).to(device, dtype)
    dh = torch.randn(x.shape, generator=g).to(device, dtype) if residual else None

    def loss(out, h):
        # The residual stream's own gradient (dh) must flow through the fused op as well.
        return (out.float() * dy.float()).sum() + ((h.float() * dh.float()).sum() if residual else 0)

    out = call(kind, x, w, b, r, backend)
    out, h = out if residual else (out, None)
    grads = torch.autograd.grad(loss(out, h), inputs)

    ref, lowp, h_low = reference(kind, x, w, b, r, dtype)
    # Reference gradients in fp64 through the upcast graph: d/dx = d/dr = d/dh.
    x64 = (x.detach() if r is None else (x.detach() + r.detach())).double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    ref = layer_norm_ref(x64, w64, b64, 1e-5) if kind == "layer" else rms_norm_ref(x64, w64, 1e-6)
    ref_loss = (ref * dy.double()).sum() + ((x64 * dh.double()).sum() if residual else 0)
    ref_grads = torch.autograd.grad(ref_loss, [x64, w64] + ([b64] if b64 is not None else []))
    low_grads = torch.autograd.grad(loss(lowp, h_low), inputs)
    names = ["x", "weight"] + (["bias"] if b is not None else []) + (["residual"] if residual else [])
    refs = list(ref_grads) + ([ref_grads[0]] if residual else [])
    for name, ours, ref_g, low in zip(names, grads, refs, low_grads, strict=True):
        assert ours.dtype == (x.dtype if name in ("x", "residual") else w.dtype)
        assert_2x_rule(ours, ref_g, low, dtype, what=f"{kind} d{name}")


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_weight_with_low_precision_input(device, backend, kind):
    """Autocast keeps fp32 master weights while activations are bf16: the kernels take that mix."""
    x, w, b, r = make_inputs(device, torch.bfloat16, (4,), 96, kind, True, kind == "layer", weight_fp32=True,
                             requires_grad=True)
    out, h = call(kind, x, w, b, r, backend)
    ref, lowp, _ = reference(kind, x, w, b, r, torch.bfloat16)
    assert_2x_rule(out, ref, lowp, torch.bfloat16, what="mixed forward")
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("kind,residual", [("layer", True), ("rms", False)])
def test_large_outputs_take_the_streaming_path(kind, residual):
    """Outputs of 64 MiB and more (norms.cpp: kStreamMinBytes; the huge-page hint from 32 MiB) are
    written with non-temporal stores when transparent huge pages are available. Every row must come out
    bit for bit as in a small call (ordinary stores), and match the reference."""
    if not backends.availability("cpu", torch.device("cpu"), "norm_fwd")[0]:
        pytest.skip("plm_engine._C not built")
    rows, n = 4096, 4096  # fp32: 64 MiB for y (and for h with the residual), exactly the threshold
    x, w, b, r = make_inputs("cpu", torch.float32, (rows,), n, kind, residual, kind == "layer")
    out = call(kind, x, w, b, r, "cpu")
    y, h = out if residual else (out, None)
    assert y.nbytes >= 64 << 20
    for sl in (slice(0, 5), slice(rows // 2, rows // 2 + 3), slice(rows - 5, rows)):
        small = call(kind, x[sl], w, b, None if r is None else r[sl], "cpu")
        if residual:
            assert torch.equal(h[sl], small[1])
            small = small[0]
        assert torch.equal(y[sl], small), f"rows {sl} differ from a small call"
    if residual:
        assert torch.equal(h, x + r)
    # Every 61st row against the fp64 reference (the whole 4096 x 4096 in fp64 is slow for a unit test).
    pick = slice(0, rows, 61)
    ref, lowp, _ = reference(kind, x[pick], w, b, None if r is None else r[pick], torch.float32)
    assert_2x_rule(y[pick], ref, lowp, torch.float32, what=f"{kind} large forward")


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
def test_zero_rows_and_noncontiguous(device, backend):
    w = torch.rand(64, device=device) + 0.5
    empty = torch.randn(0, 64, device=device, requires_grad=True)
    y = ops.rms_norm(empty, w, backend=backend)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert empty.grad.shape == (0, 64)
    # A transposed (non-contiguous) input gives the same result as its contiguous copy.
    xt = torch.randn(64, 10, device=device).t()
    assert not xt.is_contiguous()
    torch.testing.assert_close(ops.layer_norm(xt, w, backend=backend), ops.layer_norm(xt.contiguous(), w, backend=backend))


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
def test_bad_input_errors(device, backend):
    x = torch.randn(4, 32, device=device)
    w = torch.rand(32, device=device)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.layer_norm(x, torch.rand(31, device=device), backend=backend)
    with pytest.raises(ValueError, match="floating-point"):
        ops.rms_norm(torch.ones(4, 32, dtype=torch.int32, device=device), w, backend=backend)
    with pytest.raises(ValueError, match="float32 or x's dtype"):
        ops.rms_norm(x.half(), w.bfloat16(), backend=backend)
    with pytest.raises(ValueError, match="residual shape"):
        ops.rms_norm(x, w, residual=torch.randn(4, 31, device=device), backend=backend)
    with pytest.raises(ValueError, match="residual dtype"):
        ops.rms_norm(x, w, residual=x.half(), backend=backend)
    with pytest.raises(ValueError, match="is on meta"):
        ops.layer_norm(x, w.to("meta"), backend=backend)
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm(x, w, eps=-1.0, backend=backend)


def test_cpp_ops_reject_bad_arguments_without_crashing():
    """The _C entry points validate on their own too: direct calls get RuntimeError, not a segfault."""
    if not backends.availability("cpu", torch.device("cpu"), "norm_fwd")[0]:
        pytest.skip("plm_engine._C not built")
    from plm_engine.ops.norms import fused_ops

    fwd, bwd = fused_ops("cpu")
    x, w = torch.randn(4, 8), torch.rand(8)
    with pytest.raises(RuntimeError, match="dims"):
        fwd(torch.randn(2, 4, 8), w, None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        fwd(x, torch.rand(9), None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        fwd(torch.randn(8, 4).t(), torch.rand(4), None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="rstd"):
        bwd(x, None, x, w, torch.zeros(4), torch.zeros(3), False, False)


def test_explicit_backend_errors_say_why(monkeypatch):
    x, w = torch.randn(2, 8), torch.rand(8)
    with pytest.raises(backends.BackendUnavailable, match="cuda tensors"):
        ops.rms_norm(x, w, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.rms_norm(x, w, backend="tpu")
    monkeypatch.setenv("PLM_ENGINE_BACKEND", "cuda")
    with pytest.raises(backends.BackendUnavailable, match="cannot run norm_fwd"):
        ops.rms_norm(x, w)
    monkeypatch.setenv("PLM_ENGINE_BACKEND", "torch")
    torch.testing.assert_close(ops.rms_norm(x, w), rms_norm_ref(x, w))


def test_automatic_choice_falls_back_quietly():
    # float64 has no fused kernel: automatic dispatch runs the reference instead of failing.
    x, w = torch.randn(3, 16, dtype=torch.float64), torch.rand(16, dtype=torch.float64)
    torch.testing.assert_close(ops.layer_norm(x, w), F.layer_norm(x, (16,), w))
    with pytest.raises(backends.BackendUnavailable, match="float32/float16/bfloat16"):
        ops.layer_norm(x, w, backend="cpu")
    assert backends.choose(torch.device("cpu"), "norm_fwd") in ("cpu", "torch")
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter is for tests only: never chosen automatically for CPU tensors.
        assert backends.choose(torch.device("cpu"), "norm_fwd") != "triton"
