"""The contract of each op family: what every backend implements and how torch sees it.

One module per family (norms, softmax, rope, activations, cross_entropy, attention, paged_attention,
linear) holds, for the family's backend ops:
  - the op names and schemas (in its docstring; csrc/<family>.h says the same for C++),
  - the dtypes and size limits of the fused kernels,
  - FAKES: each op's fake (meta) impl, for torch.compile and opcheck,
  - register_autograd(prefix): the backward wiring of its differentiable ops.

Dependencies point one way: the public op (plm_engine/ops/<family>.py) and every backend
(plm_engine/ops/triton/<family>.py, the _C ops) import the contract; the contract imports only torch.
A backend's ops are named plm_engine::<prefix><name>: prefix "" for the _C ops (registered in C++,
given fakes and autograd by plm_engine.ops.backends when first chosen), "triton_" for the Triton ones
(registered by their module on import).
"""

from __future__ import annotations

from types import ModuleType

import torch


def qualname(prefix: str, name: str) -> str:
    """The dispatcher name of contract op `name` as one backend registers it."""
    return f"plm_engine::{prefix}{name}"


def op(prefix: str, name: str) -> torch._ops.OpOverload:
    """The callable op `name` of the backend with `prefix`."""
    return getattr(torch.ops.plm_engine, prefix + name).default


def register(contract: ModuleType, prefix: str) -> None:
    """Gives one backend's ops (plm_engine::<prefix><name> for every name in contract.FAKES) the fake impls
    and autograd of `contract`. The ops must be defined already (by _C, or by torch.library.custom_op)."""
    for name, fake in contract.FAKES.items():
        torch.library.register_fake(qualname(prefix, name))(fake)
    contract.register_autograd(prefix)
