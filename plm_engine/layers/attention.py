"""Multi-head self-attention (MHA / GQA / MQA) over the fused attention ops.

Tokens come either dense, x: (batch, seqlen, dim), or packed, x: (total_tokens, dim) with cu_seqlens
marking the sequences (padding is removed before the model runs, never masked). With a paged KV cache
the new keys/values are written to the cache and the queries attend through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plm_engine import ops
from plm_engine.layers.kv_cache import KVCache, PagedBatch
from plm_engine.layers.linear import Linear


@dataclass
class AttentionContext:
    """How one forward's tokens are laid out, shared by every layer.

    causal: decoder (bottom-right causal mask) or encoder (bidirectional).
    cu_seqlens / max_seqlen: packed tokens, (batch + 1,) int32 offsets; None for dense (batch, seqlen).
    positions: each token's position for RoPE: (seqlen,) or (batch, seqlen) dense, (total,) packed.
    cos, sin: RoPE tables indexed by position (None for models without RoPE).
    kv_cache, paged: the paged cache and this forward's mapping onto it (generation only).
    position_bias: T5's relative position bias, added to every self-attention score (None: none).
    cross: the encoder's keys/values for the decoder's cross-attention (encoder-decoder models only).
    """

    causal: bool
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    positions: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    kv_cache: KVCache | None = None
    paged: PagedBatch | None = None
    position_bias: ops.RelativePositionBias | None = None
    cross: CrossKV | None = None

    @classmethod
    def paged_step(cls, batch: PagedBatch, positions: torch.Tensor, kv_cache: KVCache, **extra) -> AttentionContext:
        """A generation step's context: causal over the packed new tokens of `batch`, their K/V going
        into kv_cache; extra: the model's own fields (position_bias, cross)."""
        return cls(
            causal=True,
            cu_seqlens=batch.cu_seqlens,
            max_seqlen=batch.max_seqlen,
            positions=positions,
            kv_cache=kv_cache,
            paged=batch,
            **extra,
        )


@dataclass
class CrossKV:
    """The encoder side of cross-attention, packed (total_src, ...) with cu_seqlens (batch + 1,) int32 in
    the order of the decoder's sequences. Either the encoder's output `memory` (total_src, dim), which each
    decoder layer projects to its keys/values inside its own forward (training: FSDP gathers a layer's
    weights only there), or those keys/values precomputed per decoder layer, k[layer] / v[layer]
    (total_src, n_heads, head_dim) (generation: once per request, never written to the paged cache)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    memory: torch.Tensor | None = None
    k: list[torch.Tensor] | None = None
    v: list[torch.Tensor] | None = None


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        out_bias: bool,
        rotary: bool,
        softmax_scale: float | None = None,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rotary = rotary
        self.softmax_scale = softmax_scale  # None: head_dim ** -0.5 (T5: 1.0, its init absorbs the scale)
        # One projection for q, k and v: one matmul, and q/k/v are read by the kernels as strided views.
        self.qkv = Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.out = Linear(n_heads * head_dim, dim, bias=out_bias)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, layer: int) -> torch.Tensor:
        lead = x.shape[:-1]  # (batch, seqlen) dense or (total,) packed
        h, kvh, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([h * d, kvh * d, kvh * d], dim=-1)
        q, k, v = q.view(*lead, h, d), k.view(*lead, kvh, d), v.view(*lead, kvh, d)
        if self.rotary:
            # In place when no graph is recorded (inference): q and k are fresh views of the qkv output.
            q, k = ops.rope(q, k, ctx.cos, ctx.sin, position_ids=ctx.positions, inplace=not torch.is_grad_enabled())
        kw = self._score_kwargs(ctx)
        if ctx.paged is not None:
            o = self._paged(q, k, v, ctx, layer, kw)
        elif ctx.cu_seqlens is not None:
            o = ops.attention_varlen(
                q, k, v, ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen, causal=ctx.causal, **kw
            )
        else:
            o = ops.attention(q, k, v, causal=ctx.causal, **kw)
        return self.out(o.reshape(*lead, h * d))

    def _score_kwargs(self, ctx: AttentionContext) -> dict:
        return {"softmax_scale": self.softmax_scale, "position_bias": ctx.position_bias}

    def _paged(self, q, k, v, ctx: AttentionContext, layer: int, kw: dict) -> torch.Tensor:
        """q, k, v: (total, heads, head_dim) packed new tokens; writes k/v to the cache, then attends."""
        cache, pb = ctx.kv_cache, ctx.paged
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        ops.write_kv_cache(k, v, k_cache, v_cache, pb.slot_mapping)
        if pb.is_decode:  # one new token per sequence: (batch, 1, heads, head_dim)
            return ops.paged_attention(
                q.unsqueeze(1), k_cache, v_cache, pb.block_table, pb.cache_seqlens, **kw
            ).squeeze(1)
        if not pb.has_prefix:  # whole prompts: the new tokens only see each other
            return ops.attention_varlen(
                q, k, v, pb.cu_seqlens, pb.cu_seqlens, pb.max_seqlen, pb.max_seqlen, causal=True, **kw
            )
        # Some sequences continue a cached prefix (chunked prefill, recompute): each attends through the
        # cache; paged_attention is bottom-right causal, so the chunk sees the prefix and itself.
        out = torch.empty_like(q)
        if pb.seq_bounds is None:
            raise ValueError("a paged forward with has_prefix needs PagedBatch.seq_bounds (cu_seqlens as host ints)")
        cu = pb.seq_bounds
        for i in range(len(cu) - 1):
            s, e = cu[i], cu[i + 1]
            if e > s:
                out[s:e] = ops.paged_attention(
                    q[s:e].unsqueeze(0),
                    k_cache,
                    v_cache,
                    pb.block_table[i : i + 1],
                    pb.cache_seqlens[i : i + 1],
                    **kw,
                ).squeeze(0)
        return out


class CrossAttention(nn.Module):
    """The decoder's attention over the encoder's output: packed queries (total_tgt, dim) against the
    CrossKV of their sources (attention_varlen with different query and key lengths, no mask)."""

    def __init__(self, dim: int, n_heads: int, head_dim: int, bias: bool, softmax_scale: float | None = None):
        super().__init__()
        self.n_heads, self.head_dim, self.softmax_scale = n_heads, head_dim, softmax_scale
        self.q = Linear(dim, n_heads * head_dim, bias=bias)
        self.kv = Linear(dim, 2 * n_heads * head_dim, bias=bias)  # k and v of the source in one matmul
        self.out = Linear(n_heads * head_dim, dim, bias=bias)

    def project_kv(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (total_src, dim) -> k, v (total_src, n_heads, head_dim), views of one projection."""
        k, v = self.kv(src).view(src.shape[0], 2, self.n_heads, self.head_dim).unbind(1)
        return k, v

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, cross: CrossKV, layer: int):
        """x: (total_tgt, dim) packed decoder tokens, sequence i at cu_seqlens[i]:cu_seqlens[i+1]."""
        q = self.q(x).view(x.shape[0], self.n_heads, self.head_dim)
        k, v = self.project_kv(cross.memory) if cross.k is None else (cross.k[layer], cross.v[layer])
        o = ops.attention_varlen(
            q,
            k,
            v,
            cu_seqlens,
            cross.cu_seqlens,
            max_seqlen,
            cross.max_seqlen,
            causal=False,
            softmax_scale=self.softmax_scale,
        )
        return self.out(o.reshape(x.shape[0], -1))
