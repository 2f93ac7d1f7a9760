"""OpenAI API request/response models (the subset clients use) and OpenAI-style errors.

Requests are validated by pydantic: wrong types and the ranges the OpenAI API documents are rejected
here, before any work, and turned into a 400 `{"error": {...}}` by the app. Unknown request fields are
kept (extra="allow") but ignored, as the OpenAI API and vLLM do, so clients that send newer optional
fields keep working; fields that would change the output and that we cannot honour yet get a 400 from
server/unsupported.py.

Extra sampling knobs that the OpenAI API lacks but our engine has (top_k, min_p, repetition_penalty,
ignore_eos, and vLLM's stop_token_ids, min_tokens, truncate_prompt_tokens, skip_special_tokens,
include_stop_str_in_output) are accepted at the top level of the body, as vLLM does (`extra_body` in
the openai client). Structured output comes as OpenAI's response_format, vLLM's guided_json /
guided_regex / guided_choice / guided_grammar or structured_outputs, or llama.cpp's grammar. Fields that
would change the output and that we do not implement are a 400 (server/unsupported.py).
"""

from __future__ import annotations

import time
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# ---- errors -----------------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


# Client input quoted back in an error message is cut to about this many characters.
ECHO_LIMIT = 200
MESSAGE_LIMIT = 1000


def clip(value, limit: int = ECHO_LIMIT) -> str:
    """repr(value) cut to `limit` characters, for quoting client input in an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(text: str) -> str:
    # A lone surrogate cannot be encoded as UTF-8 and would turn the error reply itself into a 500.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


class APIError(Exception):
    """An error the client caused (4xx) or that we report as a server error (5xx), in OpenAI's shape.
    headers: extra response headers (Retry-After on a 429)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    """`{"error": {"message", "type", "param", "code"}}`, what the openai client turns into an APIError."""
    param = _printable(param)[:ECHO_LIMIT] if param is not None else None
    return {"error": {"message": _printable(message), "type": type, "param": param, "code": code}}


# ---- requests ---------------------------------------------------------------------------------------


class _Request(BaseModel):
    # Unknown fields are kept so server/unsupported.py can refuse the output-changing ones by name.
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Engine extensions (vLLM-style extra body fields).
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(default=0, ge=0)
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured output: at most one of these.
    response_format: dict[str, Any] | None = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    grammar: str | None = None  # llama.cpp's name for a GBNF grammar
    structured_outputs: dict[str, Any] | None = None  # vLLM >= 0.10's form of guided_*


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None


class TextPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template first."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template adds them)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(_Request):
    model: str
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


# ---- responses --------------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class _Response(BaseModel):
    """The head every completion, chat completion and chunk starts with (subclasses pin `object`)."""

    id: str
    object: str
    created: int = Field(default_factory=_now)
    model: str


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class _ChatChoice(BaseModel):
    """What a whole-response choice and a streamed chunk's choice share (subclasses add the text)."""

    index: int
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatChoice(_ChatChoice):
    message: ChatResponseMessage


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_ChatChoice):
    delta: ChatDelta


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "plm_engine"
    max_model_len: int | None = None
    weights: str | None = None  # what runs, e.g. "Q4_1 + Q8_0 (GGUF, native; float32 compute)"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
