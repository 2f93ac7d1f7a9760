"""Encoder-decoder generation (BART, Marian, T5) in the engine: the encoder once per request, its keys and
values kept per request for cross-attention, the decoder over the paged KV cache like a causal model.

A request's prompt is the encoder's source. Its Sequence (a Seq2SeqSequence) is the decoder's side only:
prompt_token_ids = [decoder_start_token_id], token_ids = that + the generated tokens. The scheduler, the
block manager and the ModelRunner handle it like any sequence (prefill of the decoder prompt, decode
steps, preemption and recompute); this module adds what differs:

- max_tokens / sequence: the engine's make_sequence for a source prompt;
- encode: one packed encoder forward over the step's newly admitted requests, then each decoder layer's
  cross-attention keys/values of every source, kept until the request ends. They are computed once and
  never grow, so they live outside the paged cache (a preempted request keeps them);
- forward_inputs: the ModelRunner's hook, the CrossKV of one forward's sequences in batch order. The
  per-request tensors are concatenated once per batch composition and reused while it stays the same
  (a decode batch changes only when a request joins or ends);
- release: a finished or aborted request's tensors.

Every table is built from host lists: nothing here reads a device value (the hot-path rule).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from plm_engine.generation.sampler import SamplingParams
from plm_engine.generation.scheduler import Sequence
from plm_engine.layers.attention import CrossKV
from plm_engine.models.seq2seq import Seq2SeqTransformer


@dataclass(eq=False)
class Seq2SeqSequence(Sequence):
    """A Sequence whose prompt_token_ids are the decoder's prompt; encoder_token_ids is the request's."""

    encoder_token_ids: list[int] = field(default_factory=list)


@dataclass
class _Source:
    """One request's encoded source: per decoder layer, its keys and values (src_len, n_heads, head_dim)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.k[0].shape[0]


class Seq2SeqGeneration:
    """The encoder side of an Engine over a Seq2SeqTransformer."""

    _BATCH_CACHE = 2  # batch compositions kept (the prefill's and the decode's)

    def __init__(self, model: Seq2SeqTransformer) -> None:
        c = model.config
        if c.decoder_start_token_id is None:
            raise ValueError("Engine: this encoder-decoder config has no decoder_start_token_id")
        self.start_id = int(c.decoder_start_token_id)
        self.model = model
        self.config = c
        self.device = next(model.parameters()).device
        self.source_limit = int(c.max_position_embeddings)
        self._sources: dict[int, _Source] = {}  # seq_idx -> encoded source
        self._batches: OrderedDict[tuple[int, ...], CrossKV] = OrderedDict()

    # ---- requests (engine.make_sequence) ------------------------------------------------------------

    def max_tokens(self, ids: list[int], params: SamplingParams, context_len: int, cache_tokens: int) -> int:
        """Checks a source prompt; the most tokens the request may generate. The decoder holds the start
        token plus the output (the last one never fed back), within its context and the cache."""
        if params.prompt_logprobs is not None:
            raise ValueError(
                "Engine: prompt_logprobs need a decoder-only model (an encoder-decoder does not score its source)"
            )
        if len(ids) > self.source_limit:
            raise ValueError(
                f"Engine: the prompt has {len(ids)} tokens but the encoder's context holds {self.source_limit}; "
                f"shorten it or set truncate_prompt_tokens"
            )
        return min(params.max_tokens, context_len - 1, cache_tokens)

    def sequence(
        self, ids: list[int], request_id: str, seq_idx: int, params: SamplingParams, max_tokens: int
    ) -> Seq2SeqSequence:
        return Seq2SeqSequence(
            request_id=request_id,
            seq_idx=seq_idx,
            prompt_token_ids=[self.start_id],
            params=params,
            max_tokens=max_tokens,
            encoder_token_ids=list(ids),
        )

    # ---- the encoder (engine.step, for the admitted sequences) --------------------------------------

    @staticmethod
    def source_ids(seq: Sequence) -> list[int]:
        """The request's prompt: the encoder's input."""
        if not isinstance(seq, Seq2SeqSequence):
            raise TypeError(f"an encoder-decoder engine got a {type(seq).__name__}, not a Seq2SeqSequence")
        return seq.encoder_token_ids

    def encode(self, seqs: list[Sequence]) -> None:
        """Runs the encoder once over the sources not encoded yet (packed, one forward) and keeps each
        source's cross-attention keys and values."""
        todo = [s for s in seqs if s.seq_idx not in self._sources]
        if not todo:
            return
        sources = [self.source_ids(s) for s in todo]
        lens = [len(ids) for ids in sources]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        dev = self.device
        ids = torch.tensor([t for src in sources for t in src], dtype=torch.int64, device=dev)
        positions = torch.tensor([p for n in lens for p in range(n)], dtype=torch.int64, device=dev)
        cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
        enc = self.model.encode(ids, cu_t, max(lens), positions)
        kv = self.model.cross_kv(enc, cu_t, max(lens))
        ks, vs = kv.k or [], kv.v or []
        for i, s in enumerate(todo):
            a, b = cu[i], cu[i + 1]
            self._sources[s.seq_idx] = _Source([k[a:b] for k in ks], [v[a:b] for v in vs])

    def forward_inputs(self, seqs: list[Sequence]) -> dict:
        """ModelRunner's hook: forward_tokens' cross=CrossKV for these sequences, in this order."""
        key = tuple(s.seq_idx for s in seqs)
        cross = self._batches.get(key)
        if cross is None:
            sources = [self._sources[i] for i in key]
            cu = [0]
            for src in sources:
                cu.append(cu[-1] + src.length)
            n_layers = len(sources[0].k)
            cat = lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts)
            cross = CrossKV(
                torch.tensor(cu, dtype=torch.int32, device=self.device),
                max(src.length for src in sources),
                k=[cat([src.k[layer] for src in sources]) for layer in range(n_layers)],
                v=[cat([src.v[layer] for src in sources]) for layer in range(n_layers)],
            )
            self._batches[key] = cross
            while len(self._batches) > self._BATCH_CACHE:
                self._batches.popitem(last=False)
        else:
            self._batches.move_to_end(key)
        return {"cross": cross}

    def release(self, seq: Sequence) -> None:
        """Forgets a finished or aborted request's source (and the batches that held it)."""
        if self._sources.pop(seq.seq_idx, None) is not None:
            for key in [k for k in self._batches if seq.seq_idx in k]:
                del self._batches[key]

    @property
    def num_sources(self) -> int:
        return len(self._sources)
