"""A quick self-check: every op on every usable backend against the fp64 reference, forward and backward.

Run by `plm-engine selfcheck` (and the README's main command). Without a GPU, the Triton kernels run
under Triton's interpreter on small inputs. Each op family adds an entry to CHECKS.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from plm_engine import ops
from plm_engine.ops import backends

# Max error allowed relative to the reference's magnitude, per dtype: loose enough for rounding,
# tight enough that a wrong kernel (a missing term, a wrong index) fails by orders of magnitude.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@dataclass(frozen=True)
class OpCheck:
    name: str
    dispatch_op: str  # the _C op that tells whether cpu/cuda kernels exist
    make_inputs: Callable[[torch.device, torch.dtype, torch.Generator], list]
    run: Callable[..., torch.Tensor | tuple]  # run(*inputs, backend=...)
    grad_inputs: tuple[int, ...] = (0,)  # which inputs the backward check differentiates; () = forward only


def _norm_inputs(with_bias):
    def make(device, dtype, g):
        x = torch.randn(7, 333, generator=g) * 2 + 0.5
        w = torch.rand(333, generator=g) + 0.5
        b = torch.randn(333, generator=g) if with_bias else None
        r = torch.randn(7, 333, generator=g)
        return [t.to(device, dtype) if t is not None else None for t in (x, w, b, r)]

    return make


def _attention_inputs(device, dtype, g):
    q, k, v = (torch.randn(2, 37, h, 64, generator=g).to(device, dtype) for h in (6, 2, 2))
    return [q, k, v]


def _paged_inputs(device, dtype, g):
    # Two sequences of 40 and 7 cached tokens over shuffled 16-token blocks; 2 new query tokens each.
    k_cache, v_cache = (torch.randn(8, 16, 2, 64, generator=g).to(device, dtype) for _ in range(2))
    block_table = torch.randperm(8, generator=g)[:6].reshape(2, 3).to(device, torch.int32)
    q = torch.randn(2, 2, 4, 64, generator=g).to(device, dtype)
    return [q, k_cache, v_cache, block_table, torch.tensor([40, 7], dtype=torch.int32, device=device)]


def _rows(*shape):
    return lambda device, dtype, g: [torch.randn(*shape, generator=g).to(device, dtype) * 3 for _ in range(2)]


def _rope_inputs(device, dtype, g):
    cos, sin = ops.rope_cos_sin(41, 64, theta=1e4, device=device)
    q = torch.randn(2, 41, 6, 64, generator=g).to(device, dtype)
    k = torch.randn(2, 41, 2, 64, generator=g).to(device, dtype)
    return [q, k, cos, sin]


def _ce_inputs(device, dtype, g):
    logits = (torch.randn(13, 1001, generator=g) * 4).to(device, dtype)
    target = torch.randint(0, 1001, (13,), generator=g).to(device)
    target[3] = -100
    return [logits, target]


def _linear_inputs(device, dtype, g):
    # K = 333 has a masked tail; 45 output features end in a partial block of weight rows.
    x = torch.randn(7, 333, generator=g)
    w = torch.randn(45, 333, generator=g) * 333**-0.5
    b = torch.randn(45, generator=g)
    return [t.to(device, dtype) for t in (x, w, b)]


CHECKS = [
    OpCheck(
        "layer_norm",
        "norm_fwd",
        _norm_inputs(True),
        lambda x, w, b, r, backend: ops.layer_norm(x, w, b, residual=r, backend=backend),
        (0, 1, 2, 3),
    ),
    OpCheck(
        "rms_norm",
        "norm_fwd",
        _norm_inputs(False),
        lambda x, w, b, r, backend: ops.rms_norm(x, w, residual=r, backend=backend),
        (0, 1, 3),
    ),
    OpCheck(
        "softmax",
        "softmax_fwd",
        _rows(5, 37, 333),
        lambda x, _, backend: ops.softmax(x, scale=0.7, causal=True, backend=backend),
    ),
    OpCheck(
        "cross_entropy",
        "cross_entropy_fwd",
        _ce_inputs,
        lambda x, t, backend: ops.cross_entropy(x, t, label_smoothing=0.1, backend=backend),
    ),
    OpCheck("rope", "rope", _rope_inputs, lambda q, k, c, s, backend: ops.rope(q, k, c, s, backend=backend), (0, 1)),
    OpCheck("swiglu", "swiglu_fwd", _rows(7, 333), lambda g, u, backend: ops.swiglu(g, u, backend=backend), (0, 1)),
    OpCheck("gelu", "gelu_fwd", _rows(7, 333), lambda x, _, backend: ops.gelu(x, "tanh", backend=backend)),
    OpCheck(
        "attention",
        "attn_fwd",
        _attention_inputs,
        lambda q, k, v, backend: ops.attention(q, k, v, causal=True, backend=backend),
        (0, 1, 2),
    ),
    OpCheck(
        "linear", "linear_fwd", _linear_inputs, lambda x, w, b, backend: ops.linear(x, w, b, backend=backend), (0, 1, 2)
    ),
    OpCheck(
        "paged_attn",
        "paged_attn",
        _paged_inputs,
        lambda q, kc, vc, bt, cs, backend: ops.paged_attention(q, kc, vc, bt, cs, backend=backend),
        (),
    ),
]


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _forward_backward(check: OpCheck, inputs: list, backend: str):
    leaves = [
        t.detach().requires_grad_(i in check.grad_inputs) if t is not None else None for i, t in enumerate(inputs)
    ]
    outs = _as_tuple(check.run(*leaves, backend=backend))
    if not check.grad_inputs:
        return [o.detach() for o in outs], []
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=g).to(o.device, torch.float64) for o in outs]
    loss = sum((o.double() * c).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, [leaves[i] for i in check.grad_inputs])
    return [o.detach() for o in outs], list(grads)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def run(devices=None, dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> list[dict]:
    devices = devices or ([torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else []))
    rows = []
    for check in CHECKS:
        for device in devices:
            for dtype in dtypes:
                g = torch.Generator().manual_seed(0)
                inputs = check.make_inputs(device, dtype, g)
                ref_inputs = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
                ref_out, ref_grads = _forward_backward(check, ref_inputs, "torch")
                for backend in backends.usable_backends(device, check.dispatch_op):
                    row = {"op": check.name, "device": device.type, "backend": backend, "dtype": str(dtype)[6:]}
                    t0 = time.perf_counter()
                    try:
                        outs, grads = _forward_backward(check, inputs, backend)
                        row["fwd_err"] = max(_rel_err(o, r) for o, r in zip(outs, ref_out))
                        row["bwd_err"] = max((_rel_err(a, r) for a, r in zip(grads, ref_grads)), default=None)
                        row["ok"] = max(row["fwd_err"], row["bwd_err"] or 0.0) <= TOLERANCE[dtype]
                    except backends.BackendUnavailable as e:  # e.g. fp32 on a GPU-only-fp16 kernel
                        row.update(fwd_err=None, bwd_err=None, ok=True, skipped=str(e))
                    except Exception as e:  # report every failure, keep checking the rest
                        row.update(fwd_err=None, bwd_err=None, ok=False, error=f"{type(e).__name__}: {e}")
                    row["seconds"] = round(time.perf_counter() - t0, 3)
                    rows.append(row)
    return rows


def format_text(rows: list[dict]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.1e}"
    lines = [f"{'op':<12} {'device':<6} {'backend':<8} {'dtype':<9} {'fwd err':>8} {'bwd err':>8}  result"]
    for r in rows:
        status = "ok" if r["ok"] else "FAIL" + (f" ({r['error']})" if "error" in r else "")
        if "skipped" in r:
            status = f"skipped ({r['skipped']})"
        lines.append(
            f"{r['op']:<12} {r['device']:<6} {r['backend']:<8} {r['dtype']:<9} "
            f"{fmt(r['fwd_err']):>8} {fmt(r['bwd_err']):>8}  {status}"
        )
    n_bad = sum(not r["ok"] for r in rows)
    lines.append(f"{len(rows) - n_bad} passed, {n_bad} failed (errors relative to the fp64 reference's max)")
    return "\n".join(lines)
