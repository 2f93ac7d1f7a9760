"""The model runner: owns the model's KV cache and runs the forwards of one engine step.

It sizes and allocates the paged cache, runs each decode step as one unit (CUDA graphs per batch-size
bucket on a GPU; on the CPU one C++ call by default, native_decode.py, or a torch.compile'd forward
per bucket when compiling is asked for, compiled_decode.py), sets the CPU thread count, and turns the
scheduler's work (prefill chunks, decode sequences) into the packed tensors of one forward each. It
knows nothing about requests, sampling or text: the engine does.
"""

from __future__ import annotations

import math
import os

import torch

from plm_engine.generation.compiled_decode import CompiledDecode, compile_enabled
from plm_engine.generation.cuda_graphs import DecodeGraphs
from plm_engine.generation.native_decode import NativeDecode, native_enabled, unsupported_reason
from plm_engine.generation.scheduler import Chunk, Sequence
from plm_engine.layers.kv_cache import PagedBatch

# Default KV budget: a share of the free memory, capped (the CPU is shared; a GPU has other tenants).
_GPU_MEMORY_FRACTION = 0.5
_CPU_MEMORY_FRACTION = 0.1
_CPU_CACHE_CAP_BYTES = 1 << 30


def _available_cpu_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (sched_getaffinity and the /sys topology:
    SMT siblings count once); the number of allowed CPUs where the topology cannot be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as f:
                package = f.read().strip()
            with open(base + "core_id") as f:
                core = f.read().strip()
        except OSError:
            return len(cpus)
        cores.add((package, core))
    return max(len(cores), 1)


def cpu_threads(num_threads: int | None = None) -> int:
    """The thread count for CPU work: num_threads, else PLM_ENGINE_NUM_THREADS, else the physical cores.
    One thread per core: a second thread on an SMT sibling shares the core's load ports and caches, and
    the bandwidth-bound decode step gains nothing from it."""
    if num_threads is None:
        env = os.environ.get("PLM_ENGINE_NUM_THREADS", "").strip()
        if env:
            try:
                num_threads = int(env)
            except ValueError:
                raise ValueError(f"PLM_ENGINE_NUM_THREADS must be an integer >= 1, got {env!r}") from None
            if num_threads < 1:
                raise ValueError(f"PLM_ENGINE_NUM_THREADS must be an integer >= 1, got {env!r}")
    if num_threads is None:
        return physical_cores()
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
    return num_threads


class ModelRunner:
    """A causal model, its paged KV cache and its decode step as one unit (CUDA graphs, native or compiled).

    kv_cache_tokens: cache size in tokens (default: a share of free memory, capped at max_num_seqs full
    contexts), rounded up to whole blocks of block_size tokens. compile: on the CPU, run decode steps
    through a torch.compile'd forward per batch bucket (default: PLM_ENGINE_COMPILE, off unless "1").
    native: on the CPU without compile, run decode steps as one C++ call where the model is planned
    (default: PLM_ENGINE_NATIVE_DECODE, on unless "0"); decode_path says which step runs, and why.
    num_threads: on the CPU, torch's intra-op threads (default: PLM_ENGINE_NUM_THREADS, else the
    physical cores); set for the whole process. forward_inputs: for encoder-decoder
    models, a callable (a forward's sequences, in batch order) -> forward_tokens' extra keyword
    arguments (their cross-attention keys/values, generation/seq2seq.py); decode then runs eagerly.
    """

    def __init__(
        self,
        model,
        max_num_seqs: int,
        kv_cache_tokens: int | None = None,
        block_size: int = 16,
        cuda_graphs: bool = True,
        compile: bool | None = None,
        num_threads: int | None = None,
        forward_inputs=None,
        native: bool | None = None,
    ):
        self.model = model
        self.forward_inputs = forward_inputs
        self.config = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.context_len = int(self.config.max_position_embeddings)
        self.block_size = block_size
        kv_layers = self.config.n_decoder_layers or self.config.n_layers  # the layers that hold a KV cache
        per_token = 2 * kv_layers * self.config.n_kv_heads * self.config.head_dim * p.element_size()
        if kv_cache_tokens is None:
            kv_cache_tokens = self._default_cache_tokens(per_token, max_num_seqs)
        if kv_cache_tokens < block_size:
            raise ValueError(f"Engine: kv_cache_tokens must be >= block_size ({block_size}), got {kv_cache_tokens}")
        self.num_blocks = math.ceil(kv_cache_tokens / block_size)
        self.kv_cache = model.allocate_kv_cache(
            self.num_blocks, block_size=block_size, dtype=self.dtype, device=self.device
        )
        self.cache_tokens = self.num_blocks * block_size
        self.max_blocks_per_seq = math.ceil(min(self.context_len, self.cache_tokens) / block_size)
        self.graphs: DecodeGraphs | None = None
        self.native: NativeDecode | None = None
        self.decode_path = "eager"
        if self.device.type == "cpu":
            threads = cpu_threads(num_threads)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            if compile_enabled(compile) and forward_inputs is None:
                self.graphs = CompiledDecode(model, self.kv_cache, max_num_seqs, self.max_blocks_per_seq)
                self.decode_path = "compiled"
            elif (native_enabled() if native is None else native) and forward_inputs is None:
                why = unsupported_reason(model, self.kv_cache)
                if why is None:
                    self.native = NativeDecode(model, self.kv_cache)
                    self.decode_path = "native"
                else:
                    self.decode_path = f"eager (native step: {why})"
        elif cuda_graphs and self.device.type == "cuda" and forward_inputs is None:
            graphs = DecodeGraphs(model, self.kv_cache, max_num_seqs, self.max_blocks_per_seq, device=self.device)
            graphs.capture()
            self.graphs = graphs
            self.decode_path = "cuda_graphs"

    def _default_cache_tokens(self, per_token: int, max_num_seqs: int) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * _GPU_MEMORY_FRACTION)
        else:
            budget = min(int(_available_cpu_bytes() * _CPU_MEMORY_FRACTION), _CPU_CACHE_CAP_BYTES)
        tokens = min(budget // per_token, max_num_seqs * self.context_len)
        blocks = max(tokens // self.block_size, 1)
        # Rounded down to three significant bits (at most 1/8 less): the free memory differs a little from
        # one start to the next, and the compiled CPU decode step is specialised to the cache's size, so a
        # round size lets inductor's disk cache serve the next start.
        blocks = blocks >> max(blocks.bit_length() - 3, 0) << max(blocks.bit_length() - 3, 0)
        return blocks * self.block_size

    def prefill(self, chunks: list[Chunk]) -> tuple[torch.Tensor, list[Sequence]]:
        """One packed forward over the prefill chunks; logits of the chunks that end a prompt, and their
        sequences (in that order)."""
        bs = self.block_size
        ids, slots, cu, lens, rows, index, seqs = [], [], [0], [], [], [], []
        pos: list[int] = []
        for ch in chunks:
            seq, a, b = ch.seq, ch.start, ch.start + ch.length
            ids += seq.token_ids[a:b]
            pos += range(a, b)
            blocks = seq.blocks
            slots += [blocks[p // bs] * bs + p % bs for p in range(a, b)]
            cu.append(cu[-1] + ch.length)
            lens.append(b)
            rows.append(blocks)
            if ch.samples:
                index.append(cu[-1] - 1)
                seqs.append(seq)
        width = max(len(r) for r in rows)
        table = [r + [0] * (width - len(r)) for r in rows]
        dev = self.device
        batch = PagedBatch(
            cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=dev),
            max_seqlen=max(ch.length for ch in chunks),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_table=torch.tensor(table, dtype=torch.int32, device=dev),
            cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=dev),
            is_decode=False,
            has_prefix=any(ch.start > 0 for ch in chunks),
            seq_bounds=tuple(cu),
        )
        logits_index = torch.tensor(index or [cu[-1] - 1], dtype=torch.int64, device=dev)
        extra = self.forward_inputs([ch.seq for ch in chunks]) if self.forward_inputs else {}
        logits = self.model.forward_tokens(
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(pos, dtype=torch.int64, device=dev),
            self.kv_cache,
            batch,
            logits_index=logits_index,
            **extra,
        )
        for ch in chunks:
            ch.seq.num_cached += ch.length
        return logits, seqs

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One forward of the decode batch (each sequence's last token); logits (len(seqs), vocab)."""
        bs = self.block_size
        ids = [s.token_ids[-1] for s in seqs]
        pos = [s.num_cached for s in seqs]
        slots = [s.blocks[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]
        lens = [p + 1 for p in pos]
        rows = [s.blocks for s in seqs]
        if self.native is not None and self.native.usable_now():
            logits = self.native.run(ids, pos, slots, rows, lens)
        elif self.graphs is not None and self.graphs.bucket_for(len(seqs)) is not None:
            logits = self.graphs.run(ids, pos, slots, rows, lens)
        else:
            dev = self.device
            width = max(len(r) for r in rows)
            n = len(seqs)
            batch = PagedBatch(
                cu_seqlens=torch.arange(n + 1, dtype=torch.int32, device=dev),
                max_seqlen=1,
                slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
                block_table=torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=dev),
                cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=dev),
                is_decode=True,
                has_prefix=False,
            )
            logits = self.model.forward_tokens(
                torch.tensor(ids, dtype=torch.int64, device=dev),
                torch.tensor(pos, dtype=torch.int64, device=dev),
                self.kv_cache,
                batch,
                **(self.forward_inputs(seqs) if self.forward_inputs else {}),
            )
        for s in seqs:
            s.num_cached += 1
        return logits
