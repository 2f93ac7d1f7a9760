"""Test set-up: Triton runs under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is switched on here,
before any test imports a plm_engine Triton module (they load lazily).
"""

import pytest
import torch

from plm_engine.ops.triton import interpreter

if not torch.cuda.is_available():
    interpreter.enable()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
