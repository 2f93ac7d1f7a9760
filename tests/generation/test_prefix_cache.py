"""Prefix caching: block reference counts, LRU eviction and chain hashes; the scheduler reusing the longest
cached full-block prefix (never the last token, never a partial block); and the engine giving the same
greedy (and seeded) outputs with caching on and off for a shared system prompt, a multi-turn chat and
n > 1 samples of one prompt, while computing only the tokens the cache does not hold."""

from __future__ import annotations

import pytest
import torch

from plm_engine.generation.block_manager import BlockManager, hash_block
from plm_engine.generation.engine import Engine
from plm_engine.generation.sampler import SamplingParams
from plm_engine.generation.scheduler import Scheduler, Sequence
from plm_engine.models import ModelConfig, Transformer
from tests.generation.engine_setups import plain_and_chunked_preempting
from tests.generation.fake_model import FakeModel, next_token

# ---- block manager ----------------------------------------------------------------------------------------


def test_hash_chains_parent_tokens_and_extra_keys():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4]) and len(a) == 32
    assert a != hash_block(None, [1, 2, 3, 5])
    assert a != hash_block(None, [1, 2, 3, 4], ("adapter-1",))
    b = hash_block(a, [5, 6, 7, 8])
    assert b != hash_block(None, [5, 6, 7, 8]) and b != hash_block(hash_block(None, [9, 2, 3, 4]), [5, 6, 7, 8])


def test_block_manager_refcounts_and_evicts_least_recently_used():
    bm = BlockManager(4, 2)
    a = bm.allocate(2)
    h = [hash_block(None, [i, i]) for i in range(3)]
    assert bm.register(a[0], h[0]) and bm.register(a[1], h[1])
    assert bm.register(a[0], h[0])  # again, same content: fine
    other = bm.allocate(1)
    assert not bm.register(other[0], h[0])  # that content is cached in a[0] already: stays private
    bm.free(other)
    bm.acquire([a[0]])  # a second sequence shares the first block
    assert bm.ref_count(a[0]) == 2 and bm.num_used == 2
    first = list(a)
    bm.free(a)
    assert bm.ref_count(first[0]) == 1 and bm.ref_count(first[1]) == 0
    assert bm.num_free == 3 and bm.num_cached == 2  # first[1] is evictable: free, but still cached
    bm.check()
    # plain free blocks go first; then the least recently used cached one
    x = bm.allocate(2)
    assert first[1] not in x and bm.num_evictions == 0 and bm.lookup(h[1]) == first[1]
    y = bm.allocate(1)
    assert y == [first[1]] and bm.num_evictions == 1 and bm.lookup(h[1]) is None
    with pytest.raises(RuntimeError, match="only 0 free"):
        bm.allocate(1)
    bm.free([first[0]])
    assert bm.lookup(h[0]) == first[0] and bm.num_free == 1
    bm.acquire([first[0]])  # an evictable block comes back with its content
    assert bm.num_free == 0 and bm.ref_count(first[0]) == 1
    with pytest.raises(RuntimeError, match="not cached"):
        bm.acquire([x[0]])
    bm.free([first[0]])
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free([first[0]])
    with pytest.raises(RuntimeError, match="not allocated"):
        bm.register(first[0], h[2])
    bm.free(x)
    bm.free(y)
    bm.check()
    assert bm.num_free == 4 and bm.num_cached == 1 and bm.reset_prefix_cache() == 1 and bm.num_cached == 0
    bm.check()


def test_least_recently_released_prefix_is_evicted_first():
    bm = BlockManager(4, 1)
    seqs = [bm.allocate(2), bm.allocate(2)]
    for s, base in zip(seqs, (0, 10)):
        for i, b in enumerate(s):
            bm.register(b, hash_block(None, [base + i]))
    old, new = list(seqs[0]), list(seqs[1])
    bm.free(seqs[0])
    bm.free(seqs[1])
    # the older release goes first, and within one sequence its last block before its first
    assert [bm.allocate(1)[0] for _ in range(4)] == [old[1], old[0], new[1], new[0]]


# ---- scheduler ------------------------------------------------------------------------------------------


def _seq(i, prompt, max_tokens=4):
    p = SamplingParams(max_tokens=max_tokens)
    return Sequence(request_id=f"r{i}", seq_idx=i, prompt_token_ids=list(prompt), params=p, max_tokens=max_tokens)


def _run_prefill(s: Scheduler, out) -> None:
    """What the engine does after a prefill forward: advance the chunks, sample a token at the end."""
    for ch in out.prefill:
        ch.seq.num_cached += ch.length
        if ch.samples:
            ch.seq.token_ids.append(99)


def test_scheduler_reuses_the_longest_full_block_prefix_but_never_the_last_token():
    bm = BlockManager(32, 4)
    s = Scheduler(bm, max_num_seqs=8, max_prefill_tokens=64)
    base = list(range(1, 13))  # 12 tokens: 3 full blocks
    a = _seq(0, base)
    s.add(a)
    out = s.schedule()
    assert [(c.start, c.length) for c in out.prefill] == [(0, 12)]
    _run_prefill(s, out)
    s.finish(a, "stop")  # its 3 computed blocks stay cached; the sampled token has no K/V
    assert bm.num_used == 0 and bm.num_cached == 3
    s.check_invariants()

    cases = [
        (base + [50, 51], 12),  # extends the cached prompt: all 3 blocks reused
        (base, 8),  # the same prompt: its last block is recomputed so its last token has logits
        (base[:11], 8),  # ends inside block 2: that partial block is never shared
        (base[:4] + [60] + base[5:], 4),  # differs in block 1: the chain hash stops after block 0
        ([7] + base[1:], 0),  # differs in the first token: nothing
        (base[:3], 0),  # shorter than one block
    ]
    seqs = []
    for i, (prompt, hit) in enumerate(cases, start=1):
        q = _seq(i, prompt)
        queries, hits = s.prefix_cache_queries, s.prefix_cache_hits
        s.add(q)
        out = s.schedule()
        assert [(c.seq, c.start, c.length) for c in out.prefill] == [(q, hit, len(prompt) - hit)], prompt
        assert s.prefix_cache_queries - queries == len(prompt) and s.prefix_cache_hits - hits == hit
        assert len(q.blocks) == bm.blocks_for(len(prompt))
        s.check_invariants()
        _run_prefill(s, out)
        seqs.append(q)
    first_blocks = {q.blocks[0] for q in seqs[:4]}
    assert len(first_blocks) == 1 and bm.ref_count(first_blocks.pop()) == 4
    assert seqs[1].blocks[2] not in seqs[0].blocks and seqs[2].blocks[2] not in seqs[0].blocks
    for q in seqs:
        s.finish(q, "abort")
        s.check_invariants()
    assert bm.num_used == 0 and bm.num_free == bm.num_blocks


def test_samples_of_one_prompt_share_its_blocks_in_the_same_step():
    """n > 1: the n requests arrive together; the first computes the prompt, the others take references
    to its blocks in the same forward (each layer writes them before anyone attends)."""
    bm = BlockManager(32, 4)
    s = Scheduler(bm, max_num_seqs=8, max_prefill_tokens=64)
    prompt = list(range(1, 11))
    seqs = [_seq(i, prompt) for i in range(3)]
    for q in seqs:
        s.add(q)
    out = s.schedule()
    assert [(c.seq, c.start, c.length) for c in out.prefill] == [(seqs[0], 0, 10), (seqs[1], 8, 2), (seqs[2], 8, 2)]
    assert seqs[1].blocks[:2] == seqs[2].blocks[:2] == seqs[0].blocks[:2]
    assert len({q.blocks[2] for q in seqs}) == 3  # the partial last block is each one's own
    assert bm.num_used == 2 + 3
    s.check_invariants()


def test_chunked_prompt_shares_only_what_is_scheduled():
    """A prompt longer than the prefill budget: a later request shares the blocks computed or being
    computed so far, then the rest in later steps; its own chunks start after its shared prefix."""
    bm = BlockManager(32, 4)
    s = Scheduler(bm, max_num_seqs=8, max_prefill_tokens=10)
    prompt = list(range(1, 22))
    a, b = _seq(0, prompt), _seq(1, prompt + [40, 41])
    s.add(a)
    out = s.schedule()
    assert [(c.seq, c.start, c.length) for c in out.prefill] == [(a, 0, 10)]
    _run_prefill(s, out)
    s.add(b)
    out = s.schedule()  # a's next chunk takes the whole budget: b waits
    assert [(c.seq, c.start, c.length) for c in out.prefill] == [(a, 10, 10)]
    _run_prefill(s, out)
    out = s.schedule()  # b shares the 5 blocks a computed (a's last prompt token goes with the decodes)
    assert [(c.seq, c.start, c.length) for c in out.prefill] == [(b, 20, 3)] and out.decode == [a]
    assert b.blocks[:5] == a.blocks[:5] and s.prefix_cache_hits == 20
    s.check_invariants()


def test_extra_keys_keep_caches_apart():
    """Whatever else a sequence's K/V depend on (an adapter, an encoder input) goes into cache_extra_keys:
    equal tokens with other extra keys share nothing; with the same ones they share as usual."""
    bm = BlockManager(32, 4)
    s = Scheduler(bm, max_num_seqs=8, max_prefill_tokens=64)
    seqs = [_seq(i, range(1, 11)) for i in range(3)]
    seqs[1].cache_extra_keys = seqs[2].cache_extra_keys = ("adapter-2",)
    s.add(seqs[0])
    s.add(seqs[1])
    out = s.schedule()
    assert [(c.start, c.length) for c in out.prefill] == [(0, 10), (0, 10)]
    _run_prefill(s, out)
    s.add(seqs[2])
    out = s.schedule()
    assert [(c.seq, c.start) for c in out.prefill] == [(seqs[2], 8)] and seqs[2].blocks[:2] == seqs[1].blocks[:2]


def test_off_shares_nothing():
    bm = BlockManager(32, 4)
    s = Scheduler(bm, max_num_seqs=8, max_prefill_tokens=64, enable_prefix_caching=False)
    seqs = [_seq(i, range(1, 11)) for i in range(2)]
    for q in seqs:
        s.add(q)
    out = s.schedule()
    assert [(c.start, c.length) for c in out.prefill] == [(0, 10), (0, 10)]
    assert not set(seqs[0].blocks) & set(seqs[1].blocks) and bm.num_cached == 0
    _run_prefill(s, out)
    for q in seqs:
        s.finish(q, "stop")
    assert bm.num_cached == 0 and s.prefix_cache_queries == s.prefix_cache_hits == 0


class FailOnce(FakeModel):
    """Raises on its `fail_at`-th prefill forward (after nothing was written)."""

    def __init__(self, fail_at: int, **kw):
        super().__init__(**kw)
        self.fail_at, self.prefills = fail_at, 0

    def forward_tokens(self, input_ids, positions, kv_cache, batch, logits_index=None):
        if not batch.is_decode:
            self.prefills += 1
            if self.prefills == self.fail_at:
                raise RuntimeError("injected failure")
        return super().forward_tokens(input_ids, positions, kv_cache, batch, logits_index)


def test_a_failed_forward_leaves_no_uncomputed_block_cached():
    """Blocks are registered when their chunk is scheduled; if that forward raises, the next step forgets
    them and recomputes whoever took them as computed, so the outputs stay right."""
    vocab = 64
    model = FailOnce(fail_at=2, vocab_size=vocab, max_positions=128, eos_token_id=None)
    eng = Engine(model, kv_cache_tokens=256, block_size=4, max_num_seqs=8, max_prefill_tokens=64)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = list(range(1, 10))
    eng.generate(first, greedy)  # prefill 1 is fine
    prompt = list(range(20, 42))
    ids = [eng.add_request(prompt, greedy) for _ in range(3)]  # n = 3: the last two share the first's blocks
    with pytest.raises(RuntimeError, match="injected"):
        eng.step()
    assert eng.block_manager.num_cached == 3 + 5  # the failed step's 5 blocks were registered ...
    final = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
        eng.scheduler.check_invariants()
    assert eng.stats()["num_preemptions"] >= 2  # ... so the sharers were sent back and recomputed
    expected = list(prompt)
    for _ in range(6):
        expected.append(next_token(expected, vocab))
    assert all(final[i].token_ids == expected[len(prompt) :] for i in ids)
    assert eng.block_manager.num_used == 0


# ---- engine on a tiny random Llama ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("llama-tiny")).eval()


class Counting:
    """Counts the tokens that go through the model's forwards."""

    def __init__(self, model):
        self.model, self.tokens = model, 0
        self._orig = model.forward_tokens

    def __enter__(self):
        def counted(input_ids, *a, **kw):
            self.tokens += input_ids.numel()
            return self._orig(input_ids, *a, **kw)

        self.model.forward_tokens = counted
        return self

    def __exit__(self, *exc):
        del self.model.forward_tokens


def _ids(n, seed, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n,), generator=g).tolist()


def _serve(model, waves, caching, **kw):
    """Runs waves of (prompt, params) requests; wave i+1 is added once wave i's requests are admitted and
    have run a step (so both shared blocks being computed and already computed are exercised). Returns
    the outputs in order, the engine's stats and the tokens that went through the model."""
    eng = Engine(model, cuda_graphs=False, enable_prefix_caching=caching, **kw)
    final, ids = {}, []
    with Counting(model) as c:
        for wave in waves:
            ids += [eng.add_request(p, sp) for p, sp in wave]
            for o in eng.step():
                final[o.request_id] = o
        while eng.has_unfinished():
            for o in eng.step():
                final[o.request_id] = o
            eng.scheduler.check_invariants()
    st = eng.stats()
    assert st["kv_blocks_used"] == 0
    return [final[i].token_ids for i in ids], st, c.tokens


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


# The tight set-up chunks the prefill after the cached prefix, and preempts and evicts.
@plain_and_chunked_preempting(plain_block_size=8, tight_kv_tokens=128, tight_chunk=24)
def test_shared_system_prompt_same_greedy_outputs_with_caching_on_and_off(tiny, setup):
    system = _ids(45, seed=1)
    questions = [_ids(n, seed=10 + n) for n in (3, 11, 6, 17, 1, 8)]
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    waves = [[(system + q, p) for q in questions[:2]], [(system + questions[2], p)]]
    waves += [[(system + q, p)] for q in questions[3:]]
    on, st_on, computed_on = _serve(tiny, waves, True, **setup)
    off, st_off, computed_off = _serve(tiny, waves, False, **setup)
    assert on == off
    assert st_off["prefix_cache_hits"] == st_off["prefix_cache_queries"] == 0
    # every request after the first reuses the 5 full blocks (40 tokens) of the system prompt, at least
    assert st_on["prefix_cache_hits"] >= 5 * 40 and st_on["prefix_cache_blocks"] > 0
    if setup["kv_cache_tokens"] < 200:
        assert st_on["num_preemptions"] > 0  # the re-admitted ones reuse their own cached blocks too
    if st_on["num_preemptions"] == st_off["num_preemptions"] == 0:
        assert computed_on == computed_off - st_on["prefix_cache_hits"]  # reused, not recomputed
    else:  # recomputes after preemption differ: sharing blocks leaves more room
        assert computed_on < computed_off - 5 * 40


def test_multi_turn_chat_reuses_the_previous_turn(tiny):
    """Turn 2's prompt is turn 1's prompt + answer + the next user message: all of it but the partial
    last block (and the answer's last token, never fed back) comes from the cache."""
    bs = 8
    turn1 = _ids(30, seed=2)

    def chat(caching):
        eng = Engine(tiny, cuda_graphs=False, kv_cache_tokens=1024, block_size=bs, enable_prefix_caching=caching)
        a1 = eng.generate(turn1, GREEDY)[0].token_ids
        turn2 = turn1 + a1 + _ids(7, seed=3)
        with Counting(tiny) as c:
            a2 = eng.generate(turn2, GREEDY)[0].token_ids
        return a1, a2, c.tokens, eng.stats()

    a1, a2, computed_on, st = chat(True)
    assert (a1, a2) == chat(False)[:2]
    cached = (len(turn1) + len(a1) - 1) // bs * bs  # the full blocks of turn 1 with K/V
    assert st["prefix_cache_hits"] == cached
    assert computed_on == len(turn1) + len(a1) + 7 - cached + (len(a2) - 1)  # prefill + decode tokens


def test_n_samples_of_one_prompt_share_its_blocks(tiny):
    """As the server runs n > 1: n requests with one prompt at once, seeded samples with seed + j."""
    prompt = _ids(37, seed=4)
    n = 4
    sampled = [
        SamplingParams(temperature=0.8, top_p=0.95, seed=7 + j, max_tokens=10, ignore_eos=True) for j in range(n)
    ]
    waves = [[(prompt, p) for p in sampled] + [(prompt, GREEDY)] * 2]
    on, st, computed_on = _serve(tiny, waves, True, kv_cache_tokens=1024, block_size=8)
    off, _, computed_off = _serve(tiny, waves, False, kv_cache_tokens=1024, block_size=8)
    assert on == off and on[-1] == on[-2]
    assert len({tuple(t) for t in on[:n]}) > 1  # the seeds differ, so the samples do
    assert st["prefix_cache_hits"] == (len(waves[0]) - 1) * 32  # 4 full blocks each but the first
    assert computed_on == computed_off - st["prefix_cache_hits"]
