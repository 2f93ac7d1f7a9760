"""Structured output: a request's grammar compiled by llguidance into a matcher that masks each step.

    params = SamplingParams(structured=StructuredOutputParams(json={"type": "object", ...}))

The grammar engine is llguidance (a well-kept Rust library, abi3 wheel, no dependencies): it compiles a
JSON schema, a regex, a list of choices or a Lark/GBNF grammar against the model's tokenizer, and per
step its matcher fills a packed int32 bitmask of the tokens that keep the output inside the grammar.
Our part is the glue:

- GrammarCompiler (one per engine) turns StructuredOutputParams into a GrammarMatcher, with a clear
  ValueError for a grammar llguidance rejects (the server's 400);
- StepBitmask fills every constrained row's mask on the host (in parallel, llguidance's executor) into
  one buffer together with the rows' indices, so the sampler copies it to the device once per step and
  our fused kernel (plm_engine.ops.apply_token_bitmask_) applies it to the logits there. Nothing here
  reads a device value;
- after sampling, the engine feeds each token to its matcher (GrammarMatcher.accept); a matcher that
  can take no more tokens ends its sequence with finish_reason "stop".

JSON is compiled compact by default (", " and ": " separators, no free whitespace) so a small model
cannot pad its output with whitespace until max_tokens; a schema's own "x-guidance" options win.
llguidance is imported only when a request asks for structured output (the `serve` extra installs it).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import torch

_JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_KINDS = ("json", "json_object", "regex", "choice", "grammar")


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - the serve extra installs it
        raise ValueError(
            "structured output needs llguidance (pip install 'plm_engine[serve]' or pip install llguidance)"
        ) from e
    return llguidance


@dataclass
class StructuredOutputParams:
    """What the output must match; exactly one field is set (as vLLM's guided decoding).

    json: a JSON schema (dict or its JSON text); json_object: any JSON object (OpenAI's
    response_format {"type": "json_object"}); regex: a regular expression (Rust regex syntax); choice:
    one of these strings exactly; grammar: a Lark or GBNF grammar (llguidance's syntax).
    """

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None

    def __post_init__(self):
        if not isinstance(self.json_object, bool):
            raise ValueError(f"StructuredOutputParams: json_object must be a bool, got {self.json_object!r}")
        given = [k for k in _KINDS if (getattr(self, k) if k == "json_object" else getattr(self, k) is not None)]
        if len(given) != 1:
            raise ValueError(
                f"StructuredOutputParams: set exactly one of {', '.join(_KINDS)}; got "
                f"{', '.join(given) if given else 'none'}"
            )
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValueError(f"StructuredOutputParams: json must be a schema (dict or JSON text), got {self.json!r}")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"StructuredOutputParams: {name} must be a non-empty string")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice) or not self.choice:
                raise ValueError("StructuredOutputParams: choice must be a non-empty list of strings")
            self.choice = tuple(self.choice)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if (getattr(self, k) if k == "json_object" else getattr(self, k) is not None))

    def to_grammar(self) -> str:
        """llguidance's grammar text for this constraint (not yet validated)."""
        llg = _llguidance()
        M = llg.LLMatcher
        if self.json_object:
            return M.grammar_from_json_schema({"type": "object"}, defaults=_JSON_DEFAULTS)
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"the JSON schema is not valid JSON: {e}") from e
            if not isinstance(schema, dict):
                raise ValueError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
            return M.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS)
        if self.regex is not None:
            return M.grammar_from_regex(self.regex)
        if self.choice is not None:
            # One alternative per choice, each a quoted Lark literal.
            return M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        try:
            return llg.grammar_from("grammar", self.grammar)
        except ValueError as e:
            raise ValueError(f"the grammar is not valid Lark or GBNF: {e}") from e


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, kind: str):
        self._m = matcher
        self.kind = kind

    def accept(self, token_id: int) -> bool:
        """Advances past a sampled token; False if the grammar did not allow it (the matcher is then in
        an error state)."""
        return bool(self._m.consume_token(int(token_id)))

    @property
    def done(self) -> bool:
        """No token but end-of-sequence can follow (or the matcher failed): the sequence ends here."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str:
        return self._m.get_error()

    def fill(self, row: torch.Tensor) -> None:
        """Writes the allowed-token bits into row (ceil(vocab / 32),) int32, contiguous, on the CPU."""
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)


class GrammarCompiler:
    """Compiles StructuredOutputParams against one tokenizer into GrammarMatchers.

    tokenizer: plm_engine.models.tokenizer.Tokenizer (its Rust `tokenizers` pipeline is handed to
    llguidance as JSON, offline); vocab_size: the model's vocabulary (the mask width; ids the tokenizer
    does not have are never allowed); eos_token_ids: the tokens that end a sequence, allowed once the
    grammar is complete. The llguidance tokenizer is built on first use (~0.3 s for a 49k vocabulary)
    and shared; thread-safe, so requests can be compiled off the engine's thread.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = sorted(int(t) for t in eos_token_ids)
        self._lltok = None
        self._lock = threading.Lock()

    def _ll_tokenizer(self):
        with self._lock:
            if self._lltok is None:
                llg = _llguidance()
                backend = getattr(self.tokenizer, "backend", None)
                if backend is None or not hasattr(backend, "to_str"):
                    raise ValueError("structured output needs the model's tokenizer (a plm_engine Tokenizer)")
                if self.tokenizer.vocab_size > self.vocab_size:
                    raise ValueError(
                        f"structured output: the tokenizer has {self.tokenizer.vocab_size} tokens but the model "
                        f"only {self.vocab_size}"
                    )
                self._lltok = llg.LLTokenizer(
                    backend.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_token_ids or None
                )
            return self._lltok

    def validate(self, spec: StructuredOutputParams) -> str:
        """The spec's grammar, checked against this tokenizer; ValueError (with llguidance's reason) for a
        bad one. The server calls it before a streamed response starts, so a bad grammar is a 400."""
        grammar = spec.to_grammar()
        err = _llguidance().LLMatcher.validate_grammar(grammar, self._ll_tokenizer())
        if err:
            raise ValueError(f"structured output: the {spec.kind} constraint is invalid: {_first_line(err)}")
        return grammar

    def matcher(self, spec: StructuredOutputParams) -> GrammarMatcher:
        """A fresh matcher for one sequence; ValueError (with llguidance's reason) for a bad grammar."""
        if not isinstance(spec, StructuredOutputParams):
            raise ValueError(f"structured output: expected StructuredOutputParams, got {type(spec).__name__}")
        llg = _llguidance()
        grammar = self.validate(spec)
        m = llg.LLMatcher(self._ll_tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"structured output: the {spec.kind} constraint is invalid: {_first_line(m.get_error())}")
        return GrammarMatcher(m, spec.kind)


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0][:300] if msg.strip() else "rejected by the grammar engine"


_executor = None
_executor_lock = threading.Lock()


def _parallel_executor():
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = _llguidance().LLExecutor()
        return _executor


class StepBitmask:
    """A reusable host buffer holding one step's masks and their logits rows: [m * words mask words |
    m row indices] int32, contiguous (pinned when the device is a GPU), so one copy moves both."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.words = (vocab_size + 31) // 32
        self.device = torch.device(device)
        self._buf: torch.Tensor | None = None

    def _buffer(self, m: int) -> torch.Tensor:
        need = m * (self.words + 1)
        if self._buf is None or self._buf.numel() < need:
            pin = self.device.type == "cuda"
            self._buf = torch.empty(
                max(need, 2 * (self._buf.numel() if self._buf is not None else 0)), dtype=torch.int32, pin_memory=pin
            )
        return self._buf[:need]

    def build(self, rows: list[int], matchers: list[GrammarMatcher]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fills the masks of `matchers` (for logits rows `rows`) and moves them to the device.
        Returns (bitmask (m, words) int32, rows (m,) int32), both views of one device buffer."""
        m, w = len(rows), self.words
        buf = self._buffer(m)
        masks = buf[: m * w].view(m, w)
        if m == 1:
            matchers[0].fill(masks[0])
        else:
            _parallel_executor().unsafe_compute_mask_ptr(
                [(g._m, i) for i, g in enumerate(matchers)], masks.data_ptr(), w * 4, m
            )
        buf[m * w :] = torch.tensor(rows, dtype=torch.int32)
        # The buffer is reused next step; the step ends with a host read of the sampled tokens, so this
        # copy has finished by then.
        dev = buf.to(self.device, non_blocking=True) if self.device.type != "cpu" else buf
        return dev[: m * w].view(m, w), dev[m * w :]
