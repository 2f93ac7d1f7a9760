"""The transparent-huge-page hint on large fresh CPU outputs (csrc/common/cpu_memory.h): when it is on,
and that it changes no result.

The choice is made once per process, so each setting runs in a subprocess. The expected answer is
read here from the same sysfs files, independently of the C++ reader.
"""

import glob
import os
import subprocess
import sys

import pytest

from plm_engine.ops import extension

pytestmark = pytest.mark.skipif(extension.load()[0] is None, reason="plm_engine._C is not built")


def _thp_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.readline()
    except OSError:
        return False
    return bool(mode.strip()) and "[never]" not in mode


def _balloon_reports_free_pages() -> bool:
    for dev in glob.glob("/sys/bus/virtio/devices/*"):
        try:
            with open(os.path.join(dev, "device")) as f:
                device = f.read().strip()
            with open(os.path.join(dev, "features")) as f:
                bits = f.read().strip()
        except OSError:
            continue
        if device == "0x0005" and len(bits) > 5 and bits[5] == "1":
            return True
    return False


def _hint_in_subprocess(value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PLM_ENGINE_CPU_HUGEPAGES"}
    if value is not None:
        env["PLM_ENGINE_CPU_HUGEPAGES"] = value
    code = "from plm_engine.ops import extension; print(extension.load()[0].cpu_huge_pages())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_hint_follows_the_variable_thp_and_the_balloon():
    thp = _thp_available()
    assert _hint_in_subprocess("0") == "off (PLM_ENGINE_CPU_HUGEPAGES=0)"
    forced = _hint_in_subprocess("1")
    auto = _hint_in_subprocess(None)
    if not thp:
        assert forced.startswith("off (transparent huge pages") and auto == forced
    else:
        assert forced == "on (PLM_ENGINE_CPU_HUGEPAGES=1)"
        if _balloon_reports_free_pages():
            assert auto.startswith("off (virtio-balloon free page reporting")
        else:
            assert auto == "on"


def _large_outputs_digest(value: str) -> str:
    """gelu and layer_norm on 32 MiB outputs (the hint's threshold) with the hint forced on or off,
    checked against the references; returns a digest of the outputs' bits."""
    code = (
        "import hashlib, torch, plm_engine.ops as ops\n"
        "from plm_engine.ops import reference as ref\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(2048, 4096)\n"
        "w = torch.randn(4096); b = torch.randn(4096)\n"
        "y = ops.gelu(x, backend='cpu')\n"
        "torch.testing.assert_close(y, ref.gelu_ref(x), rtol=1e-5, atol=1e-5)\n"
        "z = ops.layer_norm(x, w, b, backend='cpu')\n"
        "torch.testing.assert_close(z, ref.layer_norm_ref(x, w, b), rtol=1e-4, atol=1e-5)\n"
        "print(hashlib.sha256(y.numpy().tobytes() + z.numpy().tobytes()).hexdigest())\n"
    )
    env = dict(os.environ, PLM_ENGINE_CPU_HUGEPAGES=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_large_fresh_outputs_are_the_same_bits_with_and_without_the_hint():
    assert _large_outputs_digest("0") == _large_outputs_digest("1")
