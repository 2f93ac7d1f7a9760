"""Building a model on the meta device (shapes only, no memory) before its weights are assigned."""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch import nn

# nn.init functions that modules' reset_parameters call (nn.Linear, nn.Embedding, ours).
_INITS = (
    "normal_",
    "uniform_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "zeros_",
    "ones_",
    "constant_",
)
_lock = threading.RLock()  # re-entrant: a nested block restores what the outer one set


def _skip_meta(init):
    @functools.wraps(init)
    def wrapped(tensor, *args, **kwargs):
        return tensor if tensor.is_meta else init(tensor, *args, **kwargs)

    return wrapped


@contextlib.contextmanager
def meta_device():
    """`with torch.device("meta")`, without running nn.init on the meta parameters.

    Modules initialise their parameters in __init__ even on the meta device, where there is nothing to
    fill; PyTorch runs those calls through Python decompositions that import torch._dynamo (with sympy
    and mpmath, about 900 modules): most of a cold load's time and ~80 MB of resident memory, for
    nothing. Inside this block nn.init leaves meta tensors alone; other tensors (another thread's) are
    initialised as usual.
    """
    with _lock:
        saved = {name: getattr(nn.init, name) for name in _INITS}
        try:
            for name, init in saved.items():
                setattr(nn.init, name, _skip_meta(init))
            with torch.device("meta"):
                yield
        finally:
            for name, init in saved.items():
                setattr(nn.init, name, init)
