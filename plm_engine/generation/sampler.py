"""Sampling parameters and on-device sampling for a batch of sequences.

The Sampler turns one step's logits (n, vocab) into n token ids with every filter applied on the
device; the only host transfer is the final ids (and log-probs when asked for), packed into one tensor.

Order of operations: the logit changes first (structured output's grammar mask through our fused
kernel, plm_engine.ops.apply_token_bitmask_; then logit_bias and min_tokens' ban on stop tokens as one
sparse scatter-add for the whole batch), then as in vLLM penalties on those logits, temperature, top-k,
top-p, min-p, and one draw. Greedy rows (temperature 0) take the argmax of the penalized logits. Random
draws use the exponential race (argmax of p / E, E ~ Exp(1)), which samples exactly from p; a row with
a seed draws its E from its own torch.Generator, so its tokens do not depend on which requests share
the batch. Reported log-probs are those of the model's raw distribution (log_softmax of the unmodified
logits), as vLLM reports them by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from plm_engine.generation.structured import StepBitmask, StructuredOutputParams
from plm_engine.ops import checks
from plm_engine.ops.token_mask import apply_token_bitmask_

# OpenAI's logit_bias range: larger magnitudes are clamped to it.
LOGIT_BIAS_LIMIT = 100.0


@dataclass
class SamplingParams:
    """How to sample one request's continuation.

    temperature: 0 means greedy. top_k: 0 turns it off. top_p, min_p: nucleus and min-p filters (1.0 / 0.0
    turn them off). repetition_penalty (HF/CTRL style, on prompt and output tokens), presence_penalty and
    frequency_penalty (OpenAI style, on output tokens). seed: per-request generator. max_tokens: new tokens
    at most (capped at the context). stop_token_ids / stop (strings, never emitted): extra stops; the
    model's end-of-sequence tokens stop too unless ignore_eos. logprobs: report the sampled token's
    log-prob and the top-n alternatives. truncate_prompt_tokens: keep only the last k prompt tokens
    (otherwise a prompt longer than the context is an error). n: only 1 is supported.
    min_tokens: the stop tokens (end-of-sequence unless ignore_eos, and stop_token_ids) cannot be sampled,
    and stop strings do not match, before this many new tokens. logit_bias: {token id: bias} added to
    the logits, each bias clamped to [-100, 100] as OpenAI does (ids are range-checked by the engine).
    structured: a grammar the output must match (plm_engine.generation.structured); the sequence ends
    with finish_reason "stop" once the grammar is complete. skip_special_tokens: leave special tokens
    out of the text. include_stop_str_in_output: keep a matched stop string at the end of the text.
    prompt_logprobs: report each prompt token's log-prob given the tokens before it, and the top-n
    alternatives (one extra forward over the prompt when the request is first scheduled).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    n: int = 1
    min_tokens: int = 0
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    structured: StructuredOutputParams | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        def bad(name, rule):
            raise ValueError(f"SamplingParams: {name} must be {rule}, got {getattr(self, name)!r}")

        def num(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "a finite number")
            return v

        def integer(name, lo, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad(name, f"an integer >= {lo}" + (" or None" if allow_none else ""))

        if num("temperature") < 0:
            bad("temperature", ">= 0 (0 = greedy)")
        integer("top_k", 0)
        if not 0 < num("top_p") <= 1:
            bad("top_p", "in (0, 1]")
        if not 0 <= num("min_p") <= 1:
            bad("min_p", "in [0, 1]")
        if num("repetition_penalty") <= 0:
            bad("repetition_penalty", "> 0 (1 = off)")
        if not -2 <= num("presence_penalty") <= 2:
            bad("presence_penalty", "in [-2, 2]")
        if not -2 <= num("frequency_penalty") <= 2:
            bad("frequency_penalty", "in [-2, 2]")
        integer("seed", 0, allow_none=True)
        integer("max_tokens", 1)
        integer("logprobs", 0, allow_none=True)
        integer("truncate_prompt_tokens", 1, allow_none=True)
        if self.n != 1:
            bad("n", "1 (several samples per request are not supported; submit the prompt n times)")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "a sequence of non-empty strings")
        self.stop_token_ids = tuple(self.stop_token_ids)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "a sequence of non-negative token ids")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "a bool")
        integer("min_tokens", 0)
        integer("prompt_logprobs", 0, allow_none=True)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "a dict {token id: bias}")
            bias = {}
            for t, b in self.logit_bias.items():
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    bad("logit_bias", "keyed by non-negative token ids")
                if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
                    bad("logit_bias", "a dict of finite numbers")
                bias[t] = float(min(max(b, -LOGIT_BIAS_LIMIT), LOGIT_BIAS_LIMIT))
            self.logit_bias = bias or None
        if self.structured is not None and not isinstance(self.structured, StructuredOutputParams):
            bad("structured", "a StructuredOutputParams or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def changes_logits(self) -> bool:
        """Whether the sampler changes this request's logits before drawing (grammar, bias, min_tokens)."""
        return self.structured is not None or self.logit_bias is not None or self.min_tokens > 0


@dataclass
class SampleResult:
    """Host-side results of one sampling call, one entry per row."""

    token_ids: list[int]
    logprobs: list[dict | None]


class Sampler:
    """Samples a batch of rows, each with its own SamplingParams.

    Penalty state lives in per-slot device tensors: slot s (one per running request that has penalties)
    holds `output_counts[s]` (how often each token was generated) and `prompt_mask[s]` (which tokens the
    prompt holds). The engine assigns slots; the sampler updates the counts with the tokens it samples.
    eos_token_ids: the model's end-of-sequence tokens, which min_tokens holds back (unless ignore_eos).
    """

    def __init__(self, vocab_size: int, max_slots: int, device=None, eos_token_ids=()):
        self.vocab_size = vocab_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.max_slots = max_slots
        self.eos_token_ids = tuple(sorted(int(t) for t in eos_token_ids))
        self._bitmask = StepBitmask(vocab_size, self.device)
        self._counts: torch.Tensor | None = None  # (max_slots, vocab) int32, allocated on first use
        self._prompt_mask: torch.Tensor | None = None  # (max_slots, vocab) bool
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self._generators: dict[int, torch.Generator] = {}

    # ---- per-request state ------------------------------------------------------------------------

    def new_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def acquire_slot(self, prompt_ids: list[int], output_ids: list[int]) -> int:
        """A penalty slot for a request, filled from its prompt and the tokens it generated so far."""
        if not self._free_slots:
            raise RuntimeError(f"Sampler: all {self.max_slots} penalty slots are in use")
        if self._counts is None or self._prompt_mask is None:
            self._counts = torch.zeros(self.max_slots, self.vocab_size, dtype=torch.int32, device=self.device)
            self._prompt_mask = torch.zeros(self.max_slots, self.vocab_size, dtype=torch.bool, device=self.device)
        s = self._free_slots.pop()
        self._counts[s].zero_()
        self._prompt_mask[s].zero_()
        if prompt_ids:
            self._prompt_mask[s, torch.tensor(prompt_ids, dtype=torch.long, device=self.device)] = True
        if output_ids:
            ids = torch.tensor(output_ids, dtype=torch.long, device=self.device)
            self._counts[s].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        return s

    def release_slot(self, slot: int | None) -> None:
        if slot is not None:
            self._free_slots.append(slot)

    # ---- the batch --------------------------------------------------------------------------------

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        slots: list[int | None] | None = None,
        generators: list[torch.Generator | None] | None = None,
        matchers: list | None = None,
        output_lens: list[int] | None = None,
    ) -> SampleResult:
        """logits: (n, vocab) for n rows; params/slots/generators/matchers/output_lens: one per row (slot
        None: no penalties; generator None: the default generator; matcher: the row's GrammarMatcher or
        None; output_lens: tokens generated so far, for min_tokens). Returns the sampled ids, and
        log-prob dicts for rows whose params ask for logprobs. One device-to-host transfer; the grammar
        masks and the sparse logit changes are built on the host and copied to the device."""
        n = logits.shape[0]
        if len(params) != n:
            raise ValueError(f"Sampler.sample: {len(params)} params for {n} rows of logits")
        slots = slots if slots is not None else [None] * n
        generators = generators if generators is not None else [None] * n
        tokens, lp_packed, top_n = self.sample_device(logits, params, slots, generators, matchers, output_lens)
        if lp_packed is None:
            return SampleResult(tokens.tolist(), [None] * n)
        host = lp_packed.cpu()  # one transfer: ids and log-probs packed in float64
        ids = host[:, 0].long().tolist()
        out: list[dict | None] = []
        for i, p in enumerate(params):
            if p.logprobs is None:
                out.append(None)
                continue
            row = host[i]
            k = p.logprobs
            top_ids = row[2 : 2 + top_n].long().tolist()[:k]
            top_lp = row[2 + top_n : 2 + 2 * top_n].tolist()[:k]
            out.append({"token_id": ids[i], "logprob": float(row[1]), "top": list(zip(top_ids, top_lp))})
        return SampleResult(ids, out)

    def sample_device(self, logits, params, slots, generators, matchers=None, output_lens=None):
        """Everything on the device. Returns (token ids (n,) int64, packed log-probs (n, 2 + 2k) float64
        or None, k)."""
        n, v = logits.shape
        raw = logits.float()
        x = raw
        if any(p.changes_logits for p in params) or any(m is not None for m in matchers or ()):
            # The changes are in place: keep the raw logits for log-probs, and never touch the caller's.
            x = raw.clone() if raw is logits or any(p.logprobs is not None for p in params) else raw
            self._apply_grammar(x, matchers)
            self._apply_sparse(x, params, output_lens)
        if any(s is not None for s in slots) and any(p.has_penalties for p in params):
            x = self._apply_penalties(x, params, slots)

        all_greedy = all(p.greedy for p in params)
        if all_greedy:
            # max's indices are argmax's (the first maximum; NaN wins as in argmax) at a fraction of the
            # cost on the CPU, where argmax is not vectorised (benchmarks/results/NOTES.md).
            tokens = x.max(dim=-1).indices
        else:
            tokens = self._sample_random(x, params, generators)

        if any(s is not None for s in slots):
            self._update_counts(tokens, slots)

        want = [p.logprobs for p in params if p.logprobs is not None]
        if not want:
            return tokens, None, 0
        k = min(max(want), v)
        logp = torch.log_softmax(raw, dim=-1)
        chosen = logp.gather(1, tokens[:, None])
        if k > 0:
            top_lp, top_ids = logp.topk(k, dim=-1)
        else:
            top_lp = top_ids = logp.new_zeros(n, 0)
        packed = torch.cat([tokens[:, None].double(), chosen.double(), top_ids.double(), top_lp.double()], dim=1)
        return tokens, packed, k

    def _row_tensor(self, values, dtype, dev):
        return torch.tensor(values, dtype=dtype, device=dev)

    def _apply_penalties(self, x, params, slots):
        dev = x.device
        rows = [i for i, s in enumerate(slots) if s is not None]
        idx = torch.tensor([slots[i] for i in rows], dtype=torch.long, device=dev)
        counts = self._counts.index_select(0, idx)  # (r, vocab) int32
        pmask = self._prompt_mask.index_select(0, idx)  # (r, vocab) bool
        rep = self._row_tensor([params[i].repetition_penalty for i in rows], torch.float32, dev)[:, None]
        pres = self._row_tensor([params[i].presence_penalty for i in rows], torch.float32, dev)[:, None]
        freq = self._row_tensor([params[i].frequency_penalty for i in rows], torch.float32, dev)[:, None]
        sub = x[rows] if len(rows) != x.shape[0] else x.clone()
        seen = pmask | (counts > 0)
        # Repetition penalty (CTRL): divide positive logits, multiply negative ones, for every seen token.
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalized, sub)
        sub = sub - freq * counts.float() - pres * (counts > 0).float()
        if len(rows) == x.shape[0]:
            return sub
        x = x.clone()
        x[rows] = sub
        return x

    def _apply_grammar(self, x, matchers):
        """Disallowed tokens of every constrained row -> -inf: masks filled on the host, one copy, our
        fused kernel on the device."""
        if not matchers:
            return
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        bitmask, row_idx = self._bitmask.build(rows, [matchers[i] for i in rows])
        with checks.trusted():  # the sampler built the row indices itself
            apply_token_bitmask_(x, bitmask, row_idx)

    def _apply_sparse(self, x, params, output_lens):
        """logit_bias, and -inf on the stop tokens of rows still short of min_tokens: one scatter-add over
        the flattened (n, vocab) logits for the whole batch."""
        n, v = x.shape
        flat_idx: list[int] = []
        vals: list[float] = []
        for i, p in enumerate(params):
            if p.logit_bias:
                for t, b in p.logit_bias.items():
                    if t >= v:
                        raise ValueError(f"Sampler: logit_bias token id {t} is out of range for a vocabulary of {v}")
                    flat_idx.append(i * v + t)
                    vals.append(b)
            if p.min_tokens > 0 and (output_lens is None or output_lens[i] < p.min_tokens):
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
                for t in sorted(banned):
                    if t < v:
                        flat_idx.append(i * v + t)
                        vals.append(float("-inf"))
        if not flat_idx:
            return
        idx = torch.tensor(flat_idx, dtype=torch.long, device=x.device)
        val = torch.tensor(vals, dtype=x.dtype, device=x.device)
        x.view(-1).index_put_((idx,), val, accumulate=True)

    def _update_counts(self, tokens, slots):
        rows = [i for i, s in enumerate(slots) if s is not None]
        idx = torch.tensor([slots[i] for i in rows], dtype=torch.long, device=tokens.device)
        self._counts.index_put_(
            (idx, tokens[rows]), torch.ones(len(rows), dtype=torch.int32, device=tokens.device), accumulate=True
        )

    def filter_logits(self, x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, top-k, top-p and min-p on (n, vocab) fp32 logits: dropped tokens become -inf.
        Greedy rows are left at temperature 1 (their token is the argmax anyway)."""
        dev = x.device
        temp = self._row_tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32, dev)
        x = x / temp[:, None]
        if any(p.top_k > 0 for p in params) or any(p.top_p < 1 for p in params):
            x = self._top_k_top_p(x, params)
        if any(p.min_p > 0 for p in params):
            min_p = self._row_tensor([p.min_p for p in params], torch.float32, dev)[:, None]
            probs = torch.softmax(x, dim=-1)
            x = x.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
        return x

    def _sample_random(self, x, params, generators):
        n, v = x.shape
        dev = x.device
        greedy_tokens = x.max(dim=-1).indices
        probs = torch.softmax(self.filter_logits(x, params), dim=-1)
        e = torch.empty_like(probs)
        seeded = [i for i, g in enumerate(generators) if g is not None]
        if len(seeded) < n:
            e.exponential_()
        for i in seeded:
            e[i].exponential_(generator=generators[i])
        sampled = (probs / e).max(dim=-1).indices
        greedy = self._row_tensor([p.greedy for p in params], torch.bool, dev)
        return torch.where(greedy, greedy_tokens, sampled)

    def _top_k_top_p(self, x, params):
        n, v = x.shape
        dev = x.device
        sorted_x, order = x.sort(dim=-1, descending=True)
        rank = torch.arange(v, device=dev)[None, :]
        k = self._row_tensor([p.top_k if 0 < p.top_k < v else v for p in params], torch.long, dev)[:, None]
        drop = rank >= k
        if any(p.top_p < 1 for p in params):
            top_p = self._row_tensor([p.top_p for p in params], torch.float32, dev)[:, None]
            probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
            # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the mass before it
            # already does. The first token always survives.
            before = probs.cumsum(dim=-1) - probs
            drop = drop | (before >= top_p)
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        return torch.empty_like(x).scatter_(1, order, sorted_x)
