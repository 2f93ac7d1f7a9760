"""Test set-up: Triton runs under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is switched on here,
before any test imports a plm_engine Triton module (they load lazily).
"""

import os

# Every value check runs everywhere in the tests (plm_engine/ops/checks.py), also inside the engine and the
# trainer; tests of the hot-path rule switch it off where they need production behaviour.
os.environ.setdefault("PLM_ENGINE_DEBUG_CHECKS", "1")
# No test reaches the network: a Hub id that is not in the cache fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from plm_engine.ops import extension  # noqa: E402
from plm_engine.ops.triton import interpreter  # noqa: E402

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


def pytest_generate_tests(metafunc):
    # A test that takes the `cpu_isa` fixture runs once per instruction-set build of the C++ CPU kernels
    # this machine can run (generic, avx2, avx512, avx512_bf16 on an AVX-512 BF16 machine), so every
    # build is proven on whatever machine runs the suite.
    if "cpu_isa" in metafunc.fixturenames:
        metafunc.parametrize("cpu_isa", extension.cpu_isas_available() or ["none"], indirect=True)


@pytest.fixture
def cpu_isa(request):
    """The C++ CPU kernels capped at one instruction set for the test (parametrized, see above)."""
    if request.param == "none":
        pytest.skip("plm_engine._C is not built")
    with extension.cpu_isa_cap(request.param):
        yield request.param
