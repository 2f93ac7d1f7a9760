"""Decode steps on the CPU as one compiled unit per batch-size bucket (torch.compile, C++ wrapper).

An eager decode step calls ~10 ops per layer from Python: at batch 1 on a small model that dispatch
costs as much as the kernels. Here the model's decode forward is compiled once per bucket with
inductor's C++ wrapper: the whole step is one C++ function that calls the kernels (our custom ops
through the dispatcher, inductor's fused code for the glue) with no Python in between. The padding
into buckets is DecodeGraphs' (cuda_graphs.py), so each bucket's graph has fixed shapes. (The KV cache's
block count is one of them: left symbolic, it costs a guard per cache tensor every step (measured in
benchmarks/results/NOTES.md); ModelRunner rounds its default instead, so that the disk cache serves the
next start.)

Off unless asked for (Engine(compile=True), PLM_ENGINE_COMPILE=1): see compile_enabled for why.
Compilation is lazy (a bucket compiles the first time a batch of its size runs) and goes through
inductor's on-disk caches (FX graph and AOTAutograd caches), so a second process reuses the code.
The step runs under torch.inference_mode(): no autograd dispatch (and no Python autograd wrapper of a
custom op) runs per kernel call. Where compiling fails (no C++ compiler, say), the runner warns once
and decodes eagerly.
"""

from __future__ import annotations

import os
import sys
import types
import warnings
from collections.abc import Callable

import torch

from plm_engine.generation.cuda_graphs import DecodeGraphs
from plm_engine.layers.kv_cache import KVCache, PagedBatch

# Largest bucket compiled on the CPU: beyond it the step's kernels take so long that Python dispatch is
# noise, and padding a large batch to the next power of two would waste compute.
CPU_MAX_BUCKET = 64


def compile_enabled(flag: bool | None) -> bool:
    """An explicit flag wins; otherwise PLM_ENGINE_COMPILE ("1" turns it on; default off).

    Off by default, by measurement (benchmarks/results/NOTES.md, "Compiled decode step"): a bucket's
    first compile costs far more than it saves over `plm-engine generate`'s 128 tokens, with a cold
    inductor cache and even with a warm one. A long-running process (a server, a benchmark) turns it on.
    """
    if flag is not None:
        return bool(flag)
    return os.environ.get("PLM_ENGINE_COMPILE", "0").strip().lower() in ("1", "true", "yes", "on")


def cpu_buckets(max_batch: int) -> list[int]:
    """Powers of two up to min(max_batch, CPU_MAX_BUCKET), and that cap itself."""
    top = min(max_batch, CPU_MAX_BUCKET)
    out = [b for b in (1, 2, 4, 8, 16, 32, 64) if b < top]
    return out + [top]


def _decode_forward(model, kv_cache: KVCache, input_ids, positions, slot_mapping, block_table, cache_seqlens, cu):
    batch = PagedBatch(
        cu_seqlens=cu,
        max_seqlen=1,
        slot_mapping=slot_mapping,
        block_table=block_table,
        cache_seqlens=cache_seqlens,
        is_decode=True,
        has_prefix=False,
    )
    # The engine built and checked these tables: nothing is read back (and nothing can be, traced).
    return model._forward_tokens(input_ids, positions, kv_cache, batch, None)


def _fresh_function(bucket: int):
    # torch.compile keeps its compiled entries on the Python code object. A code object of its own per
    # (runner, bucket) gives each one exactly one entry: no recompile limit shared by every engine of the
    # process, and no guard search across buckets.
    code = _decode_forward.__code__
    name = f"decode_bucket_{bucket}"
    if sys.version_info >= (3, 11):  # co_qualname is new in 3.11
        code = code.replace(co_name=name, co_qualname=name)
    else:
        code = code.replace(co_name=name)
    return types.FunctionType(code, _decode_forward.__globals__, code.co_name)


class CompiledDecode(DecodeGraphs):
    """DecodeGraphs' padded static buffers, with one torch.compile'd forward per bucket on the CPU."""

    def __init__(self, model, kv_cache: KVCache, max_batch: int, max_blocks_per_seq: int, buckets=None):
        super().__init__(
            model,
            kv_cache,
            max_batch,
            max_blocks_per_seq,
            buckets=buckets or cpu_buckets(max_batch),
            device=kv_cache.k[0].device,
        )
        if self.device.type != "cpu":
            raise ValueError(f"CompiledDecode runs on the CPU, got {self.device}")
        # Built before tracing, the RoPE tables are graph inputs; traced, they would be recomputed per step.
        if model.config.arch == "llama":
            model.rope_tables(self.device)
        self.compiled: dict[int, Callable] = {}
        self.failed: str | None = None  # why compiling failed, once it has (then every step is eager)

    def _compiled(self, bucket: int):
        fn = self.compiled.get(bucket)
        if fn is None:
            fn = torch.compile(_fresh_function(bucket), fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
            self.compiled[bucket] = fn
        return fn

    # Both modes, whatever the caller's: the compiled entry is only valid under the global state it was
    # compiled in (guards on grad mode are not evaluated once compiled, see below).
    @torch.no_grad()
    @torch.inference_mode()
    def run(self, input_ids, positions, slots, block_rows, cache_seqlens) -> torch.Tensor:
        """Logits (n, vocab) of one decode step of n sequences, through the bucket's compiled forward."""
        n = len(input_ids)
        b = self.fill(input_ids, positions, slots, block_rows, cache_seqlens)
        args = (
            self.model,
            self.kv_cache,
            self.input_ids[:b],
            self.positions[:b],
            self.slot_mapping[:b],
            self.block_table[:b],
            self.cache_seqlens[:b],
            self.cu_seqlens[: b + 1],
        )
        if self.failed is not None:
            return self._forward(b)[:n]
        if b not in self.compiled:
            try:
                return self._compiled(b)(*args)[:n]
            except Exception as e:  # fullgraph: a failed compile raises before any kernel ran
                self.failed = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"plm_engine: compiling the CPU decode step failed, decoding eagerly ({self.failed[:300]})",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return self._forward(b)[:n]
        # Each bucket's function has one compiled entry, always called with the same model, cache and
        # buffers (only their values change): its guards can only pass, and checking them (hundreds of
        # parameters) would cost more than some of the step's kernels.
        try:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self.compiled[b](*args)[:n]
        except RuntimeError as e:
            # torch.compile declines its cached code under a Python-level tracer or profiler
            # (sys.settrace / sys.setprofile: a debugger) and would recompile: run eagerly instead.
            if "skip_guard_eval_unsafe" not in str(e):
                raise
        return self._forward(b)[:n]
