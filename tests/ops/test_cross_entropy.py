"""Fused cross-entropy and linear_cross_entropy on every backend against the reference: loss, gradients,
ignore_index, label smoothing, reductions, in-place gradient, huge values, bad input, opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plm_engine.ops import backends
from plm_engine.ops.cross_entropy import cross_entropy, fused_ops, linear_cross_entropy
from plm_engine.ops.reference import cross_entropy_ref, linear_cross_entropy_ref
from tests.utils import DTYPES, assert_2x_rule, device_backends

DEV_BACKENDS = device_backends("cross_entropy_fwd")
# (rows, vocab): a single class, odd sizes, more than one Triton block (8192), and 131073.
SHAPES = [(5, 1), (9, 7), (6, 1000), (3, 32001), (2, 131073)]


def make_inputs(n, v, dtype, device, seed=0, ignore_index=-100, offset=0.0):
    g = torch.Generator().manual_seed(seed + n * 7 + v)
    logits = (torch.randn(n, v, generator=g) * 2 + offset).to(device, dtype)
    target = torch.randint(0, v, (n,), generator=g).to(device)
    if n > 2:
        target[1] = ignore_index  # one ignored row per batch
    return logits, target


def references(logits, target, dtype, **kw):
    """(fp64 loss, fp64 dlogits) and PyTorch eager's (loss, dlogits) in the low precision."""
    x64 = logits.detach().double().requires_grad_()
    ref = cross_entropy_ref(x64, target, **kw)
    (ref_g,) = torch.autograd.grad(ref, x64, torch.ones_like(ref) if ref.dim() else None)
    xl = logits.detach().clone().requires_grad_()
    low = F.cross_entropy(xl, target, **kw)
    if kw.get("reduction", "mean") == "mean" and (target == kw.get("ignore_index", -100)).all():
        low = low.nan_to_num(0.0)
    (low_g,) = torch.autograd.grad(low, xl, torch.ones_like(low) if low.dim() else None)
    return ref, ref_g, low.detach(), low_g


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v", SHAPES, ids=str)
@pytest.mark.parametrize("reduction,smoothing", [("mean", 0.0), ("sum", 0.1), ("none", 0.0), ("none", 0.2)])
def test_loss_and_gradient(device, backend, dtype, n, v, reduction, smoothing):
    logits, target = make_inputs(n, v, dtype, device)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, label_smoothing=smoothing, reduction=reduction, backend=backend)
    assert loss.dtype == dtype and loss.shape == ((n,) if reduction == "none" else ())
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    ref, ref_g, low, low_g = references(logits, target, dtype, label_smoothing=smoothing, reduction=reduction)
    assert_2x_rule(loss, ref, low, dtype, what="loss")
    assert_2x_rule(grad, ref_g, low_g, dtype, what="dlogits")
    if n > 2:
        assert (grad[1] == 0).all() and (reduction != "none" or loss[1] == 0)


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward_and_upstream_gradient(device, backend, dtype):
    logits, target = make_inputs(7, 1000, dtype, device, ignore_index=3)
    x = logits.clone().requires_grad_()
    # A non-leaf, like the LM head's output, so its buffer may be overwritten.
    h = x * 1
    loss = cross_entropy(
        h.view(7, 1, 1000),
        target.view(7, 1),
        ignore_index=3,
        label_smoothing=0.1,
        inplace_backward=True,
        backend=backend,
    )
    (loss * 2.5).backward()
    ref, ref_g, low, low_g = references(logits, target, dtype, ignore_index=3, label_smoothing=0.1)
    assert_2x_rule(loss, ref, low, dtype, what="in-place loss")
    assert_2x_rule(x.grad, 2.5 * ref_g, 2.5 * low_g, dtype, what="in-place dlogits")
    if backend != "torch":  # the reference has no in-place path
        # The logits buffer now holds the gradient: that is the memory saving.
        assert not torch.equal(h.detach(), logits)


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_values_and_all_ignored(device, backend, dtype):
    big = 1e4 if dtype != torch.float16 else 6e4
    logits, target = make_inputs(4, 513, torch.float32, device, offset=1e4)
    logits[2, 5] = big  # one dominant logit
    logits[3, ::3] = float("-inf")  # masked vocabulary entries
    target[3] = 1
    logits = logits.to(dtype)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert (x.grad[3, ::3] == 0).all()
    ref, ref_g, low, low_g = references(logits, target, dtype, reduction="none")
    assert_2x_rule(loss, ref, low, dtype, what="huge loss")
    assert_2x_rule(x.grad, ref_g, low_g, dtype, what="huge dlogits")
    # Every target ignored: mean is 0 (PyTorch: NaN) and the gradient is 0.
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, torch.full_like(target, -100), backend=backend)
    loss.backward()
    assert loss.item() == 0 and (x.grad == 0).all()


def test_reference_minus_inf_logits_and_large_offsets():
    """cross_entropy_ref: a -inf logit (a masked class) gives a finite loss without smoothing, and a 1e4
    offset costs no accuracy in fp32 (the row max is subtracted before logsumexp and the target gather)."""
    logits, target = make_inputs(4, 300, torch.float32, "cpu")
    logits[0, ::3] = float("-inf")
    target[0] = 1
    logits[2] += 1e4
    logits[3] = float("-inf")  # an all -inf row, ignored: loss 0, not NaN
    target[3] = -100
    x = logits.clone().requires_grad_()
    loss = cross_entropy_ref(x, target, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    x64 = logits.double().requires_grad_()
    loss64 = F.cross_entropy(x64, target, reduction="none")
    (grad64,) = torch.autograd.grad(loss64.sum(), x64)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[0, ::3] == 0).all() and loss[3] == 0 and (grad[3] == 0).all()
    # Unshifted, the 1e4 row lost ~1e-3 in fp32; shifted, it is as good as the others. (Row 3: PyTorch's
    # own gradient of an all -inf ignored row is NaN.)
    assert (loss.double() - loss64).abs().max() < 2e-6
    assert (grad[:3].double() - grad64[:3]).abs().max() < 1e-6
    # With smoothing the -inf entry enters the mean: +inf is the true value (no NaN from 0 * -inf).
    smooth = cross_entropy_ref(logits[:1], target[:1], label_smoothing=0.1, reduction="none")
    assert smooth.item() == float("inf")
    mean = cross_entropy_ref(logits, target)
    torch.testing.assert_close(mean.double(), loss64[target != -100].mean(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_every_isa(cpu_isa, dtype):
    """Each ISA build of the CPU kernel: a single class, a partial vector, more than one 2048-column block,
    with and without label smoothing; the in-place gradient; huge, -inf and all-ignored rows."""
    if not _available("cpu"):
        pytest.skip("plm_engine._C not built")
    for (n, v), (reduction, smoothing) in [
        ((5, 1), ("mean", 0.0)),
        ((9, 7), ("none", 0.2)),
        ((3, 4099), ("sum", 0.1)),
        ((3, 4099), ("none", 0.0)),
    ]:
        test_loss_and_gradient("cpu", "cpu", dtype, n, v, reduction, smoothing)
    test_inplace_backward_and_upstream_gradient("cpu", "cpu", dtype)
    test_huge_values_and_all_ignored("cpu", "cpu", dtype)


def test_cpu_kernel_thread_count_independent(cpu_isa):
    """Each row is reduced by one thread in a fixed order: 1 and 2 threads give identical bits."""
    if not _available("cpu"):
        pytest.skip("plm_engine._C not built")
    fwd, _ = fused_ops("cpu")
    threads = torch.get_num_threads()
    for dtype in DTYPES:
        logits, target = make_inputs(37, 5003, dtype, "cpu")
        try:
            torch.set_num_threads(1)
            one = fwd(logits, target, -100, 0.1)
            torch.set_num_threads(2)
            two = fwd(logits, target, -100, 0.1)
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True)), dtype


def test_cpu_kernel_nan_row(cpu_isa):
    """A NaN logit makes that row's loss and gradient NaN, and leaves the other rows alone."""
    if not _available("cpu"):
        pytest.skip("plm_engine._C not built")
    fwd, _ = fused_ops("cpu")
    for dtype in DTYPES:
        logits, target = make_inputs(3, 3000, dtype, "cpu")
        logits[2, 2500] = float("nan")  # row 1 is ignored (make_inputs)
        loss, grad = fwd(logits, target, -100, 0.0)
        assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all(), dtype
        assert torch.isfinite(loss[:2]).all() and torch.isfinite(grad[:2]).all(), dtype


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("reduction,smoothing", [("mean", 0.0), ("sum", 0.1), ("none", 0.0)])
def test_linear_cross_entropy(device, backend, dtype, bias, reduction, smoothing):
    g = torch.Generator().manual_seed(5)
    n, d, v = 37, 24, 1000
    hidden = torch.randn(n, d, generator=g).to(device, dtype)
    weight = (torch.randn(v, d, generator=g) / 3).to(device, dtype)
    b = (torch.randn(v, generator=g) / 3).to(device, dtype) if bias else None
    target = torch.randint(0, v, (n,), generator=g).to(device)
    target[::5] = -100
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    loss = linear_cross_entropy(
        leaves[0].view(1, n, d),
        leaves[1],
        target.view(1, n),
        leaves[2] if bias else None,
        label_smoothing=smoothing,
        reduction=reduction,
        chunk_size=16,
        backend=backend,
    )  # 16 does not divide 37
    up = torch.rand(loss.shape, generator=g).to(device, torch.float32) + 0.5
    grads = torch.autograd.grad((loss.float() * up).sum(), leaves)

    kw = dict(label_smoothing=smoothing, reduction=reduction)
    ref64 = [t.double().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    ref = linear_cross_entropy_ref(ref64[0], ref64[1], target, ref64[2] if bias else None, **kw)
    ref_g = torch.autograd.grad((ref * up.double().view(ref.shape)).sum(), ref64)
    # PyTorch eager in the low precision (fp16 matmul on CPU is unusably slow: fp32 math then round,
    # which is what a GPU's fp16 matmul with fp32 accumulation gives anyway).
    lowd = torch.float32 if (dtype == torch.float16 and device == "cpu") else dtype
    lowl = [t.to(lowd).requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    logits = F.linear(lowl[0], lowl[1], lowl[2] if bias else None).to(dtype)
    low = F.cross_entropy(logits, target, **kw)
    low_g = torch.autograd.grad((low.float() * up.view(low.shape)).sum(), lowl)
    assert_2x_rule(loss.view(ref.shape), ref, low, dtype, what="linear-CE loss")
    for name, ours, r, lg in zip(("hidden", "weight", "bias"), grads, ref_g, low_g, strict=False):
        assert ours.dtype == dtype
        assert_2x_rule(ours.view(r.shape), r, lg.to(dtype), dtype, what=f"linear-CE d{name}")


@pytest.mark.parametrize("device,backend", DEV_BACKENDS)
def test_bad_input_errors(device, backend):
    # Called directly, the op checks target values on every device (they enter here, ops/checks.py);
    # inside trusted() (the trainer's step) it does not, and the kernels make such rows NaN instead.
    logits, target = make_inputs(4, 10, torch.float32, device)
    with pytest.raises(ValueError, match="out of range"):
        cross_entropy(logits, torch.tensor([0, 1, 10, 2], device=device), backend=backend)
    with pytest.raises(ValueError, match="out of range"):
        cross_entropy(logits, torch.tensor([0, -1, 3, 2], device=device), backend=backend)
    with pytest.raises(ValueError, match="target shape"):
        cross_entropy(logits, target[:3], backend=backend)
    with pytest.raises(ValueError, match="int64"):
        cross_entropy(logits, target.float(), backend=backend)
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, target, label_smoothing=1.5, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, target, reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="floating-point"):
        cross_entropy(target, target, backend=backend)
    h, w = torch.randn(4, 8, device=device), torch.randn(10, 8, device=device)
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_cross_entropy(h, torch.randn(10, 9, device=device), target, backend=backend)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_cross_entropy(h, w, target, bias=torch.randn(9, device=device), backend=backend)
    with pytest.raises(ValueError, match="dtype"):
        linear_cross_entropy(h, w.double(), target, backend=backend)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, target, chunk_size=0, backend=backend)
    with pytest.raises(ValueError, match="out of range"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 99, 2], device=device), backend=backend)


def _available(backend):
    return backends.availability(backend, torch.device("cpu"), "cross_entropy_fwd")[0]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    if not _available(backend):
        pytest.skip(f"{backend} backend unavailable here")
    fwd, fwd_inplace = fused_ops(backend)
    logits, target = make_inputs(5, 33, torch.float32, "cpu")
    torch.library.opcheck(fwd, (logits.clone().requires_grad_(), target, -100, 0.1))
    torch.library.opcheck(fwd_inplace, (logits.clone(), target, -100, 0.0))


def test_cpp_ops_reject_bad_arguments_without_crashing():
    if not _available("cpu"):
        pytest.skip("plm_engine._C not built")
    fwd, fwd_inplace = fused_ops("cpu")
    logits, target = make_inputs(4, 10, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="out of range"):
        fwd(logits, torch.tensor([0, 1, 10, 2]), -100, 0.0)
    with pytest.raises(RuntimeError, match="int64"):
        fwd(logits, target.int(), -100, 0.0)
    with pytest.raises(RuntimeError, match="rows"):
        fwd_inplace(logits, target[:2], -100, 0.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        fwd(logits.t(), torch.zeros(10, dtype=torch.int64), -100, 0.0)


def test_inplace_kernel_overwrites_poisoned_buffer():
    """The in-place kernel must write every gradient element (including ignored rows) over the input."""
    for backend in ("cpu", "triton"):
        if not _available(backend):
            continue
        _, fwd_inplace = fused_ops(backend)
        logits, target = make_inputs(4, 300, torch.float32, "cpu")
        buf = logits.clone()
        buf[1] = float("nan")  # ignored row: never read, must be zeroed
        fwd_inplace(buf, target, -100, 0.0)
        x = logits.clone().requires_grad_()
        F.cross_entropy(x, target, reduction="none").sum().backward()
        torch.testing.assert_close(buf, x.grad)


def test_dispatch():
    logits, target = make_inputs(3, 16, torch.float64, "cpu")
    torch.testing.assert_close(cross_entropy(logits, target), F.cross_entropy(logits, target))
    with pytest.raises(backends.BackendUnavailable, match="float32/float16/bfloat16"):
        cross_entropy(logits, target, backend="cpu")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_without_gradients_reduces(reduction):
    """Evaluation (no tensor requires grad) returns the same reduced loss as training does."""
    g = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(37, 24, generator=g), torch.randn(101, 24, generator=g)
    target = torch.randint(0, 101, (37,), generator=g)
    target[5] = -100
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, target, reduction=reduction, chunk_size=16)
    ref = F.cross_entropy(hidden @ weight.t(), target, reduction=reduction)
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
