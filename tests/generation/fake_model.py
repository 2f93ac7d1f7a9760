"""A model stand-in that checks the paged cache bookkeeping instead of computing attention.

It writes each new token's id into the cache at its slot, and its "next token" for a position is a hash
of the token ids it reads back through the block table for positions 0..p. So a sequence continues the
way `next_token(prefix)` says only if every slot mapping, block table and cache length the engine handed
it was right, across chunked prefills, preemptions and recomputes.
"""

from __future__ import annotations

import torch
from torch import nn

from plm_engine.layers.kv_cache import KVCache
from plm_engine.models.config import ModelConfig


def next_token(tokens: list[int], vocab: int) -> int:
    h = 0
    for i, t in enumerate(tokens):
        h = (h * 31 + (i + 1) * (t + 7)) % 1_000_003
    return h % vocab


class FakeModel(nn.Module):
    def __init__(self, vocab_size: int = 64, max_positions: int = 4096, eos_token_id: int | None = 0):
        super().__init__()
        self.config = ModelConfig.preset(
            "llama-tiny", vocab_size=vocab_size, max_position_embeddings=max_positions, eos_token_id=eos_token_id
        )
        self.dummy = nn.Parameter(torch.zeros(1))
        self.forwards = []  # (num_tokens, is_decode, has_prefix) per call

    def allocate_kv_cache(self, num_blocks, block_size=16, dtype=None, device=None) -> KVCache:
        # Token ids are stored as float32: exact below 2**24. The cache is poisoned so stale reads show.
        cache = KVCache.allocate(1, num_blocks, block_size, 1, 8, torch.float32, device)
        cache.k[0].fill_(-1)
        return cache

    def forward_tokens(self, input_ids, positions, kv_cache, batch, logits_index=None):
        assert input_ids.dtype == torch.int64 and positions.dtype == torch.int64
        assert batch.cu_seqlens.dtype == torch.int32 and batch.block_table.dtype == torch.int32
        flat = kv_cache.k[0].view(-1, 8)
        bs = kv_cache.block_size
        self.forwards.append((input_ids.numel(), batch.is_decode, batch.has_prefix))
        cu = batch.cu_seqlens.tolist()
        lens = batch.cache_seqlens.tolist()
        pos = positions.tolist()
        for i in range(len(cu) - 1):
            a, b = cu[i], cu[i + 1]
            # new tokens sit at the end of the cached sequence, in order
            assert pos[a:b] == list(range(lens[i] - (b - a), lens[i])), (pos[a:b], lens[i])
            if batch.is_decode:
                assert b - a == 1
        slots = batch.slot_mapping
        keep = slots >= 0
        assert len(set(slots[keep].tolist())) == int(keep.sum()), "two new tokens share a cache slot"
        flat[slots[keep], 0] = input_ids[keep].float()
        flat[slots[keep], 1] = positions[keep].float()
        if logits_index is None:
            logits_index = batch.cu_seqlens[1:].long() - 1
        out = torch.full((logits_index.numel(), self.config.vocab_size), -10.0)
        seq_of = torch.searchsorted(batch.cu_seqlens[1:].long(), logits_index, right=True).tolist()
        for r, (j, i) in enumerate(zip(logits_index.tolist(), seq_of)):
            p = pos[j]
            ps = torch.arange(p + 1)
            sl = batch.block_table[i].long()[ps // bs] * bs + ps % bs
            stored = flat[sl]
            assert torch.equal(stored[:, 1], ps.float()), f"sequence {i}: cache holds other positions"
            toks = stored[:, 0].long().tolist()
            out[r, next_token(toks, self.config.vocab_size)] = 10.0
        return out
