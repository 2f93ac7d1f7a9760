"""forward_tokens over a paged KV cache (prefill, chunked prefill, decode) equals the plain forward."""

from __future__ import annotations

import pytest
import torch

from plm_engine.layers import PagedBatch
from plm_engine.models import ModelConfig, Transformer

BLOCK = 4


def _batch(seq_ids, new_lens, cached_before, max_blocks=16):
    """PagedBatch for sequences seq_ids (sequence i owns blocks [i * max_blocks, ...)) with new_lens new
    tokens after cached_before cached ones."""
    table = torch.tensor([[i * max_blocks + j for j in range(max_blocks)] for i in seq_ids], dtype=torch.int32)
    slots, positions = [], []
    for i, (n, c) in enumerate(zip(new_lens, cached_before, strict=True)):
        for p in range(c, c + n):
            slots.append(int(table[i, p // BLOCK]) * BLOCK + p % BLOCK)
            positions.append(p)
    cu = torch.tensor([0] + list(torch.tensor(new_lens).cumsum(0)), dtype=torch.int32)
    total = torch.tensor([c + n for n, c in zip(new_lens, cached_before, strict=True)], dtype=torch.int32)
    pb = PagedBatch(
        cu_seqlens=cu,
        max_seqlen=max(new_lens),
        slot_mapping=torch.tensor(slots),
        block_table=table,
        cache_seqlens=total,
        is_decode=all(n == 1 for n in new_lens),
        has_prefix=any(cached_before),
        seq_bounds=tuple(int(c) for c in cu),
    )
    return pb, torch.tensor(positions)


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_chunks_and_decode_match_full_forward(preset, dtype):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset)).to(dtype).eval()
    seqs = [torch.randint(0, 512, (n,)) for n in (11, 6, 17)]
    full = [model(s[None]).logits[0].float() for s in seqs]
    cache = model.allocate_kv_cache(num_blocks=3 * 16, block_size=BLOCK)
    tol = dict(rtol=0, atol=1e-4) if dtype == torch.float32 else dict(rtol=0, atol=6e-2)
    with torch.no_grad():
        # Prefill the first 5 tokens of each, then a second chunk of 3 through the cache, then decode.
        state = [0, 0, 0]
        for chunk in (5, 3):
            lens = [min(chunk, len(s) - st) for s, st in zip(seqs, state, strict=True)]
            pb, pos = _batch(range(3), lens, state)
            ids = torch.cat([s[st : st + n] for s, st, n in zip(seqs, state, lens, strict=True)])
            logits = model.forward_tokens(ids, pos, cache, pb).float()
            for i in range(3):
                torch.testing.assert_close(logits[i], full[i][state[i] + lens[i] - 1], **tol)
            state = [st + n for st, n in zip(state, lens, strict=True)]
        while any(st < len(s) for s, st in zip(seqs, state, strict=True)):
            live = [i for i in range(3) if state[i] < len(seqs[i])]
            pb, pos = _batch(live, [1] * len(live), [state[i] for i in live])
            ids = torch.stack([seqs[i][state[i]] for i in live])
            logits = model.forward_tokens(ids, pos, cache, pb).float()
            for j, i in enumerate(live):
                torch.testing.assert_close(logits[j], full[i][state[i]], **tol)
                state[i] += 1


def test_encoder_cannot_generate():
    model = Transformer(ModelConfig.preset("bert-tiny"))
    pb, pos = _batch([0], [3], [0])
    with pytest.raises(ValueError, match="causal"):
        model.forward_tokens(torch.zeros(3, dtype=torch.long), pos, model.allocate_kv_cache(16, BLOCK), pb)


def test_bad_inputs_name_the_limit():
    model = Transformer(ModelConfig.preset("llama-tiny"))
    with pytest.raises(ValueError, match="out of range for a vocabulary of 512"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="context of 256"):
        model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))


def _anon_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_cpu_kv_cache_is_resident_only_where_written():
    """A CPU cache reads as zeros, yet allocating it makes nothing resident (a 64 MiB cache here)."""
    from plm_engine.layers.kv_cache import KVCache

    before = _anon_kib()
    cache = KVCache.allocate(4, num_blocks=1024, block_size=16, n_kv_heads=4, head_dim=64, dtype=torch.float32)
    assert _anon_kib() - before < 1024
    assert all(t.device.type == "cpu" and t.is_contiguous() and t.data_ptr() % 4096 == 0 for t in cache.k + cache.v)
    cache.k[0][3].fill_(1.0)
    assert cache.k[0][3].sum() == 16 * 4 * 64
    assert not cache.k[0][:3].any() and not cache.k[0][4:].any() and not cache.v[-1].any()
