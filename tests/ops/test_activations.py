"""SwiGLU and GELU on every backend against the reference: forward, gradients, views, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from plm_engine.ops import backends
from plm_engine.ops.activations import fused_ops, gelu, swiglu
from plm_engine.ops.reference import gelu_ref, swiglu_ref
from tests.utils import DTYPES, assert_2x_rule, device_backends

DEV_BACKENDS = device_backends("swiglu_fwd")
# Leading shape and n: a single element, odd and non-power-of-two rows, a row longer than one Triton
# tile (2048), and many short rows.
SHAPES = [((1,), 1), ((2, 3), 123), ((3,), 2051), ((37,), 40)]
OPS = ["swiglu", "gelu", "gelu_tanh"]


def make(device, dtype, shape, seed=0, scale=3.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    # Wide enough (|x| up to ~12) to reach the saturated tails of sigmoid and the normal CDF.
    t = (torch.randn(shape, generator=g) * scale + 0.1).to(device, dtype)
    return t.requires_grad_(requires_grad)


def run(op, inputs, backend):
    if op == "swiglu":
        return swiglu(*inputs, backend=backend)
    return gelu(inputs[0], "tanh" if op == "gelu_tanh" else "none", backend=backend)


def run_ref(op, inputs):
    if op == "swiglu":
        return swiglu_ref(*inputs)
    return gelu_ref(inputs[0], "tanh" if op == "gelu_tanh" else "none")


def run_eager(op, inputs):
    """PyTorch eager in the inputs' own precision: the 2x rule's baseline."""
    if op == "swiglu":
        return F.silu(inputs[0]) * inputs[1]
    return F.gelu(inputs[0], approximate="tanh" if op == "gelu_tanh" else "none")


def inputs_for(op, device, dtype, shape, requires_grad=False):
    n_in = 2 if op == "swiglu" else 1
    return [make(device, dtype, shape, seed=i, requires_grad=requires_grad) for i in range(n_in)]


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n", SHAPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_forward(device, backend, dtype, lead, n, op):
    inputs = inputs_for(op, device, dtype, (*lead, n))
    out = run(op, inputs, backend)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    ref = run_ref(op, [t.double() for t in inputs])
    assert_2x_rule(out, ref, run_eager(op, inputs), dtype, what=f"{op} forward")


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n", [((1,), 1), ((2, 3), 123), ((3,), 2051)], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_backward(device, backend, dtype, lead, n, op):
    inputs = inputs_for(op, device, dtype, (*lead, n), requires_grad=True)
    dy = make(device, dtype, (*lead, n), seed=7, scale=1.0)
    loss = lambda out: (out.float() * dy.float()).sum()
    grads = torch.autograd.grad(loss(run(op, inputs, backend)), inputs)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref_grads = torch.autograd.grad((run_ref(op, inputs64) * dy.double()).sum(), inputs64)
    low_grads = torch.autograd.grad(loss(run_eager(op, inputs)), inputs)
    for i, (ours, ref, low) in enumerate(zip(grads, ref_grads, low_grads, strict=True)):
        assert ours.dtype == dtype and ours.shape == inputs[i].shape
        assert_2x_rule(ours, ref, low, dtype, what=f"{op} grad {i}")


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_tails(device, backend, approximate):
    """Far tails, where 1 + erf(x) cancels and sigmoid saturates; also the exact zero."""
    x = torch.cat([torch.linspace(-40, 40, 801), torch.tensor([0.0, -1e-30, 1e-30, -88.0, 88.0])]).to(device)
    x.requires_grad_()
    out = gelu(x, approximate, backend=backend)
    ref = gelu_ref(x.detach().double(), approximate)
    assert_2x_rule(out, ref, F.gelu(x.detach(), approximate=approximate), what="gelu tails")
    (dx,) = torch.autograd.grad(out.sum(), x)
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(gelu_ref(x64, approximate).sum(), x64)
    assert torch.isfinite(dx).all()
    assert (dx.double() - dx64).abs().max() < 1e-5


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
def test_fused_gate_up_views_and_noncontiguous(device, backend):
    """gate and up as row-strided halves of one projection; transposed inputs; 0-d and empty inputs."""
    gate_up = make(device, torch.bfloat16, (4, 5, 2 * 96), requires_grad=True)
    gate, up = gate_up.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    out = swiglu(gate, up, backend=backend)
    torch.testing.assert_close(out, swiglu(gate.contiguous(), up.contiguous(), backend=backend), rtol=0, atol=0)
    out.float().sum().backward()
    assert gate_up.grad.shape == gate_up.shape
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    swiglu_ref(g64, u64).sum().backward()
    torch.testing.assert_close(gate_up.grad.double(), torch.cat((g64.grad, u64.grad), -1), rtol=2e-2, atol=2e-2)
    xt = make(device, torch.float32, (64, 10)).t()
    torch.testing.assert_close(gelu(xt, backend=backend), gelu_ref(xt.contiguous()), rtol=1e-5, atol=1e-5)
    scalar = torch.tensor(0.7, device=device)
    torch.testing.assert_close(gelu(scalar, backend=backend), F.gelu(scalar))
    empty = torch.randn(0, 16, device=device, requires_grad=True)
    assert swiglu(empty, empty, backend=backend).shape == (0, 16)
    assert gelu(empty, "tanh", backend=backend).shape == (0, 16)


@pytest.mark.parametrize("device,backend", [p for p in DEV_BACKENDS if p.values[1] != "torch"])
def test_opcheck(device, backend):
    swiglu_fwd, swiglu_bwd, gelu_fwd, gelu_bwd = fused_ops(backend)
    g = make(device, torch.float32, (3, 40), requires_grad=True)
    u = make(device, torch.float32, (3, 40), seed=1, requires_grad=True)
    dy = make(device, torch.float32, (3, 40), seed=2)
    torch.library.opcheck(swiglu_fwd, (g, u))
    torch.library.opcheck(swiglu_bwd, (dy, g.detach(), u.detach()))
    for approximate in ("none", "tanh"):
        torch.library.opcheck(gelu_fwd, (g, approximate))
        torch.library.opcheck(gelu_bwd, (dy, g.detach(), approximate))


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
def test_bad_input_errors(device, backend):
    x = torch.randn(4, 32, device=device)
    with pytest.raises(ValueError, match="shape"):
        swiglu(x, torch.randn(4, 31, device=device), backend=backend)
    with pytest.raises(ValueError, match="dtype"):
        swiglu(x, x.half(), backend=backend)
    with pytest.raises(ValueError, match="is on meta"):
        swiglu(x, x.to("meta"), backend=backend)
    with pytest.raises(ValueError, match="floating-point"):
        gelu(torch.ones(3, dtype=torch.int32, device=device), backend=backend)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        gelu(x, "erf", backend=backend)


def test_cpp_ops_reject_bad_arguments_without_crashing():
    """The _C entry points check what their kernels index: direct calls get RuntimeError, not a segfault.
    (The argument contract, e.g. approximate's values, is the public op's: test_bad_input_errors.)"""
    if not backends.availability("cpu", torch.device("cpu"), "swiglu_fwd")[0]:
        pytest.skip("plm_engine._C not built")
    swiglu_fwd, swiglu_bwd, gelu_fwd, gelu_bwd = fused_ops("cpu")
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="2 dims"):
        swiglu_fwd(torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    with pytest.raises(RuntimeError, match="shape"):
        swiglu_bwd(x, x, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="last dim"):
        gelu_fwd(torch.randn(8, 4).t(), "none")
    with pytest.raises(RuntimeError, match="dy has shape"):
        gelu_bwd(torch.randn(4, 9), x, "none")
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        gelu_fwd(x.double(), "none")


def _cpu_built():
    return backends.availability("cpu", torch.device("cpu"), "swiglu_fwd")[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernels_every_isa(cpu_isa, dtype):
    """Each ISA build of the CPU kernels: every op, forward and gradients, on one element, a partial
    vector and more than one 2048-element chunk (whole vectors plus a partial one)."""
    if not _cpu_built():
        pytest.skip("plm_engine._C not built")
    for op in OPS:
        for lead, n in [((1,), 1), ((2, 3), 123), ((3,), 2051)]:
            test_forward("cpu", "cpu", dtype, lead, n, op)
            test_backward("cpu", "cpu", dtype, lead, n, op)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_cpu_gelu_tails_every_isa(cpu_isa, approximate):
    if not _cpu_built():
        pytest.skip("plm_engine._C not built")
    test_gelu_tails("cpu", "cpu", approximate)


# Significand bits and smallest subnormal of each dtype (for ulp).
_FORMAT = {torch.float32: (24, 2.0**-149), torch.float16: (11, 2.0**-24), torch.bfloat16: (8, 2.0**-133)}


def _ulp(ref, dtype):
    """The spacing of `dtype` numbers in the binade of each fp64 value of ref (subnormal spacing below)."""
    bits, tiny = _FORMAT[dtype]
    _, e = torch.frexp(ref.abs())
    return torch.where(ref == 0, tiny, torch.ldexp(torch.ones_like(ref), e - bits).clamp_min(tiny))


# The fp32 exact GELU's own error bound against fp64 x Phi(x), in fp32 ulp: Phi(-|x|) = exp(-x^2 / 2) S(|x|)
# with exp ~2 ulp and S ~1 ulp (8-interval degree-8 table, activations.cpp). 4 ulp for |x| <= 5, 10 ulp beyond (the far tail, where
# exp's argument reaches -87), in every ISA build (they compute the same bits). Results whose true
# magnitude is below 2^-126 (fp32 subnormals: x < -13.05) may be flushed toward 0 (Phi(-|x|) is taken as 0
# beyond |x| = 13.2): absolute error below GELU_TINY there.
GELU_ULP_NEAR, GELU_ULP_FAR, GELU_TINY = 4, 10, 2.0**-126
# Its derivative Phi(x) + x phi(x), absolute (it crosses zero near x = -0.75, where its own ulp means
# nothing): ~1 ulp of Phi (<= 6e-8) plus the products' rounding.
GELU_GRAD_ABS = 2e-7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_exact_gelu_16bit_tables_on_every_input(cpu_isa, dtype):
    """fp16 / bf16 exact GELU looks its values up in 65536-entry tables (activations.cpp), built once by
    whichever ISA build runs first: on every finite input they must be what this build's fp32 kernel
    computes, rounded once to the dtype (so every build computes the same bits), and therefore correctly
    rounded except within the fp32 kernel's error of a rounding tie: |y - x Phi(x)| <= 0.5 ulp (of the
    dtype) + GELU_ULP_FAR fp32 ulp (bf16 results below GELU_TINY: absolute GELU_TINY)."""
    if not _cpu_built():
        pytest.skip("plm_engine._C not built")
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[torch.isfinite(x)]
    y = gelu(x, backend="cpu")
    assert torch.equal(y, gelu(x.float(), backend="cpu").to(dtype))
    x64 = x.double()
    ref = x64 * 0.5 * torch.special.erfc(-x64 / math.sqrt(2))
    ref_t = ref.to(dtype).double()  # the correctly rounded value (saturates to inf like the kernel)
    finite = torch.isfinite(ref_t)
    assert torch.equal(y.double()[~finite], ref_t[~finite])
    err = (y.double() - ref)[finite].abs()
    bound = 0.5 * _ulp(ref[finite], dtype) + GELU_ULP_FAR * _ulp(ref[finite], torch.float32)
    bound = torch.where(ref[finite].abs() < GELU_TINY, GELU_TINY, bound)
    assert (err <= bound).all(), (x[finite][(err > bound)][:5], (err / _ulp(ref[finite], dtype)).max())
    dy = make("cpu", dtype, x.shape, seed=3, scale=1.0)
    xr, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
    (dx,) = torch.autograd.grad(gelu(xr, backend="cpu"), xr, dy)
    (dx32,) = torch.autograd.grad(gelu(x32, backend="cpu"), x32, dy.float())
    assert torch.equal(dx, dx32.to(dtype))


def _ulp_error(y, ref):
    """|y - ref| in units of the fp32 ulp at ref (ref in fp64): the spacing above ref rounded to fp32."""
    r32 = ref.float().abs()
    ulp = torch.nextafter(r32, torch.tensor(math.inf)).double() - r32.double()
    return (y.double() - ref).abs() / ulp


def test_exact_gelu_fp32_accuracy(cpu_isa):
    """The erf-free normal CDF against x Phi(x) in fp64, forward and derivative, over a dense sweep of
    [-10, 10], the far tail down to -13 and random normals, in every ISA build: within the kernel's own
    bounds above (measured max 3.7 ulp over the whole sweep, 1.2e-7 for the derivative). These fail any kernel
    that cancels (PyTorch's x (1 + erf(x / sqrt 2)) / 2 is off by millions of ulp below x = -5), or
    whose exp or S is off by a few 1e-7 relative."""
    if not _cpu_built():
        pytest.skip("plm_engine._C not built")
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.linspace(-10, 10, 200001),
            torch.linspace(-13, -10, 3001),
            torch.randn(100000, generator=g),
            torch.randn(100000, generator=g) * 3,
        ]
    )
    x64 = x.double()
    cdf = 0.5 * torch.special.erfc(-x64 / math.sqrt(2))
    ref = x64 * cdf
    err = _ulp_error(gelu(x, backend="cpu"), ref)
    assert err[x.abs() <= 5].max() <= GELU_ULP_NEAR, err[x.abs() <= 5].max()
    assert err.max() <= GELU_ULP_FAR, (err.max(), x[err.argmax()])
    # The derivative (one exp serves both terms in the backward kernel).
    xr = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(gelu(xr, backend="cpu").sum(), xr)
    dref = cdf + x64 * torch.exp(-0.5 * x64 * x64) / math.sqrt(2 * math.pi)
    dx_err = (dx.double() - dref).abs().max()
    assert dx_err <= GELU_GRAD_ABS, dx_err


def test_cpu_kernels_thread_count_independent(cpu_isa):
    """Chunks are cut the same way whatever the thread count: 1 and 2 threads give identical bits."""
    if not _cpu_built():
        pytest.skip("plm_engine._C not built")
    threads = torch.get_num_threads()
    for dtype in DTYPES:
        inputs = inputs_for("swiglu", "cpu", dtype, (7, 10001))
        dy = make("cpu", dtype, (7, 10001), seed=5)
        outs = []
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                outs.append(
                    [
                        swiglu(*inputs, backend="cpu"),
                        gelu(inputs[0], backend="cpu"),
                        gelu(inputs[0], "tanh", backend="cpu"),
                        *torch.ops.plm_engine.swiglu_bwd(dy, *inputs),
                        torch.ops.plm_engine.gelu_bwd(dy, inputs[0], "none"),
                    ]
                )
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True)), dtype


def test_automatic_choice_falls_back_quietly():
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(gelu(x), F.gelu(x))
    torch.testing.assert_close(swiglu(x, x), F.silu(x) * x)
    with pytest.raises(backends.BackendUnavailable, match="float32/float16/bfloat16"):
        swiglu(x, x, backend="cpu")
    with pytest.raises(backends.BackendUnavailable, match="cuda tensors"):
        gelu(x.float(), backend="cuda")
