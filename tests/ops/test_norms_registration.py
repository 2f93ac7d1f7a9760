"""The C++ norm ops as torch sees them: opcheck (schema, fake impl, autograd) and torch.compile; and the
table of _C kernel registrations the test matrix (tests/utils.py) is generated from."""

from __future__ import annotations

import re

import pytest
import torch

from plm_engine import ops
from plm_engine.ops import backends, extension
from tests import utils

needs_cpp = pytest.mark.skipif(
    not backends.availability("cpu", torch.device("cpu"), "norm_fwd")[0], reason="plm_engine._C CPU kernels not built"
)


def _cpp_ops():
    from plm_engine.ops.norms import fused_ops

    return fused_ops("cpu")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "is_rms,bias,residual", [(False, True, False), (False, True, True), (True, False, True), (True, False, False)]
)
def test_opcheck(dtype, is_rms, bias, residual):
    fwd, bwd = _cpp_ops()
    x = torch.randn(5, 67, dtype=dtype, requires_grad=True)
    w = torch.rand(67, dtype=dtype, requires_grad=True)
    b = torch.randn(67, dtype=dtype, requires_grad=True) if bias else None
    r = torch.randn(5, 67, dtype=dtype, requires_grad=True) if residual else None
    torch.library.opcheck(fwd, (x, w, b, r, 1e-5, is_rms))
    y, h, mean, rstd = fwd(x, w, b, r, 1e-5, is_rms)
    hh = h if residual else x
    dy = torch.randn_like(x)
    dh = torch.randn_like(x) if residual else None
    torch.library.opcheck(bwd, (dy, dh, hh.detach(), w.detach(), mean.detach(), rstd.detach(), bias, is_rms))


class PreNormBlock(torch.nn.Module):
    """A pre-norm residual block as a transformer uses it: add + RMSNorm, then a linear."""

    def __init__(self, d):
        super().__init__()
        self.norm_w = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.ln_w = torch.nn.Parameter(torch.rand(d) + 0.5)
        self.ln_b = torch.nn.Parameter(torch.randn(d) * 0.1)
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x, residual):
        y, h = ops.rms_norm(x, self.norm_w, residual=residual)
        return ops.layer_norm(self.proj(y), self.ln_w, self.ln_b) + h


@needs_cpp
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = PreNormBlock(48)
    x, r = torch.randn(2, 9, 48, requires_grad=True), torch.randn(2, 9, 48, requires_grad=True)
    eager = model(x, r)
    g_eager = torch.autograd.grad(eager.sum(), [x, r, model.norm_w, model.ln_b])
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: the custom ops must not break the graph
    out = compiled(x, r)
    g = torch.autograd.grad(out.sum(), [x, r, model.norm_w, model.ln_b])
    torch.testing.assert_close(out, eager)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


# ---- the kernel table behind tests/utils.device_backends ------------------------------------------------


def test_csrc_kernel_table():
    """Every op with a CUDA kernel is a defined op that also has a CPU kernel; the norms have both."""
    table = utils.csrc_kernel_table()
    assert table, "no TORCH_LIBRARY_IMPL blocks found under csrc/"
    defined = utils.csrc_defined_ops()
    assert table["CPU"] <= defined and table["CUDA"] <= defined
    assert table["CUDA"] <= table["CPU"], table["CUDA"] - table["CPU"]
    assert {"norm_fwd", "norm_bwd"} <= table["CUDA"]
    assert utils.cuda_kernel_ops() == table["CUDA"]


def test_gpu_cases_follow_the_table():
    """A cuda-backend case exists exactly for the ops csrc gives a CUDA kernel; every GPU case carries
    the cuda mark; the triton cases exist exactly for the ops with Triton kernels."""
    for op in sorted(utils.csrc_defined_ops() - {"linear_cpu_isa"}):
        params = utils.device_backends(op)
        gpu = [p for p in params if p.values[0] == "cuda"]
        assert all(any(m.name == "cuda" for m in p.marks) for p in gpu), op
        assert ("cuda" in [p.values[1] for p in gpu]) == (op in utils.cuda_kernel_ops()), op
        assert ("triton" in [p.values[1] for p in gpu]) == utils.has_triton_kernel(op), op
        assert len({p.id for p in params}) == len(params), op


@pytest.mark.skipif(
    not extension.cuda_built(),
    reason="plm_engine._C was built without nvcc: it registers no "
    "CUDA kernels to compare with csrc (the CI and GPU builds do)",
)
def test_csrc_table_matches_the_cuda_build():
    registered = {op for op in utils.csrc_defined_ops() if extension.has_kernel(op, "CUDA")}
    assert registered == utils.cuda_kernel_ops()


def test_one_registration_pattern():
    """csrc registers kernels one way (csrc/bindings.cpp's header): schemas in csrc/<family>_ops.cpp, CPU
    kernels in csrc/cpu/<family>.cpp, CUDA kernels in csrc/cuda/<family>.cu; ops.h lists every family."""
    root = utils.REPO_ROOT / "csrc"
    ops_h = (root / "ops.h").read_text()
    families = sorted(p.name.removesuffix("_ops.cpp") for p in root.glob("*_ops.cpp"))
    assert len(families) >= 8, families
    for path in sorted(p for ext in ("cpp", "cu", "h", "cuh") for p in root.rglob(f"*.{ext}")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("testing/"):
            continue
        text = re.sub(r"//[^\n]*", "", path.read_text())  # code only
        assert "TORCH_LIBRARY(" not in text, f"{rel}: schemas go in a TORCH_LIBRARY_FRAGMENT of a *_ops.cpp"
        if "TORCH_LIBRARY_FRAGMENT(" in text or utils._DEF_RE.search(text):
            assert rel.endswith("_ops.cpp"), f"{rel} defines op schemas: they belong in csrc/<family>_ops.cpp"
        for key in utils._IMPL_BLOCK_RE.findall(text):
            folder = {"CPU": "cpu/", "CUDA": "cuda/"}.get(key)
            assert folder and rel.startswith(folder), f"{rel} registers {key} kernels outside csrc/{folder}"
    for family in families:
        header = family.removesuffix("_ops.cpp")
        assert f"{family}_ops.cpp" in ops_h, f"ops.h does not list {family}"
        assert any((root / f"{name}.h").exists() for name in (header, header + "s")), f"no csrc/{header}.h"
