"""The two engine set-ups the end-to-end generation tests run under: one with room for everything, and one
with small prefill chunks and a KV cache too small for every request at once, so that prefills are
chunked and sequences are preempted and recomputed. Each test picks the sizes that make its own
requests take those paths."""

from __future__ import annotations

import pytest


def plain_and_chunked_preempting(plain_block_size: int, tight_kv_tokens: int, tight_chunk: int):
    """Parametrizes a test's `setup` (Engine keyword arguments) with both set-ups."""
    return pytest.mark.parametrize(
        "setup",
        [
            dict(kv_cache_tokens=2048, block_size=plain_block_size, max_prefill_tokens=2048),
            dict(kv_cache_tokens=tight_kv_tokens, block_size=8, max_prefill_tokens=tight_chunk, max_num_seqs=4),
        ],
        ids=["plain", "chunked-preempting"],
    )
