"""Bookkeeping of the paged KV cache's blocks: reference counts, free blocks, and the prefix cache.

The cache tensors themselves (plm_engine.layers.kv_cache.KVCache) are allocated once; this class only
hands out block ids. A sequence's logical block i (tokens i*block_size .. (i+1)*block_size - 1) lives in
physical block `blocks[i]`.

Prefix caching (as vLLM's automatic prefix caching): a full block whose K/V are computed can be
registered under a hash of its tokens chained to its parent block's hash (`hash_block`), so the hash
names the whole prefix up to the block's end. Another sequence starting with the same tokens then
takes a reference to that block instead of computing it again. Blocks are reference-counted; one whose
count drops to zero stays cached (evictable) until the allocator needs it, least recently used first.
A free block with no cached content is always handed out before an evictable one.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from plm_engine.ops import checks


def hash_block(parent: bytes | None, tokens: list[int], extra_keys: tuple = ()) -> bytes:
    """The cache key of a full block: sha256 over its parent's key, its token ids and `extra_keys`
    (anything else its K/V depend on). A cryptographic hash: a collision would silently hand a request
    another prompt's K/V, and prompts may come from untrusted clients."""
    h = hashlib.sha256(parent or b"root")
    h.update(array("q", tokens).tobytes())
    if extra_keys:
        h.update(repr(extra_keys).encode())
    return h.digest()


class BlockManager:
    """num_blocks blocks of block_size tokens: reference counts, a free stack and an LRU of cached ones."""

    def __init__(self, num_blocks: int, block_size: int):
        checks.require_positive("BlockManager", num_blocks=num_blocks, block_size=block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        # Free blocks with nothing cached, a stack: the most recently freed is reused first (likelier
        # to be in a hardware cache).
        self._free = list(range(num_blocks - 1, -1, -1))
        # Free blocks whose content is cached, least recently used first: evicted in this order.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks no sequence references (free or evictable): what allocate() can hand out."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (referenced or evictable)."""
        return len(self._block_of)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """n blocks with a reference count of one; evicts cached blocks (LRU) only when no plain one is free."""
        if n > self.num_free:
            raise RuntimeError(f"BlockManager: asked for {n} blocks, only {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
                self.num_evictions += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def grow(self, blocks: list[int], num_tokens: int) -> bool:
        """Extends `blocks` in place so it holds num_tokens tokens; False (and no change) if too few are free."""
        need = self.blocks_for(num_tokens) - len(blocks)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        blocks.extend(self.allocate(need))
        return True

    def free(self, blocks: list[int]) -> None:
        """Drops one reference to each block and empties the list. A block nobody references becomes
        free, or evictable if it is cached; the last blocks of a sequence are evicted first (a longer
        prefix is less likely to be shared than a shorter one)."""
        for b in reversed(blocks):
            if self._ref[b] <= 0:
                raise RuntimeError(f"BlockManager: block {b} freed twice (or never allocated)")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
        blocks.clear()

    # ---- prefix cache -------------------------------------------------------------------------------

    def lookup(self, block_hash: bytes) -> int | None:
        """The block cached under block_hash, or None."""
        return self._block_of.get(block_hash)

    def is_cached(self, block: int) -> bool:
        return block in self._hash_of

    def acquire(self, blocks: list[int]) -> None:
        """Takes a reference to each cached block (from lookup); an evictable one is no longer free."""
        for b in blocks:
            if b not in self._hash_of:
                raise RuntimeError(f"BlockManager: block {b} is not cached; only cached blocks can be shared")
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1

    def register(self, block: int, block_hash: bytes) -> bool:
        """Caches a referenced block under block_hash; False when another block already holds that
        content (this one then stays private and is freed as a plain block)."""
        if self._ref[block] <= 0:
            raise RuntimeError(f"BlockManager: block {block} is not allocated; only a used block can be cached")
        if block in self._hash_of:
            return self._hash_of[block] == block_hash
        if block_hash in self._block_of:
            return False
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block
        return True

    def uncache(self, block: int) -> None:
        """Forgets a block's cached content (e.g. it was registered but never computed)."""
        h = self._hash_of.pop(block, None)
        if h is None:
            return
        del self._block_of[h]
        if self._ref[block] == 0:
            del self._evictable[block]
            self._free.append(block)

    def reset_prefix_cache(self) -> int:
        """Forgets every cached block nobody references; returns how many."""
        n = len(self._evictable)
        for b in list(self._evictable):
            self.uncache(b)
        return n

    def check(self) -> None:
        """Raises if the bookkeeping is inconsistent: every block is referenced, free or evictable (one of
        them), and the hash maps agree. For tests and debugging (O(num_blocks))."""
        free, evictable = set(self._free), set(self._evictable)
        if len(free) != len(self._free):
            raise AssertionError("BlockManager: a block is on the free stack twice")
        if free & evictable:
            raise AssertionError(f"BlockManager: blocks both free and evictable: {sorted(free & evictable)}")
        for b in range(self.num_blocks):
            r = self._ref[b]
            if r < 0 or (r == 0) != (b in free or b in evictable):
                raise AssertionError(f"BlockManager: block {b} has {r} references but free={b in free}")
            if b in evictable and b not in self._hash_of:
                raise AssertionError(f"BlockManager: evictable block {b} holds no cached content")
            if b in free and b in self._hash_of:
                raise AssertionError(f"BlockManager: free block {b} is still cached")
        if len(self._hash_of) != len(self._block_of) or any(self._block_of[h] != b for b, h in self._hash_of.items()):
            raise AssertionError("BlockManager: the block -> hash and hash -> block maps disagree")
