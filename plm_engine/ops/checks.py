"""When an op may read tensor values on the host to validate them.

Shape, dtype and device checks read metadata only: they always run. Value checks (token ids and positions
in range, cu_seqlens monotone, block tables and slots inside the cache, class indices valid) copy device
memory to the host: on a GPU each is a full synchronisation, it is an error under CUDA-graph capture, and
torch.compile(fullgraph=True) cannot trace it. So the hot path (a decode step, a prefill, a training
step) must not do them. Values are checked once, where data enters:

- a public op or a model called directly by a user checks what it is given;
- the engine checks prompts in add_request and builds every step's tables itself; the trainer's data
  pipeline checks token ids once; both then run the model inside `trusted()`, where ops and the model
  skip their value checks;
- nothing reads values while torch.compile traces or a CUDA graph is being captured;
- PLM_ENGINE_DEBUG_CHECKS=1 (or set_debug(True)) checks everything everywhere (except while tracing or
  capturing, where it cannot): the test suite runs with it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

import torch

_state = threading.local()
_debug = os.environ.get("PLM_ENGINE_DEBUG_CHECKS", "0") not in ("", "0")


def debug() -> bool:
    """Whether every value check runs, trusted or not (PLM_ENGINE_DEBUG_CHECKS=1)."""
    return _debug


def set_debug(on: bool) -> bool:
    """Switches the debug checks; returns the previous setting."""
    global _debug
    prev, _debug = _debug, bool(on)
    return prev


def require_tensor(fn: str, name: str, t: object, ok: Callable[[torch.Tensor], bool], expected: str) -> None:
    """Metadata check: raises `fn: name must be <expected>, got <dtype> <shape>` unless t is a tensor for
    which ok(t) holds."""
    if not isinstance(t, torch.Tensor) or not ok(t):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{fn}: {name} must be {expected}, got {got}")


def require_positive(owner: str, **values: int) -> None:
    """Configuration check: raises `owner: name must be >= 1, got value` for the first value below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{owner}: {name} must be >= 1, got {value}")


def require_same_device(fn: str, name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """Metadata check: t is on like's device."""
    if t.device != like.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {like_name} is on {like.device}")


class _Trusted:
    def __enter__(self):
        _state.depth = getattr(_state, "depth", 0) + 1

    def __exit__(self, *exc):
        _state.depth -= 1
        return False


def trusted():
    """Context manager: the inputs of the ops and models called inside were validated where they entered,
    so their value checks are skipped. (A no-op while torch.compile traces, where no check runs anyway.)"""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _Trusted()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def value_checks() -> bool:
    """May the caller read tensor values on the host to validate them now?"""
    if torch.compiler.is_compiling() or _capturing():
        return False
    return _debug or getattr(_state, "depth", 0) == 0
