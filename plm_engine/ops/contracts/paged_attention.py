"""The paged-attention family's contract: decode attention over a paged KV cache, and the cache write.

Backend ops (csrc/attention.h says the same for C++):
  paged_attn(q, k_cache, v_cache, block_table, cache_seqlens, scale) -> out
      q (batch, seqlen_q, n_heads, head_dim), contiguous in head_dim: the newest seqlen_q tokens of each
      sequence, whose K/V are already in the cache; caches (num_blocks, block_size, n_kv_heads, head_dim)
      contiguous, block_size a power of two up to MAX_BLOCK_SIZE; block_table (batch, max_blocks) int32;
      cache_seqlens (batch,) int32, tokens cached per sequence including the new ones. Causal,
      bottom-right aligned; out like q. Forward only.
  paged_attn_rpb(q, k_cache, v_cache, block_table, cache_seqlens, table, buckets, scale) -> out
      paged_attn with T5's relative position bias (contracts/attention.py: table (num_buckets, n_heads)
      fp32, buckets int32 (2 * max_distance + 1,)); query i of sequence b sits at position
      cache_seqlens[b] - seqlen_q + i. Forward only.
  write_kv_cache(k, v, k_cache!, v_cache!, slot_mapping) -> ()
      k, v (num_tokens, n_kv_heads, head_dim) -> flat slot slot_mapping[t] (block * block_size + offset)
      of the caches, cast to the cache dtype; a negative slot (padding) is skipped.
"""

from __future__ import annotations

import torch

from plm_engine.ops.contracts.attention import CPU_DTYPES, GPU_DTYPES, MAX_HEAD_DIM

__all__ = ["CPU_DTYPES", "FAKES", "GPU_DTYPES", "MAX_BLOCK_SIZE", "MAX_HEAD_DIM", "register_autograd"]

MAX_BLOCK_SIZE = 256


def paged_attn_fake(q, k_cache, v_cache, block_table, cache_seqlens, scale):
    return torch.empty_like(q)


def paged_attn_rpb_fake(q, k_cache, v_cache, block_table, cache_seqlens, table, buckets, scale):
    return torch.empty_like(q)


def write_kv_cache_fake(k, v, k_cache, v_cache, slot_mapping):
    return None


FAKES = {"paged_attn": paged_attn_fake, "paged_attn_rpb": paged_attn_rpb_fake, "write_kv_cache": write_kv_cache_fake}


def register_autograd(prefix: str) -> None:
    """Nothing to wire: decode attention and the cache write are not differentiated."""
