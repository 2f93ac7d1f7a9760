"""Attention: dense and variable-length (packed) flash attention, and decode over a paged KV cache.

Layouts (FlashAttention's):
  attention         q (batch, seqlen_q, n_heads, head_dim), k/v (batch, seqlen_k, n_kv_heads, head_dim)
  attention_varlen  q (total_q, n_heads, head_dim), k/v (total_k, n_kv_heads, head_dim) + cu_seqlens
  paged_attention   q (batch, seqlen_q, n_heads, head_dim) over k/v caches
                    (num_blocks, block_size, n_kv_heads, head_dim) addressed by a block table
GQA/MQA: query head h reads kv head h // (n_heads // n_kv_heads); K/V are never repeated in memory.
Causal masks are aligned bottom-right (key j is visible to query i iff j <= i + seqlen_k - seqlen_q).

Backend ops: attn_fwd / attn_bwd / attn_varlen_fwd / attn_varlen_bwd (plm_engine/ops/contracts/attention.py)
and paged_attn / write_kv_cache (contracts/paged_attention.py). Triton registers them as
plm_engine::triton_<name> (plm_engine/ops/triton/attention.py and paged_attention.py); _C as
plm_engine::<name>: the attention ops and their backward on CPU, paged_attn and write_kv_cache on CPU and
CUDA. This module validates the arguments (once, for every backend) and picks the backend.

T5's relative position bias (position_bias=RelativePositionBias(...), plm_engine/ops/position_bias.py) goes
to separate backend ops, so the plain ones stay exactly as they are: attn_rpb_fwd / attn_varlen_rpb_fwd
(contracts/attention.py) and paged_attn_rpb (contracts/paged_attention.py).
"""

from __future__ import annotations

import torch

from plm_engine.ops import backends, checks
from plm_engine.ops.contracts import attention as contract
from plm_engine.ops.contracts import paged_attention as paged
from plm_engine.ops.position_bias import RelativePositionBias, check_position_bias, relative_position_bucket
from plm_engine.ops.reference import (
    attention_ref,
    attention_varlen_ref,
    paged_attention_ref,
    write_kv_cache_ref,
)

backends.register_family(
    contract, ("attn_fwd", "attn_varlen_fwd", "attn_rpb_fwd", "attn_varlen_rpb_fwd"), "plm_engine.ops.triton.attention"
)
backends.register_family(
    paged, ("paged_attn", "paged_attn_rpb", "write_kv_cache"), "plm_engine.ops.triton.paged_attention"
)

__all__ = [
    "RelativePositionBias",
    "attention",
    "attention_varlen",
    "paged_attention",
    "relative_position_bucket",
    "write_kv_cache",
]


def backend_op(name: str, backend: str):
    """The op `name` of a fused backend: plm_engine::triton_<name> or the _C op plm_engine::<name>."""
    return backends.family_ops(name, backend, (name,))[0]


# ---- validation ---------------------------------------------------------------------------------


def _check_qkv(fn, q, k, v, n_lead):
    """Shared checks of q, k, v with n_lead leading dims before (heads, head_dim)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor")
        if t.dim() != n_lead + 2:
            raise ValueError(f"{fn}: {name} must have {n_lead + 2} dims, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{fn}: {name} must be floating point, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"{fn}: {name} is {t.dtype} but q is {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    _check_heads(fn, q.shape[-2], q.shape[-1], k.shape[-2], k.shape[-1])


def _check_heads(fn, h, d, hkv, d_k):
    """Head counts and head_dim of q (h, d) against k / the cache (hkv, d_k)."""
    if d_k != d:
        raise ValueError(f"{fn}: q head_dim {d} != k head_dim {d_k}")
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"{fn}: n_heads ({h}) must be a multiple of n_kv_heads ({hkv})")
    if d % 8 != 0 or not 8 <= d <= contract.MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head_dim must be a multiple of 8 in [8, {contract.MAX_HEAD_DIM}], got {d}")


def _check_cu_seqlens(fn, name, cu, total):
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(
            f"{fn}: {name} must be a 1-d int32 tensor of batch + 1 offsets, got "
            f"{getattr(cu, 'dtype', type(cu))} {tuple(getattr(cu, 'shape', ()))}"
        )
    if checks.value_checks():
        c = cu.tolist()
        if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
            raise ValueError(
                f"{fn}: {name} must start at 0, never decrease, and end at {total} "
                f"(the packed length); got {c if len(c) <= 16 else c[:8] + ['...'] + c[-8:]}"
            )
        return max((b - a for a, b in zip(c, c[1:])), default=0)
    return None


def _scale(softmax_scale, d):
    if softmax_scale is None:
        return d**-0.5
    s = float(softmax_scale)
    if not s > 0 or s == float("inf"):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return s


def _unsupported(q: torch.Tensor, head_dim_limit_triton: int = 256, triton_fp32: bool = False) -> dict[str, str]:
    """triton_fp32: the op's Triton kernels take float32 on the GPU too (the paged ones: an fp32 model's
    decode step must not fall back to the reference, whose data-dependent indexing no CUDA graph captures)."""
    out = {}
    if q.dtype not in contract.CPU_DTYPES:
        why = f"the fused kernels take float16/bfloat16 (float32 on the CPU), got {q.dtype}"
        return dict.fromkeys(("triton", "cuda", "cpu"), why)
    if q.device.type == "cuda" and q.dtype not in contract.GPU_DTYPES:
        out["cuda"] = f"the CUDA C++ kernels take float16/bfloat16, got {q.dtype}"
        if not triton_fp32:
            out["triton"] = f"the GPU kernels take float16/bfloat16, got {q.dtype}"
    if q.shape[-1] > head_dim_limit_triton:
        out["triton"] = f"head_dim {q.shape[-1]} > {head_dim_limit_triton}"
    return out


# Per flash-attention function: its backend op without and with a position bias, its reference, and the
# kind of attention (for the reason no CUDA C++ kernel runs it).
_FLASH_OPS = {
    "attention": ("attn_fwd", "attn_rpb_fwd", attention_ref, "dense"),
    "attention_varlen": ("attn_varlen_fwd", "attn_varlen_rpb_fwd", attention_varlen_ref, "varlen"),
}


def _flash_forward(fn, q, k, v, seq_args, causal, softmax_scale, position_bias, backend, empty):
    """The dispatch attention and attention_varlen share -> (out, fp32 lse). The backend op takes
    (q, k, v, [table, buckets], *seq_args, causal, scale); the reference, which runs where no kernel
    applies (the torch backend, or `empty` inputs), (q, k, v, *seq_args, causal, scale, return_lse,
    position_bias)."""
    op, op_rpb, ref, kind = _FLASH_OPS[fn]
    scale = _scale(softmax_scale, q.shape[-1])
    unsupported = _unsupported(q)
    unsupported.setdefault("cuda", f"no CUDA C++ kernel for {kind} attention (use triton)")
    bias = ()
    if position_bias is not None:
        op, bias = op_rpb, check_position_bias(fn, position_bias, q.shape[-2], q.device)
    chosen = backends.choose(q.device, op, backend, unsupported)
    if chosen == "torch" or empty:
        out, lse = ref(q, k, v, *seq_args, causal, scale, True, position_bias)
        return out, lse.float()
    return backend_op(op, chosen)(q, k, v, *bias, *seq_args, bool(causal), scale)


# ---- public functions -----------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    *,
    position_bias: RelativePositionBias | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Flash attention. q: (batch, seqlen_q, n_heads, head_dim); k, v: (batch, seqlen_k, n_kv_heads,
    head_dim). Returns out (like q), and with return_lse also lse (batch, n_heads, seqlen_q) fp32.

    softmax_scale defaults to head_dim ** -0.5. Differentiable in q, k, v. A query whose keys are all
    masked (causal with seqlen_q > seqlen_k) gets zeros and lse = -inf.
    position_bias: a RelativePositionBias (T5) added to the scaled scores inside the kernels, before
    the causal mask; differentiable in its table too.
    backend: "triton" | "cuda" | "cpu" | "torch" | None (automatic; see plm_engine.ops.backends).
    """
    _check_qkv("attention", q, k, v, n_lead=2)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"attention: batch of k ({k.shape[0]}) != batch of q ({q.shape[0]})")
    empty = q.numel() == 0 or k.shape[1] == 0
    out, lse = _flash_forward("attention", q, k, v, (), causal, softmax_scale, position_bias, backend, empty)
    return (out, lse) if return_lse else out


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    *,
    position_bias: RelativePositionBias | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Flash attention over packed variable-length sequences, with no padding.

    q: (total_q, n_heads, head_dim); k, v: (total_k, n_kv_heads, head_dim); cu_seqlens_q/_k: int32
    (batch + 1,) offsets of each sequence (0, len0, len0 + len1, ...); max_seqlen_q/_k: the longest
    sequence (computed from cu_seqlens when omitted, which reads them on the host). Returns out (like q)
    and with return_lse also lse (n_heads, total_q) fp32. position_bias: as attention's, positions
    counted within each sequence.
    """
    _check_qkv("attention_varlen", q, k, v, n_lead=1)
    mq = _check_cu_seqlens("attention_varlen", "cu_seqlens_q", cu_seqlens_q, q.shape[0])
    mk = _check_cu_seqlens("attention_varlen", "cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"attention_varlen: cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k "
            f"has {cu_seqlens_k.numel()}: both must describe the same batch"
        )
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t.device != q.device:
            raise ValueError(f"attention_varlen: {name} is on {t.device} but q is on {q.device}")
    max_seqlen_q = int(max_seqlen_q) if max_seqlen_q is not None else mq
    max_seqlen_k = int(max_seqlen_k) if max_seqlen_k is not None else mk
    if max_seqlen_q is None or max_seqlen_k is None:
        raise ValueError("attention_varlen: pass max_seqlen_q and max_seqlen_k during CUDA-graph capture")
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError(f"attention_varlen: max_seqlen_q/k must be >= 0, got {max_seqlen_q}, {max_seqlen_k}")
    if mq is not None and (max_seqlen_q < mq or max_seqlen_k < mk):
        raise ValueError(
            f"attention_varlen: max_seqlen_q/k ({max_seqlen_q}, {max_seqlen_k}) are smaller than "
            f"the longest sequences ({mq}, {mk})"
        )
    seq_args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out, lse = _flash_forward(
        "attention_varlen", q, k, v, seq_args, causal, softmax_scale, position_bias, backend, q.numel() == 0
    )
    return (out, lse) if return_lse else out


def _check_paged(fn, k_cache, v_cache, block_table, q_like):
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{fn}: {name} must be (num_blocks, block_size, n_kv_heads, head_dim), got "
                f"{tuple(getattr(t, 'shape', ()))}"
            )
        if t.device != q_like.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but the inputs are on {q_like.device}")
        if not t.is_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"{fn}: k_cache {k_cache.dtype} {tuple(k_cache.shape)} and v_cache {v_cache.dtype} "
            f"{tuple(v_cache.shape)} must match"
        )
    bs = k_cache.shape[1]
    if bs < 1 or bs & (bs - 1) or bs > paged.MAX_BLOCK_SIZE:
        raise ValueError(f"{fn}: block_size must be a power of two up to {paged.MAX_BLOCK_SIZE}, got {bs}")
    if block_table is not None:
        checks.require_tensor(
            fn,
            "block_table",
            block_table,
            lambda t: t.dtype == torch.int32 and t.dim() == 2,
            "(batch, max_blocks) int32",
        )
        checks.require_same_device(fn, "block_table", block_table, "q", q_like)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    position_bias: RelativePositionBias | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of the newest tokens of each sequence over a paged KV cache (decode and chunked prefill).

    q: (batch, seqlen_q, n_heads, head_dim) — the last seqlen_q tokens of each sequence, whose K/V are
    already written (write_kv_cache); k_cache, v_cache: (num_blocks, block_size, n_kv_heads, head_dim),
    block_size a power of two <= 256; block_table: (batch, max_blocks) int32, logical -> physical block;
    cache_seqlens: (batch,) int32, tokens cached per sequence including the new ones (>= seqlen_q).
    Causal, bottom-right aligned. Returns (batch, seqlen_q, n_heads, head_dim) like q. Forward only.
    position_bias: a RelativePositionBias (T5 decoder self-attention), query i of sequence b at position
    cache_seqlens[b] - seqlen_q + i, key j at j.
    """
    fn = "paged_attention"
    _check_paged(fn, k_cache, v_cache, block_table, q)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{fn}: q must be (batch, seqlen_q, n_heads, head_dim), got {tuple(getattr(q, 'shape', ()))}")
    if k_cache.dtype != q.dtype:
        raise ValueError(f"{fn}: k_cache is {k_cache.dtype} but q is {q.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"{fn}: q must be floating point, got {q.dtype}")
    _check_heads(fn, q.shape[-2], q.shape[-1], k_cache.shape[-2], k_cache.shape[-1])
    b = q.shape[0]
    if block_table.shape[0] != b:
        raise ValueError(f"{fn}: block_table has {block_table.shape[0]} rows for a batch of {b}")
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (b,) or cache_seqlens.device != q.device:
        raise ValueError(
            f"{fn}: cache_seqlens must be int32 ({b},) on {q.device}, got {cache_seqlens.dtype} "
            f"{tuple(cache_seqlens.shape)} on {cache_seqlens.device}"
        )
    if b > 0 and checks.value_checks():
        lens = cache_seqlens.tolist()
        bs, nb, cap = k_cache.shape[1], k_cache.shape[0], block_table.shape[1] * k_cache.shape[1]
        if min(lens) < q.shape[1] or max(lens) > cap:
            raise ValueError(
                f"{fn}: cache_seqlens must lie in [seqlen_q={q.shape[1]}, max_blocks * block_size="
                f"{cap}], got min {min(lens)} max {max(lens)}"
            )
        used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * bs < cache_seqlens[:, None]
        ids = block_table[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= nb):
            raise ValueError(
                f"{fn}: block_table holds block ids outside [0, {nb}) in the used blocks "
                f"(min {int(ids.min())}, max {int(ids.max())})"
            )
    scale = _scale(softmax_scale, q.shape[-1])
    if position_bias is not None:
        table, buckets = check_position_bias(fn, position_bias, q.shape[-2], q.device)
        chosen = backends.choose(q.device, "paged_attn_rpb", backend, _unsupported(q, triton_fp32=True))
        if chosen == "torch" or q.numel() == 0:
            return paged_attention_ref(q, k_cache, v_cache, block_table, cache_seqlens, scale, position_bias)
        return backend_op("paged_attn_rpb", chosen)(
            q, k_cache, v_cache, block_table, cache_seqlens, table.detach(), buckets, scale
        )
    chosen = backends.choose(q.device, "paged_attn", backend, _unsupported(q, triton_fp32=True))
    if chosen == "torch" or q.numel() == 0:
        return paged_attention_ref(q, k_cache, v_cache, block_table, cache_seqlens, scale)
    return backend_op("paged_attn", chosen)(q, k_cache, v_cache, block_table, cache_seqlens, scale)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Stores new keys/values into the paged caches, in place.

    k, v: (num_tokens, n_kv_heads, head_dim); slot_mapping: (num_tokens,) int32/int64, token t goes to
    flat slot block * block_size + offset; a negative slot (padding) is skipped. k/v are cast to the
    cache dtype.
    """
    fn = "write_kv_cache"
    _check_paged(fn, k_cache, v_cache, None, k)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape[1:]) != tuple(k_cache.shape[2:]):
            raise ValueError(
                f"{fn}: {name} must be (num_tokens, {k_cache.shape[2]}, {k_cache.shape[3]}) to match "
                f"the cache, got {tuple(getattr(t, 'shape', ()))}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{fn}: {name} must be floating point, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if (
        slot_mapping.dtype not in (torch.int32, torch.int64)
        or slot_mapping.shape != (k.shape[0],)
        or slot_mapping.device != k.device
    ):
        raise ValueError(
            f"{fn}: slot_mapping must be int32/int64 ({k.shape[0]},) on {k.device}, got "
            f"{slot_mapping.dtype} {tuple(slot_mapping.shape)} on {slot_mapping.device}"
        )
    n_slots = k_cache.shape[0] * k_cache.shape[1]
    if slot_mapping.numel() and checks.value_checks() and int(slot_mapping.max()) >= n_slots:
        raise ValueError(f"{fn}: slot {int(slot_mapping.max())} is out of range for a cache of {n_slots} slots")
    chosen = backends.choose(k.device, "write_kv_cache", backend, _unsupported(k_cache[:, 0], triton_fp32=True))
    if chosen == "torch" or k.shape[0] == 0:
        write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)
        return
    backend_op("write_kv_cache", chosen)(k, v, k_cache, v_cache, slot_mapping)
