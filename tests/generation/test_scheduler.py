"""Block manager and scheduler: allocation, preemption by recompute, chunked prefill, and 1,000 random
requests through the engine (over a model stand-in that checks every cache mapping) with no leaks."""

from __future__ import annotations

import random

import pytest

from plm_engine.generation.block_manager import BlockManager
from plm_engine.generation.engine import Engine
from plm_engine.generation.sampler import SamplingParams
from plm_engine.generation.scheduler import Scheduler, Sequence, Status
from tests.generation.fake_model import FakeModel, next_token


def test_block_manager_allocates_grows_and_frees():
    bm = BlockManager(5, 4)
    assert bm.blocks_for(0) == 0 and bm.blocks_for(4) == 1 and bm.blocks_for(5) == 2
    a = bm.allocate(2)
    assert len(set(a)) == 2 and bm.num_free == 3
    assert bm.grow(a, 12) and len(a) == 3
    assert not bm.grow(a, 100) and len(a) == 3  # too many: nothing changes
    b = bm.allocate(2)
    assert not set(a) & set(b) and bm.num_free == 0
    with pytest.raises(RuntimeError, match="only 0 free"):
        bm.allocate(1)
    bm.free(a)
    assert a == [] and bm.num_free == 3
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free([b[0], b[0]])
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)


def _seq(i, n_prompt, max_tokens=8):
    return Sequence(
        request_id=f"r{i}",
        seq_idx=i,
        prompt_token_ids=list(range(1, n_prompt + 1)),
        params=SamplingParams(max_tokens=max_tokens),
        max_tokens=max_tokens,
    )


def test_chunked_prefill_then_decode():
    s = Scheduler(BlockManager(16, 4), max_num_seqs=4, max_prefill_tokens=5)
    a = _seq(0, 12)
    s.add(a)
    out = s.schedule()
    assert [(c.start, c.length, c.samples) for c in out.prefill] == [(0, 5, False)]
    assert len(a.blocks) == 3  # blocks for the whole prompt at admission
    a.num_cached += 5
    out = s.schedule()
    assert [(c.start, c.length, c.samples) for c in out.prefill] == [(5, 5, False)]
    a.num_cached += 5
    out = s.schedule()
    assert [(c.start, c.length, c.samples) for c in out.prefill] == [(10, 2, True)] and not out.decode
    a.num_cached += 2
    a.token_ids.append(5)
    out = s.schedule()
    assert out.decode == [a] and not out.prefill and len(a.blocks) == 4  # position 12 opens block 3


def test_preempts_the_newest_and_recomputes_it_later():
    bm = BlockManager(4, 4)
    s = Scheduler(bm, max_num_seqs=4, max_prefill_tokens=64, watermark_blocks=0)
    a, b = _seq(0, 7, 8), _seq(1, 8, 8)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [c.seq for c in out.prefill] == [a, b] and bm.num_free == 0
    for q in (a, b):
        q.num_cached = q.num_tokens
        q.token_ids.append(3)
    out = s.schedule()  # a at position 7 fits its block; b at 8 needs a new one: b is preempted
    assert out.decode == [a] and out.preempted == [b] and b.status is Status.WAITING
    assert b.num_cached == 0 and b.blocks == [] and list(s.waiting) == [b] and s.num_preemptions == 1
    a.num_cached += 1
    a.token_ids.append(4)
    out = s.schedule()  # a at 8 needs a block: one is free now
    assert out.decode == [a]
    a.num_cached += 1
    s.finish(a, "stop")
    out = s.schedule()  # b comes back with prompt + its generated token recomputed
    assert [(c.seq, c.start, c.length) for c in out.prefill] == [(b, 0, 9)] and b.status is Status.RUNNING


def test_request_larger_than_the_cache_is_rejected():
    s = Scheduler(BlockManager(4, 4), max_num_seqs=2)
    with pytest.raises(ValueError, match="needs 5 KV blocks but the cache has 4"):
        s.add(_seq(0, 10, 10))


def test_1000_random_requests_no_leaks_every_request_finished():
    rng = random.Random(0)
    vocab = 64
    model = FakeModel(vocab_size=vocab, max_positions=128, eos_token_id=0)
    # A tiny cache (24 blocks of 4 tokens) for up to 6 sequences of up to ~90 tokens: preemption is frequent.
    eng = Engine(model, kv_cache_tokens=96, block_size=4, max_num_seqs=6, max_prefill_tokens=24)
    expected_len, aborted, results = {}, set(), {}
    n_total, added, steps = 1000, 0, 0
    while added < n_total or eng.has_unfinished():
        for _ in range(rng.randint(0, 4)):
            if added == n_total:
                break
            prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 60))]
            kw = dict(max_tokens=rng.randint(1, 30), ignore_eos=rng.random() < 0.3)
            if rng.random() < 0.3:
                kw["stop_token_ids"] = tuple(rng.sample(range(1, vocab), 3))
            if rng.random() < 0.2:
                kw.update(temperature=0.8, top_k=1, seed=rng.randrange(100))
            else:
                kw["temperature"] = 0
            rid = eng.add_request(prompt, SamplingParams(**kw))
            expected_len[rid] = (prompt, SamplingParams(**kw))
            added += 1
        for out in eng.step():
            if out.finished:
                assert out.request_id not in results, "a request finished twice"
                results[out.request_id] = out
        steps += 1
        if rng.random() < 0.05:
            running = [s.request_id for s in eng.scheduler.running] + [s.request_id for s in eng.scheduler.waiting]
            if running:
                rid = rng.choice(running)
                seq = eng._seqs[rid]
                used_before, own = eng.block_manager.num_used, len(seq.blocks)
                assert eng.abort(rid)
                assert eng.block_manager.num_used == used_before - own  # freed at once
                assert not eng.abort(rid)
                aborted.add(rid)
        # invariants: no block is owned twice, and the used count is what the sequences own
        owned = [b for s in eng.scheduler.running for b in s.blocks]
        assert len(owned) == len(set(owned)) == eng.block_manager.num_used
        assert all(not s.blocks for s in eng.scheduler.waiting)
        assert steps < 200_000
    st = eng.stats()
    assert st["kv_blocks_used"] == 0 and eng.block_manager.num_free == eng.block_manager.num_blocks
    assert st["num_running"] == st["num_waiting"] == 0
    assert len(results) == n_total and st["requests_finished"] + st["requests_aborted"] == n_total
    assert st["requests_aborted"] == len(aborted) > 10
    assert st["num_preemptions"] > 20, st
    assert any(has_prefix for _, _, has_prefix in model.forwards), "no chunked prefill / recompute happened"
    reasons = {o.finish_reason for o in results.values()}
    assert reasons == {"stop", "length", "abort"}
    for rid, out in results.items():
        prompt, p = expected_len[rid]
        assert out.finish_reason is not None
        if rid in aborted:
            assert out.finish_reason == "abort"
            continue
        # every token is what the cache-reading stand-in gives for the exact prefix: paging was right
        toks = list(prompt)
        for t in out.token_ids:
            assert t == next_token(toks, vocab), f"{rid}: wrong token after {len(toks)} tokens"
            toks.append(t)
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else {0})
        if out.finish_reason == "length":
            assert len(out.token_ids) == min(p.max_tokens, 128 - len(prompt))
            assert not stops & set(out.token_ids)
        else:
            assert out.token_ids[-1] in stops and not stops & set(out.token_ids[:-1])
