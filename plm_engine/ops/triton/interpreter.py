"""Running the Triton kernels on CPU tensors through Triton's interpreter (tests and self-check only).

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before the first
plm_engine.ops.triton module is imported.
"""

from __future__ import annotations

import os
import sys


def enable() -> bool:
    """Turns the interpreter on for this process if no kernel module is loaded yet; returns whether it is on."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        if any(
            m.startswith("plm_engine.ops.triton.") and not m.endswith((".spec", ".interpreter", ".guard"))
            for m in sys.modules
        ):
            return False  # kernels already defined as compiled functions; too late to switch
        os.environ["TRITON_INTERPRET"] = "1"
    patch_bf16_dot()
    return True


def patch_bf16_dot() -> None:
    """The interpreter multiplies raw bf16 bit patterns in tl.dot (upstream triton-lang/triton#11584);
    upcast both operands to fp32 first, as the tensor cores effectively do. Idempotent."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return
    builder = interp.InterpreterBuilder
    if getattr(builder.create_dot, "_plm_patched", False):
        return
    orig = builder.create_dot

    def up(h):
        if h.dtype == tl.bfloat16:
            data = interp._convert_float(h.data, h.dtype, tl.float32, None).view(np.float32)
            return interp.TensorHandle(data, tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig(self, up(a), up(b), d, input_precision, max_num_imprecise_acc)

    create_dot._plm_patched = True  # type: ignore[attr-defined]  # a marker on a function object
    builder.create_dot = create_dot
