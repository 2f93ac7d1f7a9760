"""The generation engine: requests in, streamed tokens and text out, over a paged KV cache.

    engine = Engine("smollm2-135m")
    outs = engine.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].text)

One step() = schedule, then at most two forwards run by the ModelRunner (model_runner.py: the packed
prefill chunks, and the decode batch), one sampling call over both forwards' logits, and the host-side
bookkeeping (stops, text, outputs). AsyncEngine (async_engine.py) drives an Engine from asyncio.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from plm_engine.generation.block_manager import BlockManager
from plm_engine.generation.model_runner import ModelRunner
from plm_engine.generation.sampler import Sampler, SamplingParams
from plm_engine.generation.scheduler import Scheduler, Sequence
from plm_engine.generation.seq2seq import Seq2SeqGeneration
from plm_engine.generation.structured import GrammarCompiler
from plm_engine.layers.linear import weight_format
from plm_engine.models.memory import release_freed_memory
from plm_engine.ops import checks

log = logging.getLogger("plm_engine.generation")


@dataclass
class RequestOutput:
    """One request's state after a step: everything so far, plus this step's delta."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    logprobs: list[dict] | None
    num_prompt_tokens: int
    metrics: dict = field(default_factory=dict)
    prompt_logprobs: list[dict | None] | None = None  # with params.prompt_logprobs: None for the first token


class Engine:
    """Continuous-batching generator. Not thread-safe: use AsyncEngine to drive it from asyncio.

    model: a model name or path for plm_engine.load_model, or a loaded Transformer or Seq2SeqTransformer
    (encoder-decoder: the prompt is the encoder's source; see generation/seq2seq.py). tokenizer: a
    Tokenizer, a name or path, or None (loaded with a named model; without one prompts must be token ids
    and outputs have no text). kv_cache_tokens: cache size in tokens (default: a share of free memory,
    capped at max_num_seqs full contexts). max_prefill_tokens: prefill chunk size per step.
    enable_prefix_caching: reuse the cached K/V of full blocks a new prompt shares with earlier ones
    (scheduler.py; stats() counts the tokens looked up and reused).
    compile, num_threads: the CPU decode step compiled per batch bucket, and torch's CPU threads
    (defaults: PLM_ENGINE_COMPILE, PLM_ENGINE_NUM_THREADS or the physical cores; see ModelRunner).
    dequantize, quantize: for a model named by path or name, load_model's (a GGUF's blocks stay native
    unless dequantize; quantize="int8" | "int4" stores the linear weights in blocks); `weights` says what runs (e.g. "Q4_1 + Q8_0 (GGUF, native; float32 compute)").
    """

    def __init__(
        self,
        model="smollm2-135m",
        tokenizer=None,
        dtype=None,
        device=None,
        max_num_seqs: int = 32,
        kv_cache_tokens: int | None = None,
        block_size: int = 16,
        max_prefill_tokens: int = 2048,
        cuda_graphs: bool = True,
        enable_prefix_caching: bool = True,
        compile: bool | None = None,
        num_threads: int | None = None,
        dequantize: bool = False,
        quantize: str | None = None,
    ):
        if isinstance(dtype, str):
            dtype = {
                "float32": torch.float32,
                "fp32": torch.float32,
                "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16,
                "float16": torch.float16,
                "fp16": torch.float16,
            }.get(dtype, dtype)
            if isinstance(dtype, str):
                raise ValueError(f"Engine: unknown dtype {dtype!r} (float32, bfloat16 or float16)")
        if isinstance(model, (str, os.PathLike)):
            from plm_engine.models import load_model, load_tokenizer

            name = str(model)
            model = load_model(name, dtype=dtype, device=device, dequantize=dequantize, quantize=quantize)
            if tokenizer is None:
                tokenizer = load_tokenizer(name)
        elif dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
        if isinstance(tokenizer, (str, os.PathLike)):
            from plm_engine.models import load_tokenizer

            tokenizer = load_tokenizer(str(tokenizer))
        checks.require_positive("Engine", max_num_seqs=max_num_seqs)
        self.model = model.eval()
        self.weights = weight_format(model)  # e.g. "Q4_1 + Q8_0 (GGUF, native; float32 compute)"
        self.tokenizer = tokenizer
        self.config = model.config
        if self.config.arch == "bert":
            raise ValueError("Engine: generation needs a causal model (llama or gpt2), got a bert encoder")
        self.seq2seq = Seq2SeqGeneration(model) if self.config.is_encoder_decoder else None
        self.runner = ModelRunner(
            model,
            max_num_seqs,
            kv_cache_tokens,
            block_size,
            cuda_graphs,
            compile=compile,
            num_threads=num_threads,
            forward_inputs=self.seq2seq.forward_inputs if self.seq2seq is not None else None,
        )
        r = self.runner
        self.device, self.dtype, self.context_len = r.device, r.dtype, r.context_len
        self.block_size, self.cache_tokens = r.block_size, r.cache_tokens
        self.block_manager = BlockManager(r.num_blocks, block_size)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=max_num_seqs,
            max_prefill_tokens=max_prefill_tokens,
            # A decoder's K/V depend on its source, and every decoder prompt is the start token: nothing to share.
            enable_prefix_caching=enable_prefix_caching and self.seq2seq is None,
        )
        self.eos_token_ids = self._eos_ids()
        vocab = self.config.lm_vocab_size  # what the LM head scores (an encoder-decoder's target vocabulary)
        self.sampler = Sampler(vocab, max_slots=max_num_seqs, device=self.device, eos_token_ids=self.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, vocab, self.eos_token_ids)

        self._seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._pending_outputs: list[RequestOutput] = []
        self._counters = dict(prompt_tokens_total=0, generation_tokens_total=0, requests_finished=0, requests_aborted=0)
        release_freed_memory()  # the KV cache's and the decode plan's build-time temporaries

    def _eos_ids(self) -> frozenset[int]:
        if self.tokenizer is not None and getattr(self.tokenizer, "stop_token_ids", None):
            return frozenset(int(t) for t in self.tokenizer.stop_token_ids)
        eos = self.config.eos_token_id
        if eos is None:
            return frozenset()
        return frozenset([int(eos)] if isinstance(eos, int) else (int(t) for t in eos))

    @property
    def kv_cache(self):
        return self.runner.kv_cache

    @property
    def graphs(self):
        return self.runner.graphs

    @property
    def max_blocks_per_seq(self) -> int:
        return self.runner.max_blocks_per_seq

    # ---- requests ---------------------------------------------------------------------------------

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("Engine: a text prompt needs a tokenizer; pass token ids or give the engine one")
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        ids = list(prompt)
        v = self.config.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < v:
                raise ValueError(f"Engine: prompt token ids must be ints in [0, {v}), got {t!r}")
        return ids

    def make_sequence(
        self,
        prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> Sequence:
        """Validates and tokenizes a request without touching the scheduler (safe from another thread)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"Engine: params must be SamplingParams, got {type(params).__name__}")
        ids = self._prompt_ids(prompt)
        trunc = truncate_prompt_tokens if truncate_prompt_tokens is not None else params.truncate_prompt_tokens
        if trunc is not None:
            if isinstance(trunc, bool) or not isinstance(trunc, int) or trunc < 1:
                raise ValueError(f"Engine: truncate_prompt_tokens must be an int >= 1, got {trunc!r}")
            ids = ids[-trunc:]
        if not ids:
            raise ValueError("Engine: the prompt is empty (no tokens)")
        if self.seq2seq is not None:  # the prompt is the encoder's; the decoder starts from its start token
            max_tokens = self.seq2seq.max_tokens(ids, params, self.context_len, self.cache_tokens)
        else:
            limit = min(self.context_len, self.cache_tokens)
            if len(ids) >= limit:
                where = "context" if self.context_len <= self.cache_tokens else "KV cache"
                raise ValueError(
                    f"Engine: the prompt has {len(ids)} tokens but the {where} holds {limit}, which leaves "
                    f"no room to generate; shorten it or set truncate_prompt_tokens"
                )
            # Total tokens never exceed the context; the last sampled token is never fed back, so the cache
            # holds at most prompt + max_tokens - 1 of them.
            max_tokens = min(params.max_tokens, self.context_len - len(ids), self.cache_tokens - len(ids) + 1)
        if params.stop and self.tokenizer is None:
            raise ValueError("Engine: stop strings need a tokenizer")
        vocab = self.config.lm_vocab_size
        bad = next((t for t in params.logit_bias or () if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"Engine: logit_bias token id {bad} is out of range [0, {vocab})")
        if params.structured is not None and self.tokenizer is None:
            raise ValueError("Engine: structured output needs a tokenizer")
        idx = next(self._ids)
        rid = str(request_id) if request_id is not None else f"req-{idx}"
        seq: Sequence
        if self.seq2seq is not None:
            seq = self.seq2seq.sequence(ids, rid, idx, params, max_tokens)
        else:
            seq = Sequence(request_id=rid, seq_idx=idx, prompt_token_ids=ids, params=params, max_tokens=max_tokens)
        if params.seed is not None:
            seq.generator = self.sampler.new_generator(params.seed)
        if params.structured is not None:
            seq.matcher = self.grammars.matcher(params.structured)
        if self.tokenizer is not None:
            from plm_engine.models.tokenizer import StreamDecoder

            seq.decoder = StreamDecoder(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
        if params.logprobs is not None:
            seq.logprobs = []
        return seq

    def add_sequence(self, seq: Sequence) -> str:
        if seq.request_id in self._seqs:
            raise ValueError(f"Engine: request id {seq.request_id!r} is already in use")
        self.scheduler.add(seq)
        self._seqs[seq.request_id] = seq
        self._counters["prompt_tokens_total"] += len(self._request_prompt(seq))
        return seq.request_id

    def add_request(
        self,
        prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> str:
        """Queues a request (text or token ids); returns its id."""
        return self.add_sequence(self.make_sequence(prompt, params, request_id, truncate_prompt_tokens))

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees its KV blocks now; its final output (finish_reason "abort") comes with
        the next step(). False when the id is unknown or already finished."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.finished:
            return False
        self._finish(seq, "abort")
        self._counters["requests_aborted"] += 1
        self._pending_outputs.append(self._output(seq, [], ""))
        del self._seqs[request_id]
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict:
        return dict(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv_blocks_total=self.block_manager.num_blocks,
            kv_blocks_used=self.block_manager.num_used,
            num_preemptions=self.scheduler.num_preemptions,
            # prefix cache: tokens looked up, tokens reused, blocks holding cached K/V (used or evictable)
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
            prefix_cache_blocks=self.block_manager.num_cached,
            **self._counters,
        )

    # ---- one step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Runs one scheduling step; returns the outputs of requests that got tokens or finished."""
        outputs, self._pending_outputs = self._pending_outputs, []
        sched = self.scheduler.schedule()
        for seq in sched.preempted:
            self.sampler.release_slot(seq.slot)
            seq.slot = None
        for seq in sched.admitted:
            if seq.params.has_penalties:
                seq.slot = self.sampler.acquire_slot(seq.prompt_token_ids, seq.output_token_ids)
            if seq.params.prompt_logprobs is not None and seq.prompt_logprobs is None:
                seq.prompt_logprobs = self._score_prompt(seq.prompt_token_ids, seq.params.prompt_logprobs)
        if sched.empty:
            return outputs

        logits, sampling = [], []
        # Prompts were checked in add_request and the step's tables are built here: the forwards read no
        # tensor values on the host (ops/checks.py), so they can run under CUDA graphs or torch.compile.
        with checks.trusted():
            if self.seq2seq is not None and sched.admitted:
                self.seq2seq.encode(sched.admitted)  # once per request: its cross-attention keys/values
            if sched.prefill:
                lg, seqs = self.runner.prefill(sched.prefill)
                if seqs:
                    logits.append(lg)
                    sampling += seqs
            if sched.decode:
                logits.append(self.runner.decode(sched.decode))
                sampling += sched.decode
        if sched.prefill and not self.scheduler.waiting and self.device.type == "cpu":
            # The burst of prompts is in: the prefill's activations (~70 KB a token for the default model)
            # lie freed in the C heap, which keeps them resident through the decode steps that follow.
            release_freed_memory()
        if not sampling:
            return outputs
        all_logits = logits[0] if len(logits) == 1 else torch.cat(logits)
        params = [s.params for s in sampling]
        if all(
            p.greedy and p.logprobs is None and not p.changes_logits and s.slot is None
            for p, s in zip(params, sampling)
        ):
            tokens, lps = all_logits.argmax(dim=-1).tolist(), None
        else:
            res = self.sampler.sample(
                all_logits,
                params,
                [s.slot for s in sampling],
                [s.generator for s in sampling],
                [s.matcher for s in sampling],
                [s.num_output_tokens for s in sampling],
            )
            tokens, lps = res.token_ids, res.logprobs
        now = time.time()
        for i, (seq, tok) in enumerate(zip(sampling, tokens)):
            outputs.append(self._append_token(seq, tok, lps[i] if lps else None, now))
        return outputs

    # ---- bookkeeping ------------------------------------------------------------------------------

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.sampler.release_slot(seq.slot)
        seq.slot = None
        if self.seq2seq is not None:
            self.seq2seq.release(seq)

    def _request_prompt(self, seq: Sequence) -> list[int]:
        """The prompt as the request gave it: an encoder-decoder model's source, not its decoder prompt."""
        return self.seq2seq.source_ids(seq) if self.seq2seq is not None else seq.prompt_token_ids

    def _append_token(self, seq: Sequence, tok: int, lp: dict | None, now: float) -> RequestOutput:
        seq.token_ids.append(tok)
        self._counters["generation_tokens_total"] += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        if seq.logprobs is not None and lp is not None:
            seq.logprobs.append(lp)
        p = seq.params
        reason, piece = None, ""
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids):
            reason = "stop"  # a stop token adds no text
        elif seq.decoder is not None:
            piece = seq.decoder.push(tok)
        if seq.matcher is not None and reason is None:
            # The grammar saw this token; once it is complete (or, which the mask prevents, broken) the
            # sequence ends.
            if not seq.matcher.accept(tok):
                log.error("request %s: the grammar rejected token %d: %s", seq.request_id, tok, seq.matcher.error)
            if seq.matcher.done:
                reason = "stop"
        if reason is None and seq.num_output_tokens >= seq.max_tokens:
            reason = "length"
        if seq.decoder is not None:
            if reason is not None:
                piece += seq.decoder.flush()  # e.g. an incomplete UTF-8 character at the very end
            before = len(seq.text)
            seq.text += piece
            if p.stop and piece and seq.num_output_tokens >= p.min_tokens:
                cut = self._find_stop(seq.text, before, p.stop, p.include_stop_str_in_output)
                if cut is not None:
                    seq.text = seq.text[:cut]
                    reason = "stop"
        if reason is not None:
            self._finish(seq, reason)
            self._counters["requests_finished"] += 1
            del self._seqs[seq.request_id]
        # Hold back text that could be the start of a stop string until it is known not to be one.
        hold = 0 if seq.finished or not p.stop else max(len(s) for s in p.stop) - 1
        end = max(seq.emitted_len, len(seq.text) - hold)
        new_text = seq.text[seq.emitted_len : end]
        seq.emitted_len = end
        return self._output(seq, [tok], new_text)

    @staticmethod
    def _find_stop(text: str, new_from: int, stops: tuple[str, ...], include: bool = False) -> int | None:
        """Where the text ends at the earliest stop string that ends in the newly added text (it may
        start before): the stop string's start, or its end when it is to be included."""
        best = None
        for s in stops:
            i = text.find(s, max(0, new_from - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, i + len(s))
        return None if best is None else best[1 if include else 0]

    def _score_prompt(self, ids: list[int], k: int) -> list[dict | None]:
        """Log-probs of each prompt token given the ones before it (None for the first), with the top-k
        alternatives: one dense forward over the prompt, one device-to-host transfer."""
        with checks.trusted():  # the prompt was checked in make_sequence
            logits = self.model(torch.tensor([ids], dtype=torch.long, device=self.device)).logits[0, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1)  # (len - 1, vocab): position p predicts ids[p + 1]
        chosen = logp.gather(1, torch.tensor(ids[1:], dtype=torch.long, device=self.device)[:, None])
        k = min(k, logp.shape[-1])
        top_lp, top_ids = logp.topk(k, dim=-1) if k else (logp.new_zeros(len(ids) - 1, 0),) * 2
        host = torch.cat([chosen.double(), top_ids.double(), top_lp.double()], dim=1).cpu().tolist()
        out: list[dict | None] = [None]
        for t, row in zip(ids[1:], host):
            out.append({"token_id": t, "logprob": row[0], "top": list(zip(map(int, row[1 : 1 + k]), row[1 + k :]))})
        return out

    def _output(self, seq: Sequence, new_ids: list[int], new_text: str) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=self._request_prompt(seq),
            token_ids=seq.output_token_ids,
            text=seq.text[: seq.emitted_len] if not seq.finished else seq.text,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            num_prompt_tokens=len(self._request_prompt(seq)),
            prompt_logprobs=seq.prompt_logprobs,
            metrics=dict(
                arrival_time=seq.arrival_time, first_token_time=seq.first_token_time, finish_time=seq.finish_time
            ),
        )

    # ---- offline ----------------------------------------------------------------------------------

    def generate(self, prompts, params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Runs prompts (one, or a list of texts / token-id lists) to completion; outputs in input order.
        params: one SamplingParams for all, or a list with one per prompt."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        )
        if single:
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"Engine.generate: {len(params)} params for {len(prompts)} prompts")
            plist = list(params)
        else:
            plist = [params] * len(prompts)
        seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, plist)]
        ids = [self.add_sequence(s) for s in seqs]
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            try:
                from tqdm import tqdm

                bar = tqdm(total=len(ids), desc="generate")
            except ImportError:
                bar = None
        wanted = set(ids)
        while len(final) < len(ids):
            for out in self.step():
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
            if not self.has_unfinished() and len(final) < len(ids):
                raise RuntimeError("Engine.generate: the scheduler emptied before every request finished")
        if bar is not None:
            bar.close()
        return [final[i] for i in ids]
