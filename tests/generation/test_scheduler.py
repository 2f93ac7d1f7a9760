"""Block manager and scheduler: allocation, preemption by recompute, chunked prefill, and 1,000 random
requests (drawn from a few shared prefixes, so the prefix cache shares blocks) through the engine, over a
model stand-in that checks every cache mapping, with the block invariants checked every step and no leaks."""

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


def test_sizes_below_one_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"^BlockManager: block_size must be >= 1, got 0$"):
        BlockManager(4, 0)
    with pytest.raises(ValueError, match=r"^Scheduler: max_prefill_tokens must be >= 1, got -1$"):
        Scheduler(BlockManager(4, 16), max_num_seqs=2, max_prefill_tokens=-1)
    with pytest.raises(ValueError, match=r"^Engine: max_num_seqs must be >= 1, got 0$"):
        Engine(FakeModel(), max_num_seqs=0, cuda_graphs=False)


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
    # without prefix caching: b would share a's first block, and come back with its own cached blocks
    s = Scheduler(bm, max_num_seqs=4, max_prefill_tokens=64, watermark_blocks=0, enable_prefix_caching=False)
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


class WriteCheckingModel(FakeModel):
    """FakeModel that also fails when a forward writes into a block whose content is already computed
    and cached, or into a block another sequence holds, unless this step's prefill computes that block
    for the first time (sequences admitted in the same step may share it: every layer writes the new
    tokens' K/V before attending). One block is written by one sequence of the batch at most."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.scheduler = None

    def forward_tokens(self, input_ids, positions, kv_cache, batch, logits_index=None):
        sch = self.scheduler
        if sch is not None:
            bm, cu, slots = sch.bm, batch.cu_seqlens.tolist(), batch.slot_mapping.tolist()
            pending = {b for _, _, b in sch._pending}
            writer = {}
            for row in range(len(cu) - 1):
                for b in {s // bm.block_size for s in slots[cu[row] : cu[row + 1]] if s >= 0}:
                    assert writer.setdefault(b, row) == row, f"block {b} written by two sequences"
                    if b in pending:
                        continue
                    assert not bm.is_cached(b), f"a forward overwrites cached block {b}"
                    assert bm.ref_count(b) == 1, f"a forward writes block {b}, held by {bm.ref_count(b)} sequences"
        return super().forward_tokens(input_ids, positions, kv_cache, batch, logits_index)


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_1000_random_requests_no_leaks_every_request_finished(prefix_caching):
    rng = random.Random(0)
    vocab = 64
    model = WriteCheckingModel(vocab_size=vocab, max_positions=128, eos_token_id=0)
    # A tiny cache (24 blocks of 4 tokens) for up to 6 sequences of up to ~90 tokens: preemption is frequent,
    # and cached blocks are evicted all the time.
    eng = Engine(
        model,
        kv_cache_tokens=96,
        block_size=4,
        max_num_seqs=6,
        max_prefill_tokens=24,
        enable_prefix_caching=prefix_caching,
    )
    model.scheduler = eng.scheduler
    bm = eng.block_manager
    # Most prompts start with one of a few shared prefixes (cut anywhere, so hits end mid-prefix too);
    # some repeat an earlier prompt whole (the whole-prompt hit keeps its last block to compute).
    prefixes = [[rng.randrange(1, vocab) for _ in range(n)] for n in (9, 20, 33, 45)]
    expected_len, aborted, results = {}, set(), {}
    n_total, added, steps = 1000, 0, 0

    def collect(outs):
        for out in outs:
            if out.finished:
                assert out.request_id not in results, "a request finished twice"
                results[out.request_id] = out

    while added < n_total or eng.has_unfinished():
        prompt = None
        for _ in range(rng.randint(0, 4)):
            if added == n_total:
                break
            if prompt is not None and rng.random() < 0.3:
                pass  # the same prompt again in the same step: the server's n > 1
            elif expected_len and rng.random() < 0.1:  # an earlier prompt again (a retry)
                prompt = list(expected_len[rng.choice(list(expected_len))][0])
            else:
                head = rng.choice(prefixes)[: rng.randint(0, 45)] if rng.random() < 0.8 else []
                prompt = head + [rng.randrange(1, vocab) for _ in range(rng.randint(1, 20 if head else 60))]
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
        collect(eng.step())
        steps += 1
        eng.scheduler.check_invariants()  # refcounts = holders, free/evictable/used partition, hash maps agree
        if rng.random() < 0.05:
            running = [s.request_id for s in eng.scheduler.running] + [s.request_id for s in eng.scheduler.waiting]
            if running:
                rid = rng.choice(running)
                seq = eng._seqs[rid]
                # its blocks that nobody else holds become free (or evictable) at once
                own = sum(1 for b in seq.blocks if bm.ref_count(b) == 1)
                used_before = bm.num_used
                assert eng.abort(rid)
                assert bm.num_used == used_before - own
                assert not eng.abort(rid)
                aborted.add(rid)
                eng.scheduler.check_invariants()
        assert steps < 200_000
    collect(eng.step())  # the final outputs of requests aborted after the last step
    st = eng.stats()
    eng.scheduler.check_invariants()
    # zero leaked blocks: none referenced, each either free or cached with no reference (evictable)
    assert st["kv_blocks_used"] == 0 and bm.num_free == bm.num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    assert st["num_running"] == st["num_waiting"] == 0
    assert len(results) == n_total and st["requests_finished"] + st["requests_aborted"] == n_total
    assert st["requests_aborted"] == len(aborted) > 10
    assert st["num_preemptions"] > 20, st
    assert any(has_prefix for _, _, has_prefix in model.forwards), "no chunked prefill / recompute happened"
    if prefix_caching:
        # shared prefixes and recomputes after preemption reuse cached blocks; some are evicted
        assert st["prefix_cache_hits"] > 0.1 * st["prefix_cache_queries"] > 0, st
        assert st["prefix_cache_blocks"] > 0 and bm.num_evictions > 100
    else:
        assert st["prefix_cache_hits"] == st["prefix_cache_queries"] == st["prefix_cache_blocks"] == 0
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
