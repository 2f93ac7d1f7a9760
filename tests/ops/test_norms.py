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
# The accuracy grids for the other backends; the C++ CPU kernels have their own tests under every
# instruction-set build (test_cpu_kernel_*, below).
OTHER_BACKENDS = [p for p in DEV_BACKENDS if p.values[1] != "cpu"]
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


def _ref_grads64(kind, x, w, b, r, dy, dh):
    """(h64, fp64 reference gradients w.r.t. h, weight (, bias)) of sum(norm(h) * dy) (+ sum(h * dh)),
    h = x (+ r): the gradient of x, and of r with a residual, is the one of h."""
    h64 = (x.detach() if r is None else (x.detach() + r.detach())).double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    ref = layer_norm_ref(h64, w64, b64, 1e-5) if kind == "layer" else rms_norm_ref(h64, w64, 1e-6)
    ref_loss = (ref * dy.double()).sum() + ((h64 * dh.double()).sum() if r is not None else 0)
    return h64, torch.autograd.grad(ref_loss, [h64, w64] + ([b64] if b64 is not None else []))


@pytest.mark.parametrize("device,backend", OTHER_BACKENDS)
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


@pytest.mark.parametrize("device,backend", OTHER_BACKENDS)
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
    _, ref_grads = _ref_grads64(kind, x, w, b, r, dy, dh)
    low_grads = torch.autograd.grad(loss(lowp, h_low), inputs)
    names = ["x", "weight"] + (["bias"] if b is not None else []) + (["residual"] if residual else [])
    refs = list(ref_grads) + ([ref_grads[0]] if residual else [])
    for name, ours, ref_g, low in zip(names, grads, refs, low_grads, strict=True):
        assert ours.dtype == (x.dtype if name in ("x", "residual") else w.dtype)
        assert_2x_rule(ours, ref_g, low, dtype, what=f"{kind} d{name}")


# ---- the C++ CPU kernels, under every instruction-set build this machine runs ------------------------

# (rows, hidden): one element, less than one vector of every ISA, odd sizes with tails for W = 4, 8, 16.
ISA_SHAPES = [(3, 1), (5, 13), (4, 123), (7, 1025)]
U32 = 2.0**-24  # unit roundoff of fp32, the kernels' arithmetic


def _unit(dtype):
    return torch.finfo(dtype).eps / 2


def _tiny(dtype):
    """Absolute rounding error of a result in T's subnormal range."""
    return torch.finfo(dtype).tiny * torch.finfo(dtype).eps


def _depth(n):
    """Sequential fp32 additions behind one row sum of the kernels: each lane of one of four vector
    accumulators adds n / (4 W) values (W >= 4), then at most 8 adds combine vectors and lanes."""
    return n / 16 + 8


def _assert_within(ours, ref, bound, what):
    err = (ours.double() - ref).abs()
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements over the bound; worst error "
        f"{err.max().item():.3g} where the bound is {bound.flatten()[err.flatten().argmax()].item():.3g}"
    )


def _cpu_built():
    return backends.availability("cpu", torch.device("cpu"), "norm_fwd")[0]


def _stats64(kind, h64):
    """fp64 row statistics of the (rounded) normalised input: mean (0 for RMSNorm), rstd, mean |h|."""
    eps = 1e-5 if kind == "layer" else 1e-6
    mu = h64.mean(-1, keepdim=True) if kind == "layer" else torch.zeros_like(h64[..., :1])
    rstd = ((h64 - mu).square().mean(-1, keepdim=True) + eps).rsqrt()
    return mu, rstd, h64.abs().mean(-1, keepdim=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", ISA_SHAPES, ids=str)
def test_cpu_kernel_forward(cpu_isa, dtype, rows, n):
    """Forward of both norms, plain and with the residual, against fp64. The kernel's bound: the final
    rounding to T (u_T |y|), plus the fp32 statistics' error, (depth + 8) u32 relative to the terms of
    y = xhat w + b and to the mean's own scale rstd mean|h| |w| (LayerNorm)."""
    for kind in KINDS:
        for residual in (False, True):
            what = f"{cpu_isa} {kind} {'residual' if residual else 'plain'} forward"
            x, w, b, r = make_inputs("cpu", dtype, (rows,), n, kind, residual, kind == "layer")
            out = call(kind, x, w, b, r, "cpu")
            h = x
            if residual:
                out, h = out
                assert torch.equal(h, x + r), f"{what}: h must be x + residual rounded to x's dtype"
            assert out.dtype == dtype and out.shape == x.shape
            h64, w64 = h.double(), w.double()
            b64 = b.double() if b is not None else torch.zeros_like(w64)
            ref = layer_norm_ref(h64, w64, b64, 1e-5) if kind == "layer" else rms_norm_ref(h64, w64, 1e-6)
            mu, rstd, mean_abs = _stats64(kind, h64)
            scale = ((h64 - mu) * rstd * w64).abs() + b64.abs()
            if kind == "layer":
                scale = scale + rstd * mean_abs * w64.abs()
            bound = _unit(dtype) * ref.abs() + (_depth(n) + 8) * U32 * scale + _tiny(dtype)
            _assert_within(out, ref, bound, what)


@pytest.mark.parametrize("n", [5, 40, 1025])
def test_cpu_kernel_layer_norm_far_from_zero(cpu_isa, n):
    """LayerNorm statistics of rows whose mean is far from zero next to their spread (mean 1e4, std 1),
    where a plain one-pass sum of squares cancels to noise, plus rows that defeat the kernel's one-pass
    shift (the mean of a row's first values): sorted rows and rows led by an outlier, which must take
    the exact centred pass. Same bound as test_cpu_kernel_forward, plain and with the residual."""
    g = torch.Generator().manual_seed(n)
    base = torch.randn(6, n, generator=g, dtype=torch.float64)
    rows = [base[0] + 1e4, base[1] * 0.01 - 3e3, base[2].sort().values * 1e-3 + 50.0, base[3] + 1e4]
    rows[3][0] = 1e4 + 4e3  # one outlier leads the row
    x = torch.stack(rows + [base[4].sort(descending=True).values + 1e4, base[5] * 1e3]).float()
    w = (torch.rand(n, generator=g) + 0.5).float()
    b = (torch.randn(n, generator=g) * 0.3).float()
    for residual in (False, True):
        r = torch.randn(x.shape, generator=g).float() if residual else None
        out = call("layer", x, w, b, r, "cpu")
        h = x
        if residual:
            out, h = out
        h64, w64, b64 = h.double(), w.double(), b.double()
        ref = layer_norm_ref(h64, w64, b64, 1e-5)
        mu, rstd, mean_abs = _stats64("layer", h64)
        scale = ((h64 - mu) * rstd * w64).abs() + b64.abs() + rstd * mean_abs * w64.abs()
        bound = _unit(torch.float32) * ref.abs() + (_depth(n) + 8) * U32 * scale
        _assert_within(out, ref, bound, f"{cpu_isa} layer {'residual' if residual else 'plain'} n={n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", ISA_SHAPES, ids=str)
def test_cpu_kernel_backward(cpu_isa, dtype, rows, n):
    """dx (= dresidual), dweight and dbias of both norms against fp64 through the rounded h.

    Bounds (first order, hat = (h - mu) rstd, wdy = dy w, S = mean|wdy| (1 + rstd mean|h|) + mean|hat wdy|):
      dx       u_T |dx| + (depth + 16) u32 rstd (|wdy| + (|hat| + 1) S) + 2 u32 |dh|
      dweight  u_W |dw| + (rows + depth + 150) u32 sum_rows |dy| (|hat| + rstd mean|h|)
      dbias    u_W |db| + (rows + 130) u32 sum_rows |dy|
    (the backward sums per chunk of rows, at most 128 chunks, then over the chunks)."""
    for kind in KINDS:
        for residual in (False, True):
            what = f"{cpu_isa} {kind} {'residual' if residual else 'plain'}"
            x, w, b, r = make_inputs("cpu", dtype, (rows,), n, kind, residual, kind == "layer", requires_grad=True)
            inputs = [t for t in (x, w, b, r) if t is not None]
            g = torch.Generator().manual_seed(rows * n)
            dy = torch.randn(x.shape, generator=g).to(dtype)
            dh = torch.randn(x.shape, generator=g).to(dtype) if residual else None
            out = call(kind, x, w, b, r, "cpu")
            outs, douts = ([*out], [dy, dh]) if residual else ([out], [dy])
            grads = dict(
                zip(
                    ["x", "weight", "bias", "residual"] if b is not None else ["x", "weight", "residual"],
                    torch.autograd.grad(outs, inputs, douts),
                )
            )

            h64, ref_grads = _ref_grads64(kind, x, w, b, r, dy, dh)

            mu, rstd, mean_abs = _stats64(kind, h64.detach())
            hat = (h64.detach() - mu) * rstd
            dy64 = dy.double()
            wdy = dy64 * w.double()
            s_row = wdy.abs().mean(-1, keepdim=True) * (1 + rstd * mean_abs) + (hat * wdy).abs().mean(-1, keepdim=True)
            dx_bound = (
                _unit(dtype) * ref_grads[0].abs()
                + (_depth(n) + 16) * U32 * rstd * (wdy.abs() + (hat.abs() + 1) * s_row)
                + _tiny(dtype)
            )
            if residual:
                dx_bound = dx_bound + 2 * U32 * dh.double().abs()
            wdt = w.dtype
            dw_bound = (
                _unit(wdt) * ref_grads[1].abs()
                + _tiny(wdt)
                + (rows + _depth(n) + 150) * U32 * (dy64.abs() * (hat.abs() + rstd * mean_abs)).sum(0)
            )
            _assert_within(grads["x"], ref_grads[0], dx_bound, f"{what} dx")
            _assert_within(grads["weight"], ref_grads[1], dw_bound, f"{what} dweight")
            if residual:
                assert torch.equal(grads["residual"], grads["x"]), f"{what}: dresidual must equal dx"
            if b is not None:
                db_bound = _unit(wdt) * ref_grads[2].abs() + (rows + 130) * U32 * dy64.abs().sum(0) + _tiny(wdt)
                _assert_within(grads["bias"], ref_grads[2], db_bound, f"{what} dbias")
            for name, t in grads.items():
                assert t.dtype == (x.dtype if name in ("x", "residual") else w.dtype), name


def test_cpu_kernel_thread_count_independent():
    """Rows are reduced by one thread each and dweight/dbias over fixed chunks of rows (summed in chunk
    order): 1 and 2 threads give the same bits, forward and backward."""
    if not _cpu_built():
        pytest.skip("plm_engine._C not built")
    threads = torch.get_num_threads()
    for dtype in DTYPES:
        for kind in KINDS:
            # 300 x 1000: the backward splits the rows into 10 chunks.
            x, w, b, r = make_inputs("cpu", dtype, (300,), 1000, kind, True, kind == "layer", requires_grad=True)
            inputs = [t for t in (x, w, b, r) if t is not None]
            dy = torch.randn(x.shape).to(dtype)
            dh = torch.randn(x.shape).to(dtype)
            results = []
            try:
                for n_threads in (1, 2):
                    torch.set_num_threads(n_threads)
                    y, h = call(kind, x, w, b, r, "cpu")
                    results.append([y, h, *torch.autograd.grad([y, h], inputs, [dy, dh])])
            finally:
                torch.set_num_threads(threads)
            for a, c in zip(*results, strict=True):
                assert torch.equal(a, c), (dtype, kind)


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_weight_with_low_precision_input(device, backend, kind):
    """Autocast keeps fp32 master weights while activations are bf16: the kernels take that mix."""
    x, w, b, r = make_inputs(
        device, torch.bfloat16, (4,), 96, kind, True, kind == "layer", weight_fp32=True, requires_grad=True
    )
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
    torch.testing.assert_close(
        ops.layer_norm(xt, w, backend=backend), ops.layer_norm(xt.contiguous(), w, backend=backend)
    )


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
