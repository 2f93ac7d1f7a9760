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
"""

from __future__ import annotations

import bisect
import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from plm_engine.generation.block_manager import BlockManager
from plm_engine.generation.sampler import SamplingParams

if TYPE_CHECKING:
    import torch

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
    # Engine-side state: penalty slot, seeded generator, stream decoder and text, log-probs.
    slot: int | None = None
    generator: torch.Generator | None = None
    decoder: StreamDecoder | None = None
    text: str = ""
    emitted_len: int = 0
    logprobs: list | None = None

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
    ):
        if max_num_seqs < 1:
            raise ValueError(f"Scheduler: max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_prefill_tokens < 1:
            raise ValueError(f"Scheduler: max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
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
        self.bm.free(seq.blocks)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.time()

    def _running_index(self, seq: Sequence) -> int:
        i = bisect.bisect_left(self.running, seq.seq_idx, key=lambda s: s.seq_idx)
        if i >= len(self.running) or self.running[i] is not seq:
            raise RuntimeError(f"Scheduler: sequence {seq.request_id!r} is not in the running queue")
        return i

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        del self.running[self._running_index(seq)]
        self.bm.free(seq.blocks)
        seq.num_cached = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    # ---- one step ---------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
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
                budget -= n
        # Preempted sequences are not re-admitted in the step that preempted them: the cache is short.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            need = self.bm.blocks_for(seq.num_tokens)
            reserve = self.watermark_blocks if self.running else 0
            if need + reserve > self.bm.num_free:
                break
            self.waiting.popleft()
            seq.blocks = self.bm.allocate(need)
            seq.status = Status.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.seq_idx)
            out.admitted.append(seq)
            n = min(seq.num_pending, budget)
            out.prefill.append(Chunk(seq, seq.num_cached, n))
            budget -= n
        return out
