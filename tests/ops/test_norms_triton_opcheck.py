"""The Triton norm ops as torch sees them (opcheck), and the launch paths test_norms.py does not reach:
rows too long for registers (streamed forward, split backward), empty inputs, direct bad calls."""

from __future__ import annotations

import pytest
import torch

from plm_engine.ops.reference import layer_norm_ref, rms_norm_ref
from tests.utils import triton_test_device

# On a GPU machine every test here runs on the GPU and carries the cuda mark; elsewhere they run under
# the Triton interpreter on CPU tensors (the expectations are the same on both).
DEVICE, pytestmark = triton_test_device("norm_fwd")


def _ops():
    from plm_engine.ops.triton import norms

    return norms.norm_fwd, norms.norm_bwd


def _inputs(rows, n, dtype, bias, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(DEVICE, dtype)
    b = (torch.randn(n, generator=g) * 0.3).to(DEVICE, dtype) if bias else None
    r = torch.randn(rows, n, generator=g).to(DEVICE, dtype) if residual else None
    return x, w, b, r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "is_rms,bias,residual",
    [(False, True, False), (False, True, True), (False, False, True), (True, False, False), (True, False, True)],
    ids=["ln-bias", "ln-bias-res", "ln-res", "rms", "rms-res"],
)
def test_opcheck(dtype, is_rms, bias, residual):
    fwd, bwd = _ops()
    x, w, b, r = _inputs(5, 67, dtype, bias, residual)
    for t in (x, w, b, r):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(fwd, (x, w, b, r, 1e-5, is_rms))
    _, h, mean, rstd = fwd(x, w, b, r, 1e-5, is_rms)
    saved = (h if residual else x).detach()
    dy = torch.randn_like(saved)
    dh = torch.randn_like(saved) if residual else None
    torch.library.opcheck(bwd, (dy, dh, saved, w.detach(), mean.detach(), rstd.detach(), bias, is_rms))


@pytest.mark.parametrize("n", [20000, 65536])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_long_rows(n, kind):
    """Rows longer than the register limits: streamed forward, coefficient pre-pass + split backward."""
    fwd, _ = _ops()
    is_rms = kind == "rms"
    x, w, b, r = _inputs(3, n, torch.float32, not is_rms, True, seed=n)
    leaves = [t.requires_grad_() for t in (x, w, b, r) if t is not None]
    y, h, mean, rstd = fwd(x, w, b, r, 1e-5, is_rms)
    dy, dh = torch.randn_like(y), torch.randn_like(y)
    grads = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), leaves)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    xr, wr = ref_leaves[0], ref_leaves[1]
    hr = xr + ref_leaves[-1]
    yr = rms_norm_ref(hr, wr, 1e-5) if is_rms else layer_norm_ref(hr, wr, ref_leaves[2], 1e-5)
    ref_grads = torch.autograd.grad((yr * dy.double()).sum() + (hr * dh.double()).sum(), ref_leaves)
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    centred = hr if is_rms else hr - hr.mean(-1, keepdim=True)
    torch.testing.assert_close(rstd.double(), (centred.square().mean(-1) + 1e-5).rsqrt(), rtol=1e-5, atol=0)
    if not is_rms:
        torch.testing.assert_close(mean.double(), hr.mean(-1), rtol=1e-5, atol=1e-5)
    for name, ours, ref in zip(["x", "weight", "bias", "residual"][: len(grads)], grads, ref_grads, strict=True):
        # dweight sums over rows, so its scale grows with the magnitude of xhat * dy; relative tolerance.
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4, msg=f"d{name} (n={n})")


def test_empty_inputs():
    fwd, bwd = _ops()
    w, b = torch.rand(8, device=DEVICE) + 0.5, torch.randn(8, device=DEVICE)
    y, h, mean, rstd = fwd(torch.empty(0, 8, device=DEVICE), w, b, None, 1e-5, False)
    assert y.shape == (0, 8) and h.numel() == 0 and mean.shape == (0,) and rstd.shape == (0,)
    dx, dw, db = bwd(
        torch.empty(0, 8, device=DEVICE), None, torch.empty(0, 8, device=DEVICE), w, mean, rstd, True, False
    )
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(w))
    # n == 0: an empty row has mean 0 and rstd 1/sqrt(eps), as in the C++ kernels.
    y, _, mean, rstd = fwd(torch.empty(3, 0, device=DEVICE), torch.empty(0, device=DEVICE), None, None, 0.25, False)
    assert y.shape == (3, 0) and torch.equal(mean, torch.zeros(3, device=DEVICE))
    torch.testing.assert_close(rstd, torch.full((3,), 2.0, device=DEVICE))


def test_direct_calls_reject_bad_arguments():
    fwd, bwd = _ops()
    x, w = torch.randn(4, 8, device=DEVICE), torch.rand(8, device=DEVICE)
    with pytest.raises(ValueError, match="2-D"):
        fwd(torch.randn(2, 4, 8, device=DEVICE), w, None, None, 1e-5, False)
    with pytest.raises(ValueError, match="contiguous"):
        fwd(torch.randn(8, 4, device=DEVICE).t(), torch.rand(4, device=DEVICE), None, None, 1e-5, False)
    with pytest.raises(ValueError, match="weight must have shape"):
        fwd(x, torch.rand(9, device=DEVICE), None, None, 1e-5, False)
    with pytest.raises(ValueError, match="residual"):
        fwd(x, w, None, x[:3], 1e-5, False)
    with pytest.raises(ValueError, match="rows longer than"):
        fwd(torch.empty(1, 65537, device=DEVICE), torch.empty(65537, device=DEVICE), None, None, 1e-5, True)
    with pytest.raises(ValueError, match="rstd"):
        bwd(x, None, x, w, torch.zeros(4, device=DEVICE), torch.zeros(3, device=DEVICE), False, False)
    with pytest.raises(ValueError, match="dy"):
        bwd(x[:2], None, x, w, torch.zeros(4, device=DEVICE), torch.zeros(4, device=DEVICE), False, False)
