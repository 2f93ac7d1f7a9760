"""Backend choice for every op: the only place that decides which implementation runs.

Backends:
  triton  Triton kernels: CUDA tensors natively; CPU tensors only under TRITON_INTERPRET=1 (tests).
  cuda    CUDA C++ kernels of plm_engine._C, when it was compiled with nvcc.
  cpu     C++ (OpenMP) kernels of plm_engine._C on CPU tensors.
  torch   the pure-PyTorch reference (plm_engine/ops/reference.py); runs everywhere.

A request comes from the call's `backend=` argument, else from the PLM_ENGINE_BACKEND environment
variable, else it is automatic: CUDA tensors try triton, cuda, torch; CPU tensors try cpu, torch. An
automatic choice skips what is unavailable quietly; an explicit request that cannot run raises
BackendUnavailable saying why.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch

from plm_engine.ops import contracts, extension

BACKENDS = ("triton", "cuda", "cpu", "torch")
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def _traced_as_constant(fn):
    """torch.compiler.assume_constant_result without importing torch._dynamo at our import time.

    Dynamo calls such a function eagerly while tracing and bakes its result into the graph. Backend
    choice is static per call site, so that is exactly right, and Dynamo cannot trace the import
    machinery behind it anyway. (torch.compiler.assume_constant_result sets this same attribute; using
    it here would import torch._dynamo, and with it triton, on `import plm_engine`.)
    """
    fn._dynamo_marked_constant = True
    return fn


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call."""


@functools.cache
def triton_installed() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'triton>=3.6')"
    return True, ""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability(backend: str, device: torch.device, op: str) -> tuple[bool, str]:
    """(usable, reason if not) for running `op` on `device` with `backend`.

    `op` names the _C kernel family (e.g. "norm_fwd") whose registration is checked for cpu/cuda.
    """
    if backend == "torch":
        return True, ""
    if backend == "triton":
        ok, why = triton_installed()
        if not ok:
            return False, why
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return True, ""
        return False, (
            f"Triton kernels need CUDA tensors (got {device.type}); "
            "set TRITON_INTERPRET=1 before importing to run them on the CPU (slow, for tests)"
        )
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return False, f"the {backend} backend runs on {backend} tensors, got {device.type} tensors"
        mod, why = extension.load()
        if mod is None:
            return False, why
        key = "CPU" if backend == "cpu" else "CUDA"
        if not extension.has_kernel(op, key):
            extra = " (plm_engine._C was built without nvcc; see README: backends)" if backend == "cuda" else ""
            return False, f"plm_engine._C has no {key} kernel for {op}{extra}"
        return True, ""
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


# Per (op, backend): a function that makes the backend's ops callable (imports a Triton module, registers
# fake impls and autograd for _C ops). Op families register them; prepare() runs each at most once.
_PREPARERS: dict[tuple[str, str], Callable[[], object]] = {}
_PREPARED: set[tuple[str, str]] = set()


def register_preparer(op: str, backend_names: tuple[str, ...], fn: Callable[[], object]) -> None:
    for b in backend_names:
        _PREPARERS[(op, b)] = fn


def register_family(contract, ops: tuple[str, ...], triton_module: str | None = None) -> None:
    """An op family's preparers, keyed by its `ops`: the cpu and cuda backends (the _C ops, one set for both
    devices) get `contract`'s fake impls and autograd (plm_engine/ops/contracts); the triton backend, when
    the family has one, imports `triton_module`, which defines and registers plm_engine::triton_<name>."""

    @functools.cache
    def register_cpp() -> None:
        extension.load()
        contracts.register(contract, "")

    for op in ops:
        register_preparer(op, ("cpu", "cuda"), register_cpp)
        if triton_module is not None:
            register_preparer(op, ("triton",), lambda: importlib.import_module(triton_module))


def family_ops(op: str, backend: str, names: tuple[str, ...]):
    """The ops `names` as `backend` implements them: plm_engine::triton_<name> for triton, plm_engine::<name>
    (the _C op, dispatched by device) for cpu and cuda. Prepared on first use; otherwise plain attribute
    lookups, so torch.compile traces straight through to the op."""
    prepare(op, backend)
    prefix = "triton_" if backend == "triton" else ""
    return tuple(getattr(torch.ops.plm_engine, prefix + name).default for name in names)


@_traced_as_constant
def prepare(op: str, backend: str) -> bool:
    """Runs the preparer of (op, backend) once. Under torch.compile it runs eagerly at trace time."""
    key = (op, backend)
    if key not in _PREPARED and key in _PREPARERS:
        _PREPARERS[key]()
        _PREPARED.add(key)
    return True


# os.environ's own dict of encoded names (POSIX): a lookup there costs a tenth of os.environ.get, which
# encodes the name on every call, and it sees every change made through os.environ.
_ENVIRON: dict[bytes, bytes] | None = getattr(os.environ, "_data", None) if os.name == "posix" else None


def env_backend_set() -> bool:
    """Whether PLM_ENGINE_BACKEND is set to a non-empty value: the per-call test of the ops' eager short
    paths (read at every call, as users and tests may set it at run time). requested() keeps
    os.environ.get: torch.compile traces it, and Dynamo knows os.environ, not its private dict."""
    if _ENVIRON is not None:
        return bool(_ENVIRON.get(b"PLM_ENGINE_BACKEND"))
    return bool(os.environ.get("PLM_ENGINE_BACKEND"))


def requested(backend: str | None) -> str | None:
    """The explicit request of a call, else of PLM_ENGINE_BACKEND, else None (automatic)."""
    name = backend if backend is not None else os.environ.get("PLM_ENGINE_BACKEND") or None
    if name is not None and name not in BACKENDS:
        src = "backend=" if backend is not None else "PLM_ENGINE_BACKEND="
        raise ValueError(f"unknown backend {src}{name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@_traced_as_constant
def choose(device: torch.device, op: str, backend: str | None = None, unsupported: dict[str, str] | None = None) -> str:
    """Picks the backend that runs `op` on `device`.

    unsupported: backends that cannot take this particular call (e.g. a row too long for one Triton
    block), with the reason; automatic choice skips them, an explicit request raises.
    """
    unsupported = unsupported or {}
    name = requested(backend)
    if name is not None:
        ok, why = availability(name, device, op)
        if ok and name in unsupported:
            ok, why = False, unsupported[name]
        if not ok:
            raise BackendUnavailable(f"backend {name!r} cannot run {op} here: {why}")
    else:
        name = next(
            (
                b
                for b in AUTO_ORDER.get(device.type, ("torch",))
                if b not in unsupported and availability(b, device, op)[0]
            ),
            "torch",
        )
    prepare(op, name)
    return name


def usable_backends(device: torch.device, op: str) -> list[str]:
    """Every backend that can run `op` on `device` now, in automatic order first."""
    return [b for b in BACKENDS if availability(b, device, op)[0]]


# ---- the eager CPU short path ----------------------------------------------------------------------
# A small tensor's CPU kernel takes microseconds, and the general path around it (backends.choose, the
# op's Python autograd wrapper, the dispatcher) costs several times that, and several times what eager
# PyTorch's own call costs (NOTES.md, "The eager CPU short path"). An eager call on CPU tensors that
# needs no autograd and asks for no other backend may call the op's registered CPU kernel through
# plm_engine._C's typed handle (csrc/cpu/kernels.h) instead: the same kernel on the same arguments, so
# the same bits. Anything else (autograd, torch.compile,
# autocast, a dispatch mode or functorch transform, PLM_ENGINE_BACKEND, another backend) takes the
# general path, which also reports every error: an op validates its arguments before asking.
_CPU_KERNELS: dict[str, Callable | None] = {}
# The tensor types the short path takes: plain tensors and nn.Parameter (a model's weights), whose
# __torch_function__ is disabled; any other subclass may override ops and takes the general path.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _cpu_kernel(op: str) -> Callable | None:
    if op not in _CPU_KERNELS:
        mod = extension.load()[0]
        kernel = getattr(mod, op, None) if mod is not None and extension.has_kernel(op, "CPU") else None
        if kernel is not None:
            prepare(op, "cpu")  # the op's fake and autograd impls, registered as the general path would
        _CPU_KERNELS[op] = kernel
    return _CPU_KERNELS[op]


def eager_cpu_kernel(op: str, backend: str | None, *tensors: torch.Tensor | None) -> Callable | None:
    """The CPU kernel of `op` (a plm_engine._C function taking the op's arguments), when this call, on
    `tensors` (None for an absent optional), may skip the general path; else None. The caller has
    validated the arguments and checked that the kernel supports them (dtype, shape); any backend other
    than None and "cpu" gets None here."""
    if backend is None:
        if env_backend_set():
            return None
    elif backend != "cpu":
        return None
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSORS or not t.is_cpu or (grad and t.requires_grad)):
            return None
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return None
    # A dispatch mode (FakeTensorMode, make_fx, FlopCounterMode) or a functorch transform (vmap, grad)
    # must see the op itself: the kernel below autograd would bypass them.
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return None
    return _cpu_kernel(op)
