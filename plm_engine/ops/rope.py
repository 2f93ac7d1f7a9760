"""Rotary position embedding (RoPE) of q and k, on every backend, and its cos/sin tables.

Every fused backend implements the same pair of ops on 4-D (batch, seqlen, heads, head_dim) q/k whose
last dim is contiguous (other strides free, so views of a fused qkv tensor work in place):
  rope(q, k, cos, sin, positions?, interleaved, conjugate) -> (q_out, k_out)     out of place
  rope_(q!, k!, cos, sin, positions?, interleaved, conjugate) -> ()              in place
with cos/sin (max_seqlen, rotary_dim / 2) and positions int64 (batch, seqlen); see
plm_engine/ops/contracts/rope.py for the exact contract. The C++ kernels register them as
torch.ops.plm_engine.rope / rope_ (CPU and CUDA keys), the Triton kernels as plm_engine::triton_rope /
triton_rope_. This module builds the tables, validates the arguments (once, for every backend) and
picks the backend.
"""

from __future__ import annotations

import math

import torch

from plm_engine.ops import backends, checks
from plm_engine.ops.contracts import rope as contract
from plm_engine.ops.reference import rope_ref

# ---- cos/sin tables -------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: dict | None = None) -> torch.Tensor:
    """The rotary_dim / 2 inverse frequencies theta^(-2i / head_dim), in float64.

    head_dim: the rotated width (head_dim, or rotary_dim for partial rotary); must be even.
    scaling: None, or a HF-style rope_scaling dict:
      {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
       "original_max_position_embeddings"} — Llama 3.x: long wavelengths are divided by `factor`,
       short ones kept, and the band between interpolated smoothly;
      {"rope_type": "linear", "factor"} — position interpolation: every frequency divided by `factor`.
    A dict without "rope_type" that has the llama3 keys is taken as llama3.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope: head_dim (the rotary width) must be a positive even number, got {head_dim}")
    if not theta > 0:
        raise ValueError(f"rope: theta must be > 0, got {theta}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind is None and "low_freq_factor" in scaling:
        kind = "llama3"
    if kind in ("default", None):
        return inv_freq
    factor = float(scaling.get("factor", 0))
    if not factor > 0:
        raise ValueError(f"rope: scaling factor must be > 0, got {scaling.get('factor')!r}")
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"rope: unsupported rope_type {kind!r}; supported: 'default', 'linear', 'llama3'")
    missing = [
        key for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if key not in scaling
    ]
    if missing:
        raise ValueError(f"rope: llama3 scaling needs {', '.join(missing)}")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    if not high > low:
        raise ValueError(f"rope: llama3 scaling needs high_freq_factor > low_freq_factor, got {high} <= {low}")
    wavelen = 2 * math.pi / inv_freq
    # Wavelengths longer than old_len / low are scaled fully, shorter than old_len / high not at all.
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cos_sin(
    positions: int | torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    scaling: dict | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rope(): each (len(positions), head_dim / 2).

    positions: an int n (positions 0..n-1) or a 1-D integer tensor of positions. head_dim: the rotated
    width (pass rotary_dim for partial rotary). Angles are computed in float64, then cast to dtype
    (keep float32: the kernels do their math in fp32 whatever the q/k dtype).
    """
    if isinstance(positions, int):
        if positions < 0:
            raise ValueError(f"rope_cos_sin: the number of positions must be >= 0, got {positions}")
        pos = torch.arange(positions, dtype=torch.float64)
    elif isinstance(positions, torch.Tensor) and positions.dim() == 1:
        if positions.is_floating_point() or positions.is_complex():
            raise ValueError(f"rope_cos_sin: positions must be integers, got {positions.dtype}")
        device = positions.device if device is None else device
        pos = positions.detach().to("cpu", torch.float64)
    else:
        raise ValueError("rope_cos_sin: positions must be an int or a 1-D integer tensor")
    angles = torch.outer(pos, rope_inv_freq(head_dim, theta, scaling))  # (n, head_dim / 2)
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


# ---- backends --------------------------------------------------------------------------------------

backends.register_family(contract, ("rope",), "plm_engine.ops.triton.rope")


def fused_ops(backend: str):
    """(out-of-place, in-place) ops of a fused backend: 'triton', or 'cpu'/'cuda' (the same _C ops)."""
    return backends.family_ops("rope", backend, ("rope", "rope_"))


class _InplaceRope(torch.autograd.Function):
    """In-place rotation under autograd: the in-place op forward, the out-of-place op (negative angle)
    backward. torch.library cannot attach autograd to a mutating op, hence this Function."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, positions, interleaved, ops):
        out_of_place, in_place = ops
        in_place(q, k, cos, sin, positions, interleaved, False)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin, positions)
        ctx.interleaved, ctx.op = interleaved, out_of_place
        ctx.q_shape, ctx.k_shape = q.shape, k.shape
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, positions = ctx.saved_tensors
        dq, dk = contract.grads_or_zeros(ctx, dq, dk)
        dq, dk = ctx.op(dq, dk, cos, sin, positions, ctx.interleaved, True)
        return dq, dk, None, None, None, None, None


# ---- public function ------------------------------------------------------------------------------


def _check_args(q, k, cos, sin, position_ids, interleaved):
    """Validates a rope() call; returns (cos, sin) in half form (max_seqlen, rotary_dim / 2)."""
    for label, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rope: {label} must be a tensor, got {type(t).__name__}")
    if not q.is_floating_point():
        raise ValueError(f"rope: q must be a floating-point tensor, got {q.dtype}")
    if k.dtype != q.dtype:
        raise ValueError(f"rope: k dtype {k.dtype} differs from q dtype {q.dtype}")
    for label, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"rope: {label} is on {t.device} but q is on {q.device}")
    if q.dim() not in (3, 4):
        raise ValueError(
            f"rope: q must be (batch, seqlen, heads, head_dim) or packed (total_tokens, heads, "
            f"head_dim), got shape {tuple(q.shape)}"
        )
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"rope: k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} (only the head count may differ)"
        )
    head_dim = q.shape[-1]
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope: head_dim must be positive and even, got {head_dim}")
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(
            f"rope: cos and sin must both be (max_seqlen, rotary_dim / 2), got {tuple(cos.shape)} "
            f"and {tuple(sin.shape)}"
        )
    if not cos.is_floating_point() or cos.dtype != sin.dtype:
        raise ValueError(f"rope: cos and sin must be floating point of one dtype, got {cos.dtype} and {sin.dtype}")
    if cos.dtype not in (torch.float32, q.dtype):
        raise ValueError(f"rope: cos/sin must be float32 or q's dtype {q.dtype}, got {cos.dtype}")
    width = cos.shape[1]
    if 0 < 2 * width <= head_dim:
        pass
    elif width == head_dim:
        # Full-width tables (HF style): each angle appears twice, as cat(f, f), or repeated per pair
        # when interleaved. Keep one copy of each (a view; the kernels take strides).
        half = width // 2
        cos, sin = (cos[:, 0::2], sin[:, 0::2]) if interleaved else (cos[:, :half], sin[:, :half])
    else:
        raise ValueError(
            f"rope: cos/sin last dim must be rotary_dim / 2 (at most head_dim / 2 = {head_dim // 2}) "
            f"or head_dim = {head_dim}, got {width}"
        )
    n_pos = cos.shape[0]
    if position_ids is None:
        if q.dim() == 3:
            raise ValueError("rope: packed (total_tokens, heads, head_dim) inputs need position_ids (total_tokens,)")
        if q.shape[1] > n_pos:
            raise ValueError(f"rope: cos/sin have {n_pos} positions but seqlen is {q.shape[1]}")
        return cos, sin
    if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point() or position_ids.is_complex():
        raise ValueError("rope: position_ids must be an integer tensor")
    if position_ids.device != q.device:
        raise ValueError(f"rope: position_ids is on {position_ids.device} but q is on {q.device}")
    tokens = tuple(q.shape[:-2])
    allowed = [tokens] if q.dim() == 3 else [tokens, tokens[1:]]
    if tuple(position_ids.shape) not in allowed:
        want = " or ".join(str(s) for s in allowed)
        raise ValueError(f"rope: position_ids must have shape {want}, got {tuple(position_ids.shape)}")
    if position_ids.numel() and checks.value_checks():
        # One reduction (one device sync on GPU) guards every kernel against reading past the tables;
        # not in the hot path, whose positions were checked where they entered (ops/checks.py).
        lo, hi = torch.aminmax(position_ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= n_pos:
            raise ValueError(
                f"rope: position_ids must lie in [0, {n_pos}) (the cos/sin rows), got values in [{lo}, {hi}]"
            )
    return cos, sin


def _unsupported(q, cos) -> dict[str, str]:
    if q.dtype not in contract.KERNEL_DTYPES:
        why = f"the fused kernels take float32/float16/bfloat16, got {q.dtype}"
        return dict.fromkeys(("triton", "cuda", "cpu"), why)
    if cos.shape[1] > contract.TRITON_MAX_HALF:
        return {"triton": f"rotary_dim / 2 = {cos.shape[1]} exceeds one Triton program ({contract.TRITON_MAX_HALF})"}
    return {}


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    position_ids: torch.Tensor | None = None,
    inplace: bool = False,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k; returns (q_out, k_out).

    q: (batch, seqlen, q_heads, head_dim) or packed varlen (total_tokens, q_heads, head_dim);
    k: the same with its own head count (GQA). head_dim must be even.
    cos, sin: (max_seqlen, rotary_dim / 2) from rope_cos_sin(), float32 or q's dtype; rotary_dim may be
      less than head_dim (partial rotary: the remaining features pass through). Full-width HF tables
      (max_seqlen, head_dim) are accepted too.
    position_ids: each token's position (row of cos/sin): (seqlen,) or (batch, seqlen) for 4-D inputs
      (default 0..seqlen-1), required (total_tokens,) for packed inputs.
    interleaved: rotate pairs (x[2i], x[2i+1]) (GPT-J) instead of (x[i], x[i + rotary_dim/2]) (NeoX/Llama).
    inplace: rotate q and k in place (they must be contiguous in their last dim) and return them.
    backend: "triton" | "cuda" | "cpu" | "torch" | None (automatic; see plm_engine.ops.backends).
    Differentiable in q and k; cos/sin and positions get no gradient.
    """
    cos, sin = _check_args(q, k, cos, sin, position_ids, interleaved)
    if inplace and (q.stride(-1) != 1 or k.stride(-1) != 1):
        raise ValueError(
            f"rope: inplace needs q and k contiguous in their last dim, got strides {q.stride()} and {k.stride()}"
        )
    chosen = backends.choose(q.device, "rope", backend, _unsupported(q, cos))
    if chosen == "torch":
        q_out, k_out = rope_ref(q, k, cos, sin, interleaved, position_ids)
        if not inplace:
            return q_out, k_out
        return q.copy_(q_out), k.copy_(k_out)
    if q.numel() == 0 and k.numel() == 0:
        return (q, k) if inplace else (q.clone(), k.clone())
    ops = fused_ops(chosen)
    packed = q.dim() == 3
    # The kernels see (batch, seqlen, heads, head_dim); packed tokens are one batch row.
    q4, k4 = (q.unsqueeze(0), k.unsqueeze(0)) if packed else (q, k)
    positions = None
    if position_ids is not None:
        positions = position_ids.to(torch.int64).expand(q4.shape[:2]).contiguous()  # (batch, seqlen)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if inplace:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            _InplaceRope.apply(q4, k4, cos, sin, positions, interleaved, ops)
        else:
            ops[1](q4, k4, cos, sin, positions, interleaved, False)
        return q, k
    q_out, k_out = ops[0](
        contract.last_dim_contiguous(q4), contract.last_dim_contiguous(k4), cos, sin, positions, interleaved, False
    )
    return (q_out.squeeze(0), k_out.squeeze(0)) if packed else (q_out, k_out)
