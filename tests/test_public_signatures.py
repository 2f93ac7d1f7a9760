"""Every public op (what plm_engine.ops exports) carries type hints on each argument and its result;
`make lint` type-checks them with mypy."""

from __future__ import annotations

import inspect

from plm_engine import ops


def test_public_ops_are_annotated():
    missing = []
    for name in ops.__all__:
        fn = getattr(ops, name)
        if not inspect.isfunction(fn):
            continue  # BACKENDS, BackendUnavailable
        sig = inspect.signature(fn)
        missing += [
            f"{name}({p})" for p, param in sig.parameters.items() if param.annotation is inspect.Parameter.empty
        ]
        if sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{name} -> ?")
    assert not missing, f"public ops without type hints: {', '.join(missing)}"
