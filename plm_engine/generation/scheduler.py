"""Continuous-batching scheduler: waiting and running queues over a paged KV cache.

Each step the scheduler picks
- a decode batch: every running sequence with exactly one token not yet in the cache (the one it sampled
  last step). When one needs a new block and none is free, the newest running sequence is preempted: its
  blocks are freed and it goes back to the front of the waiting queue; when it is admitted again its
  prompt plus the tokens it generated are prefilled anew (recompute), and it continues where it stopped;
- a prefill batch of at most max_prefill_tokens tokens: first the next chunks of admitted sequences whose
  prompt is longer than one chunk, then new (or preempted) sequences from the waiting queue, in order,
  while a sequence slot and the blocks for its whole prompt are free.

A sequence's tokens are prompt + output; `num_cached` of them have their K/V in the cache. After a forward
the engine advances num_cached and appends the sampled token (only when the chunk reached the last token).

Prefix caching (enable_prefix_caching, block_manager.py): a sequence being admitted takes references to
the cached blocks of its longest full-block prefix, up to but not including its last token (which must
be computed so its logits exist), and its first chunk starts after them. A full block is registered in
the cache
- when the prefill chunk that completes it is scheduled: it is computed in this step's prefill forward,
  where every layer writes all new tokens' K/V before attending, so a sequence admitted later in the
  same step (the n samples of one prompt) can already share it. Should that forward fail, the next
  schedule() finds the block uncomputed, forgets it and preempts whoever relied on it;
- when a decode step completes it: at the next schedule() (the decode forward runs after the prefill
  forward, so a block it fills cannot be shared in the same step);
- when its sequence finishes or is preempted, for every block whose K/V are all computed.
Only full blocks are shared, and a sequence writes only after its shared prefix, so a block with more
than one reference is never written; a freed cached block stays cached until the allocator evicts it.
"""

from __future__ import annotations

import bisect
import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from plm_engine.generation.block_manager import BlockManager, hash_block
from plm_engine.generation.sampler import SamplingParams
from plm_engine.ops import checks

if TYPE_CHECKING:
    import torch

    from plm_engine.generation.structured import GrammarMatcher
    from plm_engine.models.tokenizer import StreamDecoder


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's state: its tokens, its blocks, its progress and its output bookkeeping."""

    request_id: str
    seq_idx: int  # arrival order: lower is older (preemption picks the highest)
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens capped at the context and the cache
    arrival_time: float = field(default_factory=time.time)
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    status: Status = Status.WAITING
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    finish_reason: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    # Engine-side state: penalty slot, seeded generator, grammar matcher, stream decoder and text, log-probs.
    slot: int | None = None
    generator: torch.Generator | None = None
    matcher: GrammarMatcher | None = None  # structured output (generation/structured.py)
    decoder: StreamDecoder | None = None
    text: str = ""
    emitted_len: int = 0
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    # Prefix cache: anything besides the tokens that changes this sequence's K/V (an adapter, an encoder
    # input, a per-tenant salt); hashed into the first block's key, so every later key depends on it.
    cache_extra_keys: tuple = ()
    block_hashes: list[bytes] = field(default_factory=list)  # keys of the full blocks of token_ids so far
    num_registered: int = 0  # blocks[:num_registered] are cached (or duplicate a cached block)

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V are not cached yet."""
        return len(self.token_ids) - self.num_cached

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class Chunk:
    """Tokens seq.token_ids[start:start + length] go through this step's prefill forward."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token (so its logits give the next token)."""
        return self.start + self.length == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    prefill: list[Chunk] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    """Waiting (FIFO; preempted sequences re-enter at the front) and running (by arrival) queues."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 32,
        max_prefill_tokens: int = 2048,
        watermark_blocks: int | None = None,
        enable_prefix_caching: bool = True,
    ):
        checks.require_positive("Scheduler", max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens)
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        # Blocks kept free when admitting while others run, so running sequences can grow a little
        # before anything must be preempted (admitting into a full cache would preempt at once).
        self.watermark_blocks = (
            max(1, block_manager.num_blocks // 100) if watermark_blocks is None else watermark_blocks
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by seq_idx
        self.num_preemptions = 0
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens whose K/V were reused
        # Blocks registered by the last schedule() before their forward ran: (sequence, index, block).
        self._pending: list[tuple[Sequence, int, int]] = []

    # ---- queues -----------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        need = self.bm.blocks_for(seq.num_tokens + seq.max_tokens - 1)
        if need > self.bm.num_blocks:
            raise ValueError(
                f"Scheduler: request {seq.request_id!r} needs {need} KV blocks but the cache has {self.bm.num_blocks}"
            )
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (stop, length or abort) and frees its blocks at once."""
        if seq.status is Status.RUNNING:
            i = self._running_index(seq)
            del self.running[i]
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._cache_computed(seq)
        self.bm.free(seq.blocks)
        seq.num_registered = 0
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.time()

    def _running_index(self, seq: Sequence) -> int:
        i = bisect.bisect_left(self.running, seq.seq_idx, key=lambda s: s.seq_idx)
        if i >= len(self.running) or self.running[i] is not seq:
            raise RuntimeError(f"Scheduler: sequence {seq.request_id!r} is not in the running queue")
        return i

    def _preempt(self, seq: Sequence, out: SchedulerOutput, cache: bool = True) -> None:
        del self.running[self._running_index(seq)]
        if cache:
            self._cache_computed(seq)
        self.bm.free(seq.blocks)
        seq.num_cached = seq.num_registered = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    # ---- one step ---------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.enable_prefix_caching:
            self._settle_pending(out)
            for seq in self.running:
                self._cache_computed(seq)  # blocks the last decode forward completed
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.num_pending != 1:
                continue
            while not self.bm.grow(seq.blocks, seq.num_cached + 1):
                victim = self.running[-1]  # the newest running sequence; possibly seq itself
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                out.decode.append(seq)

        budget = self.max_prefill_tokens
        for seq in self.running:
            if budget <= 0:
                break
            if seq.num_pending > 1:
                n = min(seq.num_pending, budget)
                out.prefill.append(Chunk(seq, seq.num_cached, n))
                self._cache_scheduled(seq, seq.num_cached + n)
                budget -= n
        # Preempted sequences are not re-admitted in the step that preempted them: the cache is short.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            hits = self._lookup(seq)
            need = self.bm.blocks_for(seq.num_tokens) - len(hits)
            revived = sum(1 for b in hits if self.bm.ref_count(b) == 0)  # evictable ones stop being free
            reserve = self.watermark_blocks if self.running else 0
            if need + revived + reserve > self.bm.num_free:
                break
            self.waiting.popleft()
            self.bm.acquire(hits)  # before allocate(), which could otherwise evict them
            seq.blocks = hits + self.bm.allocate(need)
            seq.num_registered = len(hits)
            seq.num_cached = len(hits) * self.bm.block_size
            if self.enable_prefix_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += seq.num_cached
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.seq_idx)
            out.admitted.append(seq)
            n = min(seq.num_pending, budget)
            out.prefill.append(Chunk(seq, seq.num_cached, n))
            self._cache_scheduled(seq, seq.num_cached + n)
            budget -= n
        return out

    # ---- prefix cache -----------------------------------------------------------------------------

    def _hash_blocks(self, seq: Sequence, n: int) -> None:
        """Extends seq.block_hashes to its first n full blocks (the keys depend on the tokens only, so
        they survive preemption)."""
        bs, hs, toks = self.bm.block_size, seq.block_hashes, seq.token_ids
        while len(hs) < n:
            i = len(hs)
            extra = seq.cache_extra_keys if i == 0 else ()
            hs.append(hash_block(hs[-1] if hs else None, toks[i * bs : (i + 1) * bs], extra))

    def _lookup(self, seq: Sequence) -> list[int]:
        """The cached blocks of seq's longest full-block prefix that leaves its last token to compute."""
        if not self.enable_prefix_caching:
            return []
        n = (seq.num_tokens - 1) // self.bm.block_size
        self._hash_blocks(seq, n)
        hits = []
        for h in seq.block_hashes[:n]:
            b = self.bm.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def _register(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Registers seq's full blocks within its first num_tokens tokens; the indices newly cached."""
        n = min(num_tokens // self.bm.block_size, len(seq.blocks))
        if n <= seq.num_registered:
            return []
        self._hash_blocks(seq, n)
        new = [i for i in range(seq.num_registered, n) if self.bm.register(seq.blocks[i], seq.block_hashes[i])]
        seq.num_registered = n
        return new

    def _cache_computed(self, seq: Sequence) -> None:
        if self.enable_prefix_caching and seq.blocks:
            self._register(seq, seq.num_cached)

    def _cache_scheduled(self, seq: Sequence, end: int) -> None:
        """Registers the blocks this step's prefill chunk (ending at token `end`) completes."""
        if self.enable_prefix_caching:
            self._pending += [(seq, i, seq.blocks[i]) for i in self._register(seq, end)]

    def _settle_pending(self, out: SchedulerOutput) -> None:
        """Checks that last step's prefill computed the blocks registered for it. If it did not (its
        forward raised), those blocks are forgotten and every sequence that took one as computed is
        preempted (recomputed later), so nobody reads or shares K/V that were never written."""
        pending, self._pending = self._pending, []
        bad: dict[int, Sequence] = {}
        for seq, i, b in pending:
            if seq.num_cached < (i + 1) * self.bm.block_size:
                bad[b] = seq
                self.bm.uncache(b)
                if seq.status is Status.RUNNING:
                    seq.num_registered = min(seq.num_registered, i)
        if not bad:
            return
        bs = self.bm.block_size
        for seq in list(self.running):
            relies = any(b in bad and bad[b] is not seq and seq.num_cached > j * bs for j, b in enumerate(seq.blocks))
            if relies:
                self._preempt(seq, out, cache=False)

    def check_invariants(self) -> None:
        """Raises if the block bookkeeping is inconsistent: each block's reference count is the number
        of sequences holding it, no sequence holds a block twice, waiting ones hold none, a shared block
        is cached, and the block manager's own maps agree. For tests and debugging."""
        self.bm.check()
        holders = [0] * self.bm.num_blocks
        for seq in self.running:
            if len(set(seq.blocks)) != len(seq.blocks):
                raise AssertionError(f"Scheduler: {seq.request_id!r} holds a block twice: {seq.blocks}")
            if len(seq.blocks) < self.bm.blocks_for(seq.num_cached):
                raise AssertionError(f"Scheduler: {seq.request_id!r} has cached tokens beyond its blocks")
            for b in seq.blocks:
                holders[b] += 1
        for seq in self.waiting:
            if seq.blocks or seq.num_cached or seq.num_registered:
                raise AssertionError(f"Scheduler: waiting {seq.request_id!r} still holds blocks")
        for b, n in enumerate(holders):
            if self.bm.ref_count(b) != n:
                raise AssertionError(f"Scheduler: block {b} has {self.bm.ref_count(b)} references, {n} holders")
            if n > 1 and not self.bm.is_cached(b):
                raise AssertionError(f"Scheduler: block {b} is shared by {n} sequences but not cached")
