"""The eager CPU short path of the ops (plm_engine.ops.backends.eager_cpu_kernel): an eager no-grad call
on CPU tensors runs the op's registered CPU kernel through plm_engine._C's typed handle, skipping the
backend choice, the op's autograd wrapper and the dispatcher. It must be taken where it may be (plain
tensors and nn.Parameter weights, backend None or "cpu"), give the general path's bits, and leave
autograd, vmap, fake tensors and other backends to the general path."""

from __future__ import annotations

import pytest
import torch

from plm_engine import ops
from plm_engine.ops import backends, extension
from plm_engine.ops.linear import kernel_max_rows

pytestmark = pytest.mark.skipif(extension.load()[0] is None, reason="plm_engine._C is not built")

N = 48  # a row length no kernel special-cases


def _params():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.nn.Parameter(torch.rand(N, generator=g) + 0.5),
        "b": torch.nn.Parameter(torch.randn(N, generator=g)),
        "lin_w": torch.nn.Parameter(torch.randn(24, N, generator=g) * N**-0.5),
    }


# (op whose CPU kernel the short path calls, the call on x (5, 3, N) and the parameters)
CASES = {
    "layer_norm": ("norm_fwd", lambda x, p, **kw: ops.layer_norm(x, p["w"], p["b"], **kw)),
    "rms_norm_residual": ("norm_fwd", lambda x, p, **kw: ops.rms_norm(x, p["w"], residual=x.flip(0), **kw)[0]),
    "softmax": ("softmax_fwd", lambda x, p, **kw: ops.softmax(x, dim=1, scale=0.7, **kw)),
    "softmax_causal": ("softmax_fwd", lambda x, p, **kw: ops.softmax(x[..., :3], causal=True, **kw)),
    "gelu": ("gelu_fwd", lambda x, p, **kw: ops.gelu(x, **kw)),
    "gelu_tanh": ("gelu_fwd", lambda x, p, **kw: ops.gelu(x, "tanh", **kw)),
    "swiglu": ("swiglu_fwd", lambda x, p, **kw: ops.swiglu(x, x.flip(1), **kw)),
    "linear_param_weight": ("linear_fwd", lambda x, p, **kw: ops.linear(x[0], p["lin_w"], **kw)),
}


@pytest.fixture
def counted(monkeypatch):
    """calls[op]: how often the short path called op's kernel."""
    calls: dict[str, int] = {}
    for op in {op for op, _ in CASES.values()}:
        kernel = backends._cpu_kernel(op)
        assert kernel is not None, f"plm_engine._C has no CPU kernel handle for {op}"

        def wrapper(*args, _op=op, _kernel=kernel):
            calls[_op] = calls.get(_op, 0) + 1
            return _kernel(*args)

        monkeypatch.setitem(backends._CPU_KERNELS, op, wrapper)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_short_path_taken_and_same_bits(case, dtype, counted, monkeypatch):
    op, call = CASES[case]
    if op == "linear_fwd" and kernel_max_rows(dtype) < 3:
        pytest.skip("the automatic choice keeps 3 rows on F.linear with this CPU build")
    p = {k: torch.nn.Parameter(v.detach().to(dtype)) for k, v in _params().items()}
    x = torch.randn(5, 3, N, generator=torch.Generator().manual_seed(1)).to(dtype)
    # The general path: an input that needs autograd, then its values.
    general = call(x.clone().requires_grad_(), p).detach()
    assert counted.get(op, 0) == 0
    with torch.no_grad():
        short = call(x, p)
    assert counted[op] == 1
    assert torch.equal(short, general)
    short_cpu = call(x, {k: v.detach() for k, v in p.items()}, backend="cpu")  # plain tensors, explicit cpu
    assert counted[op] == 2 and torch.equal(short_cpu, general)
    # Another backend, PLM_ENGINE_BACKEND, autograd: the general path.
    call(x, p, backend="torch")
    monkeypatch.setenv("PLM_ENGINE_BACKEND", "cpu")
    with torch.no_grad():
        assert torch.equal(call(x, p), general)
    monkeypatch.delenv("PLM_ENGINE_BACKEND")
    y = call(x.clone().requires_grad_(), p)
    assert y.grad_fn is not None
    assert counted[op] == 2


def test_vmap_and_fake_tensors_see_the_op(counted):
    x = torch.randn(2, 3, N)
    w = torch.rand(N) + 0.5
    out = torch.func.vmap(lambda t: ops.rms_norm(t, w))(x)
    torch.testing.assert_close(out, ops.rms_norm(x, w, backend="torch"), rtol=1e-5, atol=1e-5)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fy = ops.gelu(mode.from_tensor(x))
        fs = ops.softmax(mode.from_tensor(x))
    assert fy.shape == x.shape and fs.shape == x.shape
    assert counted.get("norm_fwd", 0) == 0 and counted.get("gelu_fwd", 0) == 0 and counted.get("softmax_fwd", 0) == 0


def test_errors_are_the_general_paths():
    """Bad input raises what the general path raises; an unsupported dtype is refused for backend="cpu"."""
    x = torch.randn(4, N)
    with torch.no_grad():
        with pytest.raises(ValueError, match="weight must have shape"):
            ops.layer_norm(x, torch.ones(N + 1))
        with pytest.raises(ValueError, match="differs"):
            ops.swiglu(x, x[:, :-1])
        with pytest.raises(backends.BackendUnavailable):
            ops.gelu(x.double(), backend="cpu")
        assert ops.softmax(x.double()).dtype == torch.float64  # automatic: the torch backend, quietly
