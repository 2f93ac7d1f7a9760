"""Fixtures of the op tests."""

from __future__ import annotations

import pytest

from plm_engine.ops import extension


@pytest.fixture
def cuda_build():
    """plm_engine._C when it was compiled with nvcc; skips (saying why) otherwise."""
    mod, why = extension.load()
    if mod is None:
        pytest.skip(why)
    if not mod.cuda_built():
        pytest.skip("plm_engine._C is a CPU-only build (no nvcc or PLM_ENGINE_SKIP_CUDA_BUILD=1)")
    return mod
