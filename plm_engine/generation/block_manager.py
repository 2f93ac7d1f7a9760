"""Bookkeeping of the paged KV cache's blocks: which are free, which sequence owns which.

The cache tensors themselves (plm_engine.layers.kv_cache.KVCache) are allocated once; this class only
hands out block ids. A sequence's logical block i (tokens i*block_size .. (i+1)*block_size - 1) lives in
physical block `blocks[i]`.
"""

from __future__ import annotations


class BlockManager:
    """A free list of num_blocks block ids of block_size tokens each."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"BlockManager: num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"BlockManager: block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: the most recently freed block is reused first (it is likelier to be in cache).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._owned = [False] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"BlockManager: asked for {n} blocks, only {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._owned[b] = True
        return out

    def grow(self, blocks: list[int], num_tokens: int) -> bool:
        """Extends `blocks` in place so it holds num_tokens tokens; False (and no change) if too few are free."""
        need = self.blocks_for(num_tokens) - len(blocks)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        blocks.extend(self.allocate(need))
        return True

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if not self._owned[b]:
                raise RuntimeError(f"BlockManager: block {b} freed twice (or never allocated)")
            self._owned[b] = False
            self._free.append(b)
        blocks.clear()
