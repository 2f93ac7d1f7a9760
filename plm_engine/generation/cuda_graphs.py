"""Decode steps under CUDA graphs, one graph per batch-size bucket.

A decode step of b sequences runs the graph of the smallest bucket >= b. The static input buffers are
filled with the b real rows and padded: padding rows read token 0 at position 0, write nowhere (slot -1,
which write_kv_cache skips) and attend over one cached token of block 0, so they cost a little work and
change nothing; their logits are dropped. The block table has a fixed width (the most blocks a sequence
can own), so one graph serves every context length.

The padding logic is plain tensor code and runs on the CPU too (eagerly), which is how it is tested
without a GPU; capture needs CUDA.
"""

from __future__ import annotations

import torch

from plm_engine.layers.kv_cache import KVCache, PagedBatch
from plm_engine.ops import checks


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to max_batch (always included)."""
    checks.require_positive("default_buckets", max_batch=max_batch)
    out = [b for b in (1, 2, 4) if b < max_batch]
    out += list(range(8, max_batch, 8))
    return out + [max_batch]


class DecodeGraphs:
    """Static decode inputs padded to buckets, with one captured graph per bucket on CUDA.

    model: has forward_tokens(input_ids, positions, kv_cache, batch) -> logits (batch, vocab).
    """

    def __init__(
        self,
        model,
        kv_cache: KVCache,
        max_batch: int,
        max_blocks_per_seq: int,
        buckets: list[int] | None = None,
        device=None,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.device = torch.device(device) if device is not None else kv_cache.k[0].device
        self.buckets = sorted(set(buckets)) if buckets else default_buckets(max_batch)
        if self.buckets[0] < 1:
            raise ValueError(f"DecodeGraphs: buckets must be >= 1, got {self.buckets}")
        self.max_blocks_per_seq = max_blocks_per_seq
        mb = self.buckets[-1]
        dev = self.device
        self.input_ids = torch.zeros(mb, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(mb, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((mb,), -1, dtype=torch.int64, device=dev)
        self.block_table = torch.zeros(mb, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.cache_seqlens = torch.ones(mb, dtype=torch.int32, device=dev)
        self.cu_seqlens = torch.arange(mb + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._pool: torch.cuda.graphs._POOL_HANDLE | None = None

    def bucket_for(self, n: int) -> int | None:
        """The smallest bucket that holds n rows, or None when n exceeds the largest."""
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def batch(self, bucket: int) -> PagedBatch:
        return PagedBatch(
            cu_seqlens=self.cu_seqlens[: bucket + 1],
            max_seqlen=1,
            slot_mapping=self.slot_mapping[:bucket],
            block_table=self.block_table[:bucket],
            cache_seqlens=self.cache_seqlens[:bucket],
            is_decode=True,
            has_prefix=False,
        )

    def fill(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        block_rows: list[list[int]],
        cache_seqlens: list[int],
    ) -> int:
        """Copies n real rows into the static buffers and pads them to a bucket; returns the bucket."""
        n = len(input_ids)
        bucket = self.bucket_for(n)
        if bucket is None:
            raise ValueError(f"DecodeGraphs: batch of {n} exceeds the largest bucket {self.buckets[-1]}")
        width = self.max_blocks_per_seq
        if any(len(r) > width for r in block_rows):
            raise ValueError(f"DecodeGraphs: a sequence owns more than {width} blocks")
        table = torch.zeros(bucket, width, dtype=torch.int32)
        for i, r in enumerate(block_rows):
            table[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
        pad = bucket - n
        host = torch.tensor(
            [input_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad, cache_seqlens + [1] * pad],
            dtype=torch.int64,
        )
        nb = self.non_blocking
        self.input_ids[:bucket].copy_(host[0], non_blocking=nb)
        self.positions[:bucket].copy_(host[1], non_blocking=nb)
        self.slot_mapping[:bucket].copy_(host[2], non_blocking=nb)
        self.cache_seqlens[:bucket].copy_(host[3].to(torch.int32), non_blocking=nb)
        self.block_table[:bucket].copy_(table, non_blocking=nb)
        return bucket

    @property
    def non_blocking(self) -> bool:
        return self.device.type == "cuda"

    def _forward(self, bucket: int) -> torch.Tensor:
        # The buffers hold what the engine built and checked: no value checks (none is possible in capture).
        with checks.trusted():
            return self.model.forward_tokens(
                self.input_ids[:bucket], self.positions[:bucket], self.kv_cache, self.batch(bucket)
            )

    @torch.no_grad()
    def capture(self) -> None:
        """Captures one graph per bucket (largest first, so smaller ones reuse its memory pool)."""
        if self.device.type != "cuda":
            raise RuntimeError("DecodeGraphs.capture needs a CUDA device; on the CPU decode runs eagerly")
        self.slot_mapping.fill_(-1)
        self.cache_seqlens.fill_(1)
        self.block_table.zero_()
        self.input_ids.zero_()
        self.positions.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                for _ in range(2):  # warm-up: kernels compiled and autotuned outside the capture
                    self._forward(b)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for b in reversed(self.buckets):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                self.outputs[b] = self._forward(b)
            if self._pool is None:
                self._pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def run(self, input_ids, positions, slots, block_rows, cache_seqlens) -> torch.Tensor:
        """Logits (n, vocab) of one decode step of n sequences: the graph replay when captured, else an
        eager forward over the same padded buffers."""
        n = len(input_ids)
        bucket = self.fill(input_ids, positions, slots, block_rows, cache_seqlens)
        g = self.graphs.get(bucket)
        if g is None:
            return self._forward(bucket)[:n]
        g.replay()
        return self.outputs[bucket][:n]
