"""AsyncEngine (streaming, cancellation, shutdown) and the CUDA-graph decode buckets (padding on CPU,
capture on GPU)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from plm_engine.generation import AsyncEngine, Engine
from plm_engine.generation.cuda_graphs import DecodeGraphs, default_buckets
from plm_engine.generation.sampler import SamplingParams
from plm_engine.layers.kv_cache import PagedBatch
from plm_engine.models import ModelConfig, Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("llama-tiny")).eval()


def wait_for(cond, timeout=20.0):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def test_async_stream_generate_and_cancel(model):
    eng = Engine(model, kv_cache_tokens=1024, cuda_graphs=False)
    ref = eng.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].token_ids
    aeng = AsyncEngine(eng)

    async def main():
        p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        got, outs = [], []
        async for out in aeng.stream([5, 6, 7], p):
            got += out.new_token_ids
            outs.append(out)
        assert got == ref and outs[-1].finished and outs[-1].finish_reason == "length"
        assert not any(o.finished for o in outs[:-1])
        # two at once, through generate()
        a, b = await asyncio.gather(aeng.generate([5, 6, 7], p), aeng.generate([9, 9], p))
        assert a.token_ids == ref and len(b.token_ids) == 12
        # a consumer that stops early aborts its request and frees its blocks
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        n = 0
        async for _ in aeng.stream([1, 2, 3], long):
            n += 1
            if n == 3:
                break

        # a cancelled consumer task too, cancelled once it runs (a fixed sleep raced the engine under load)
        async def until(cond):
            deadline = time.monotonic() + 60
            while not cond() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

        await until(lambda: aeng.stats()["num_running"] == 0)  # the stream above is aborted
        task = asyncio.ensure_future(aeng.generate([4, 5], long))
        await until(lambda: aeng.stats()["num_running"] == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_for(lambda: aeng.stats()["kv_blocks_used"] == 0 and aeng.stats()["num_running"] == 0)
    st = aeng.stats()
    assert st["requests_aborted"] == 2 and st["requests_finished"] == 4
    aeng.shutdown()


def test_async_shutdown_aborts_in_flight(model):
    aeng = AsyncEngine(Engine(model, kv_cache_tokens=1024, cuda_graphs=False))

    async def main():
        # Shut down as soon as the request is in flight (its first token streamed): a fixed sleep would
        # race the step thread, which decodes this tiny model's 240 tokens in well under 0.1 s.
        outs = []
        async for out in aeng.stream([1, 2], SamplingParams(max_tokens=240, ignore_eos=True)):
            outs.append(out)
            if len(outs) == 1:
                await asyncio.get_running_loop().run_in_executor(None, aeng.shutdown)
        return outs[-1]

    out = asyncio.run(main())
    assert out.finished and out.finish_reason == "abort" and len(out.token_ids) < 240
    assert not aeng._thread.is_alive() and aeng.engine.stats()["kv_blocks_used"] == 0
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(aeng.generate([1]))


def test_bad_request_raises_in_the_caller(model):
    aeng = AsyncEngine(Engine(model, kv_cache_tokens=1024, cuda_graphs=False))
    try:
        with pytest.raises(ValueError, match="context holds 256"):
            asyncio.run(aeng.generate(list(range(1, 400))))
    finally:
        aeng.shutdown()


def test_default_buckets():
    assert default_buckets(1) == [1]
    assert default_buckets(6) == [1, 2, 4, 6]
    assert default_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    with pytest.raises(ValueError, match="max_batch"):
        default_buckets(0)


def test_padded_decode_buckets_give_the_unpadded_logits(model):
    """What a captured graph computes, run eagerly on the CPU: the padding rows change nothing."""
    eng = Engine(model, kv_cache_tokens=512, block_size=16, max_num_seqs=8, cuda_graphs=False)
    prompts = [[3, 4, 5, 6], [7] * 20, [9, 1]]
    for i, p in enumerate(prompts):
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), request_id=str(i))
    eng.step()  # prefill all three; each now has one token to decode
    seqs = list(eng.scheduler.running)
    assert all(s.num_pending == 1 for s in seqs)
    for s in seqs:
        assert eng.block_manager.grow(s.blocks, s.num_cached + 1)
    bs = eng.block_size
    ids = [s.token_ids[-1] for s in seqs]
    pos = [s.num_cached for s in seqs]
    slots = [s.blocks[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]
    rows = [s.blocks for s in seqs]
    lens = [p + 1 for p in pos]
    width = max(map(len, rows))
    batch = PagedBatch(
        torch.arange(4, dtype=torch.int32),
        1,
        torch.tensor(slots),
        torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32),
        torch.tensor(lens, dtype=torch.int32),
        True,
        False,
    )
    with torch.no_grad():
        ref = model.forward_tokens(torch.tensor(ids), torch.tensor(pos), eng.kv_cache, batch)
        graphs = DecodeGraphs(
            model, eng.kv_cache, max_batch=8, max_blocks_per_seq=eng.max_blocks_per_seq, buckets=[1, 4, 8]
        )
        assert graphs.bucket_for(3) == 4 and graphs.bucket_for(9) is None
        got = graphs.run(ids, pos, slots, rows, lens)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref)
    assert graphs.slot_mapping[3:4].tolist() == [-1] and graphs.cache_seqlens[3:4].tolist() == [1]
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        graphs.fill([0] * 9, [0] * 9, [0] * 9, [[0]] * 9, [1] * 9)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        graphs.capture()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_graph_decode_matches_eager(dtype):
    """fp32 too: its paged attention and cache writes must take the Triton kernels (the reference's
    data-dependent indexing cannot be captured; seen on an H200)."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig.preset("llama-tiny", head_dim=64, n_heads=2, n_kv_heads=1)).to("cuda", dtype).eval()
    prompts = [[3, 4, 5, 6], [7] * 20, [9, 1], [2] * 33, [8, 8, 8]]
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    eager = Engine(m, kv_cache_tokens=2048, max_num_seqs=8, cuda_graphs=False).generate(prompts, p)
    eng = Engine(m, kv_cache_tokens=2048, max_num_seqs=8, cuda_graphs=True)
    assert eng.graphs is not None and sorted(eng.graphs.graphs) == [1, 2, 4, 8]
    graphed = eng.generate(prompts, p)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
