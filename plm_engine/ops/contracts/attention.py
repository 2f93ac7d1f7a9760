"""The attention family's contract: dense and variable-length (packed) flash attention.

Layouts (FlashAttention's): dense q (batch, seqlen_q, n_heads, head_dim), k/v (batch, seqlen_k,
n_kv_heads, head_dim); varlen q (total_q, n_heads, head_dim), k/v (total_k, n_kv_heads, head_dim) with
int32 cu_seqlens offsets. GQA/MQA: query head h reads kv head h // (n_heads // n_kv_heads). Causal masks
are aligned bottom-right (key j is visible to query i iff j <= i + seqlen_k - seqlen_q). head_dim is a
multiple of 8 up to MAX_HEAD_DIM; q, k, v are contiguous in head_dim.

Backend ops (csrc/attention.h says the same for C++):
  attn_fwd(q, k, v, causal, scale) -> (out, lse)                         lse (batch, n_heads, seqlen_q) fp32
  attn_bwd(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)
  attn_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) -> (out, lse)   lse (n_heads, total_q)
  attn_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale) -> (dq, dk, dv)
With T5's relative position bias added to the scaled scores inside the kernels (plm_engine/ops/
position_bias.py), separate ops, so that the plain ones stay exactly as they are:
  attn_rpb_fwd(q, k, v, table, buckets, causal, scale) -> (out, lse)
  attn_rpb_bwd(dout, q, k, v, out, lse, table, buckets, causal, scale) -> (dq, dk, dv, dtable)
  attn_varlen_rpb_fwd(q, k, v, table, buckets, cu_q, cu_k, max_q, max_k, causal, scale) -> (out, lse)
  attn_varlen_rpb_bwd(dout, q, k, v, out, lse, table, buckets, cu_q, cu_k, max_q, max_k, causal, scale)
      -> (dq, dk, dv, dtable)
  table (num_buckets, n_heads) fp32 contiguous, dtable like it; buckets int32 (2 * max_distance + 1,): the
  bucket of relative position r = key - query position at index r + max_distance, r clamped to
  [-max_distance, max_distance]. Positions bottom-right aligned: query i sits at i + seqlen_k - seqlen_q.
"""

from __future__ import annotations

import torch

from plm_engine.ops.contracts import op, qualname

MAX_HEAD_DIM = 256
GPU_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def attn_fwd_fake(q, k, v, causal, scale):
    b, sq, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, sq), dtype=torch.float32)


def attn_bwd_fake(dout, q, k, v, out, lse, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def attn_varlen_fwd_fake(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def attn_varlen_bwd_fake(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def attn_rpb_fwd_fake(q, k, v, table, buckets, causal, scale):
    return attn_fwd_fake(q, k, v, causal, scale)


def attn_rpb_bwd_fake(dout, q, k, v, out, lse, table, buckets, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(table)


def attn_varlen_rpb_fwd_fake(q, k, v, table, buckets, cu_q, cu_k, max_q, max_k, causal, scale):
    return attn_varlen_fwd_fake(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)


def attn_varlen_rpb_bwd_fake(dout, q, k, v, out, lse, table, buckets, cu_q, cu_k, max_q, max_k, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(table)


FAKES = {
    "attn_fwd": attn_fwd_fake,
    "attn_bwd": attn_bwd_fake,
    "attn_varlen_fwd": attn_varlen_fwd_fake,
    "attn_varlen_bwd": attn_varlen_bwd_fake,
    "attn_rpb_fwd": attn_rpb_fwd_fake,
    "attn_rpb_bwd": attn_rpb_bwd_fake,
    "attn_varlen_rpb_fwd": attn_varlen_rpb_fwd_fake,
    "attn_varlen_rpb_bwd": attn_varlen_rpb_bwd_fake,
}


def register_autograd(prefix: str) -> None:
    """<prefix>attn[_varlen]_bwd (flash-attention backward from the saved out and lse) as the backward of
    <prefix>attn[_varlen]_fwd."""
    for fwd, bwd in (("attn_fwd", "attn_bwd"), ("attn_varlen_fwd", "attn_varlen_bwd")):
        torch.library.register_autograd(qualname(prefix, fwd), _backward(op(prefix, bwd)), setup_context=_setup)
    # The bias ops: the same with (table, buckets) after q, k, v, and a gradient for the table.
    for fwd, bwd in (("attn_rpb_fwd", "attn_rpb_bwd"), ("attn_varlen_rpb_fwd", "attn_varlen_rpb_bwd")):
        torch.library.register_autograd(qualname(prefix, fwd), _backward_rpb(op(prefix, bwd)), setup_context=_setup_rpb)


def _setup(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    ctx.meta = inputs[3:]  # causal, scale (dense); cu_q, cu_k, max_q, max_k, causal, scale (varlen)
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(bwd_op):
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd_op(dout.contiguous(), q, k, v, out, lse, *ctx.meta)
        return (dq, dk, dv) + (None,) * len(ctx.meta)

    return backward


def _setup_rpb(ctx, inputs, output):
    q, k, v, table, buckets = inputs[:5]
    out, lse = output
    ctx.meta = inputs[5:]
    ctx.save_for_backward(q, k, v, out, lse, table, buckets)


def _backward_rpb(bwd_op):
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, table, buckets = ctx.saved_tensors
        dq, dk, dv, dtable = bwd_op(dout.contiguous(), q, k, v, out, lse, table, buckets, *ctx.meta)
        return (dq, dk, dv, dtable, None) + (None,) * len(ctx.meta)

    return backward
