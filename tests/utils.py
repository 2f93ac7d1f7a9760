"""Shared test helpers: the accuracy rule, backend lists, input makers."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from plm_engine.ops import backends, extension

REPO_ROOT = Path(__file__).resolve().parents[1]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Absolute slack on top of the 2x rule, per dtype (a kernel may round differently by one ulp of the
# output where PyTorch happens to be exact).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_logits_match(out: torch.Tensor, ref: torch.Tensor, keep: torch.Tensor, what: str, pad) -> None:
    """fp32 logits of our model against transformers' at the kept (unpadded) positions, to 1e-4 of the logit
    scale; with padding, our padded positions are zeros."""
    err = (out[keep] - ref[keep]).abs().max().item()
    scale = ref[keep].abs().max().item()
    assert err <= 1e-4 * scale, f"{what} pad={pad}: max |diff| {err:.3g} vs logit scale {scale:.3g}"
    if pad:
        assert (out[~keep] == 0).all(), "padding positions must come back as zeros"


def assert_2x_rule(ours: torch.Tensor, ref: torch.Tensor, torch_lowp: torch.Tensor, dtype=None, what=""):
    """FlashAttention's rule: our error vs a high-precision reference is at most 2x PyTorch's error
    when PyTorch runs the same computation in the same low precision (plus a small atol)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all() or not torch.isfinite(ref).all(), f"{what}: non-finite output"
    dtype = dtype or ours.dtype
    e_ours, e_torch = max_err(ours, ref), max_err(torch_lowp, ref)
    bound = 2 * e_torch + ATOL[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
    assert e_ours <= bound, f"{what}: error {e_ours:.3g} > 2 x torch's {e_torch:.3g} + atol (bound {bound:.3g})"


def cpu_backends(op: str) -> list:
    """Every backend that implements `op` for CPU tensors, as pytest params; those that cannot run here
    (no _C, triton not interpreted) skipped with the reason. triton only for ops with Triton kernels."""
    params = []
    for b in ("cpu", "triton", "torch"):
        if b == "triton" and not has_triton_kernel(op):
            continue
        ok, why = backends.availability(b, torch.device("cpu"), op)
        params.append(pytest.param(b, marks=() if ok else pytest.mark.skip(reason=why), id=b))
    return params


# A kernel file's registration (csrc/common/register.h): PLM_REGISTER_KERNELS(KEY, prefix, op, op, ...).
_REGISTER_RE = re.compile(r"^PLM_REGISTER_KERNELS\(\s*(\w+)\s*,\s*\w+\s*,([\w\s,]*)\)", re.M)
_DEF_RE = re.compile(r"\.def\(\s*\"(\w+)\(")


def _csrc_files() -> list[Path]:
    root = REPO_ROOT / "csrc"
    return sorted(p for ext in ("cpp", "cu") for p in root.rglob(f"*.{ext}"))


@functools.cache
def csrc_kernel_table() -> dict[str, frozenset[str]]:
    """{dispatch key: _C ops with a kernel for it}, read from csrc's PLM_REGISTER_KERNELS(KEY, prefix, ops...)
    lines: what a full build registers (the real CI and GPU builds compile csrc/cuda), whether or not
    this machine's _C was built with nvcc. Empty when the sources are absent (an installed package)."""
    table: dict[str, set[str]] = {}
    for path in _csrc_files():
        for key, ops in _REGISTER_RE.findall(path.read_text()):
            table.setdefault(key, set()).update(op.strip() for op in ops.split(","))
    return {key: frozenset(ops) for key, ops in table.items()}


@functools.cache
def csrc_defined_ops() -> frozenset[str]:
    """Every op schema csrc defines under plm_engine:: (m.def("name(...")."""
    return frozenset(op for path in _csrc_files() for op in _DEF_RE.findall(path.read_text()))


def cuda_kernel_ops() -> frozenset[str]:
    """The _C ops that have a CUDA kernel in a CUDA build. From csrc when present; otherwise from this
    machine's _C registrations, which know only when _C was built with nvcc."""
    table = csrc_kernel_table()
    if table:
        return table.get("CUDA", frozenset())
    if extension.cuda_built():
        return frozenset(op for op in csrc_defined_ops() | _registered_ops() if extension.has_kernel(op, "CUDA"))
    return frozenset()


def _registered_ops() -> set[str]:
    return (
        {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("plm_engine::")}
        if extension.load()[0] is not None
        else set()
    )


def has_triton_kernel(op: str) -> bool:
    """Whether an op family registered a Triton implementation for `op` (plm_engine.ops.backends)."""
    import plm_engine.ops  # noqa: F401  (every op family registers its backends on import)

    return (op, "triton") in backends._PREPARERS


def gpu_backends(op: str) -> list:
    """(cuda, backend) params for the GPU backends that implement `op`, marked cuda: triton when the op
    family has Triton kernels, cuda only when csrc registers a CUDA kernel for the op. A backend that
    is implemented but cannot run on this machine's GPU (triton missing, _C built without nvcc) is
    skipped with the reason; on a machine without a GPU conftest skips every cuda-marked case."""
    params = []
    if has_triton_kernel(op):
        ok, why = backends.triton_installed()
        marks = [pytest.mark.cuda] + ([] if ok else [pytest.mark.skip(reason=why)])
        params.append(pytest.param("cuda", "triton", marks=marks, id="cuda-triton"))
    if op in cuda_kernel_ops():
        marks = [pytest.mark.cuda]
        if torch.cuda.is_available():
            ok, why = backends.availability("cuda", torch.device("cuda"), op)
            if not ok:
                marks.append(pytest.mark.skip(reason=why))
        params.append(pytest.param("cuda", "cuda", marks=marks, id="cuda-cuda"))
    return params


def device_backends(op: str) -> list:
    """(device, backend) pairs: what runs here on CPU, plus the GPU backends that implement `op`
    (marked cuda; skipped on a machine without a GPU)."""
    cpu = [pytest.param("cpu", p.values[0], marks=p.marks, id=f"cpu-{p.id}") for p in cpu_backends(op)]
    return cpu + gpu_backends(op)


def triton_test_device(op: str) -> tuple[str, list]:
    """(device, pytestmark) for a module that tests Triton kernels directly: on a GPU machine it runs on
    "cuda" and every test carries the cuda mark (so `pytest -m cuda` selects it); elsewhere it runs on
    "cpu" under the Triton interpreter (unmarked), or is skipped when Triton cannot run `op` here."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ok, why = backends.availability("triton", torch.device(device), op)
    marks = [pytest.mark.skipif(not ok, reason=why)]
    if device == "cuda":
        marks.append(pytest.mark.cuda)
    return device, marks


# Byte offsets of each GGUF block type's fp16 fields within its block (ggml type id -> offsets).
HALF_FIELDS = {2: (0,), 3: (0, 2), 8: (0,), 12: (0, 2), 14: (208,)}


def random_blocks(qtype: int, n: int, k: int, seed: int) -> torch.Tensor:
    """(n, row_bytes) uint8 rows of GGUF blocks of ggml type `qtype`: random bytes, with every fp16 field a
    finite scale of a realistic size (valid blocks for any test; needs no gguf package)."""
    import numpy as np

    from plm_engine.ops.reference import GGUF_BLOCKS

    values, nbytes = GGUF_BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * (k // values), nbytes), dtype=np.uint8)
    for off in HALF_FIELDS[qtype]:
        scale = rng.uniform(-0.02, 0.02, raw.shape[0]).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(n, -1))
