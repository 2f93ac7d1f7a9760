"""The paged KV cache as the model sees it: the cache tensors, and how one forward's tokens map onto them.

The generator (plm_engine.generation) owns the block bookkeeping; it hands the model a KVCache and, for
each forward, a PagedBatch. The model writes the new tokens' keys/values (ops.write_kv_cache) and
attends over the cache (ops.paged_attention) or over the new tokens alone (ops.attention_varlen).
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zero-filled cache tensor. On the CPU it lies in fresh anonymous pages from the OS: they read as
    zeros and become resident only when written, so a cache sized for many long sequences takes memory
    in proportion to the tokens it holds (torch.zeros would touch every page at start)."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    # Private: a read of a page never written maps the kernel's shared zero page, resident nowhere.
    pages = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # The tensor keeps a reference to the mapping, which is unmapped with the last tensor using it.
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)


@dataclass
class KVCache:
    """Per-layer key and value caches, each (num_blocks, block_size, n_kv_heads, head_dim)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(
        cls,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device=None,
    ) -> KVCache:
        if num_blocks < 1 or block_size < 1 or block_size & (block_size - 1) or block_size > 256:
            raise ValueError(
                f"KVCache: need num_blocks >= 1 and block_size a power of two <= 256, got "
                f"{num_blocks} blocks of {block_size}"
            )
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        k = [_zeros(shape, dtype, device) for _ in range(n_layers)]
        v = [_zeros(shape, dtype, device) for _ in range(n_layers)]
        return cls(k, v)

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class PagedBatch:
    """How the packed new tokens of one forward map onto sequences and cache slots.

    The forward's tokens are packed: sequence i owns tokens cu_seqlens[i]:cu_seqlens[i+1].
    cu_seqlens: (batch + 1,) int32 offsets of each sequence's new tokens.
    max_seqlen: the most new tokens of any sequence (a host int, so no sync is needed).
    slot_mapping: (total_tokens,) int64 cache slot (block * block_size + offset) of each new token.
    block_table: (batch, max_blocks) int32 logical -> physical block of each sequence.
    cache_seqlens: (batch,) int32 tokens cached per sequence once the new ones are written.
    is_decode: every sequence has exactly one new token (attention over the cache, batched).
    has_prefix: some sequence already had tokens cached before this forward (a chunked prefill or a
      recompute after preemption): its new tokens must attend over the cache, not only each other.
    seq_bounds: with has_prefix, cu_seqlens as host ints (the engine builds both from the same list), so
      attending sequence by sequence reads no device value (the hot-path rule, ops/checks.py).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    is_decode: bool
    has_prefix: bool
    seq_bounds: tuple[int, ...] | None = None

    @property
    def batch_size(self) -> int:
        return self.cache_seqlens.shape[0]
