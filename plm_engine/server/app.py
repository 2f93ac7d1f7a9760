"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models,
/v1/models/{id}, /tokenize, /detokenize, /health and /metrics, over an AsyncEngine whose step loop runs
in the background.

Every generation request becomes one engine request per (prompt, sample): each is an async stream of
token deltas. Streaming responses send their headers at once and then relay the deltas as server-sent
events (`data: {...}` then `data: [DONE]`); non-streaming responses collect them. A client that goes
away cancels its streams, which aborts the engine requests and frees their KV blocks (the AsyncEngine
contract); for a non-streaming request we watch the connection ourselves, since Starlette only does so
while streaming.

The event loop only moves bytes: tokenization, chat-template rendering and detokenization of whole
prompts run in a small thread pool (the `tokenizers` batch API releases the GIL), so a 1 MiB prompt
does not stall the token streams of running requests.

Backpressure: at most `max_queued_requests` engine requests may wait for their first token; beyond
that a request gets 429 with Retry-After. A dead engine (its step kept failing) makes /health 503 and
new requests fail at once with 503.

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`): 400 for anything wrong
with the request (including what SamplingParams or the engine reject with ValueError), 401 for a
missing or wrong API key, 403 for a Host header this server does not answer for, 404 for an unknown
model or path, 408 / 413 for a body too slow / too large, 429 when the queue is full, 503 when the
engine is dead, 500 otherwise. Client input quoted in a message is cut to ~200 characters; a 5xx says
only what failed and the request id (every response carries X-Request-Id), the details go to the log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from plm_engine.generation.async_engine import EngineDeadError
from plm_engine.server import protocol as P
from plm_engine.server.metrics import CONTENT_TYPE, ServerMetrics
from plm_engine.server.middleware import Guard
from plm_engine.server.unsupported import CHAT, COMPLETIONS, reject_unsupported

log = logging.getLogger("plm_engine.server")

# What finish_reason may say (OpenAI's set, minus what this server never produces).
FINISH_REASONS = ("stop", "length")


@dataclass
class ServerLimits:
    """Request-size and backpressure limits (DESIGN.md section 8). Token limits come from max_model_len.

    max_queued_requests: engine requests admitted but not yet producing tokens; a request that would
    go past it gets 429 with `Retry-After: retry_after`. body_timeout: seconds a request body may take
    to arrive (None: no limit). tokenizer_threads: the pool that tokenizes and renders templates.
    """

    max_body_bytes: int = 1 << 20  # JSON body; a 1 MiB prompt is ~250k tokens, far past any context here
    max_choices: int = 64  # prompts x n in one generation request
    max_stop: int = 16  # stop strings
    max_embedding_inputs: int = 2048  # as the OpenAI API
    max_queued_requests: int = 256
    retry_after: int = 1
    body_timeout: float | None = 30.0
    tokenizer_threads: int = 2

    def __post_init__(self):
        for name in (
            "max_body_bytes",
            "max_choices",
            "max_stop",
            "max_embedding_inputs",
            "max_queued_requests",
            "retry_after",
            "tokenizer_threads",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ServerLimits: {name} must be a positive integer, got {v!r}")
        if self.body_timeout is not None and not self.body_timeout > 0:
            raise ValueError(f"ServerLimits: body_timeout must be > 0 seconds or None, got {self.body_timeout!r}")


def create_app(
    engine,
    embedder=None,
    api_key: str | None = None,
    model_name: str = "smollm2-135m",
    embedding_model_name: str = "minilm-l6",
    limits: ServerLimits | None = None,
    tokenizer=None,
    max_model_len: int | None = None,
    allowed_hosts: list[str] | None = None,
    cors_origins: list[str] | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` (an AsyncEngine) and optionally `embedder` (server.embeddings.Embedder).

    tokenizer defaults to the engine's. max_model_len (prompt + completion tokens) defaults to the
    smaller of the model's context and the KV cache's capacity, and may not exceed it. api_key: when
    set, every path but /health and /metrics needs `Authorization: Bearer <api_key>`. allowed_hosts: the
    Host header names accepted (None: any; the CLI passes the loopback names on a loopback bind).
    cors_origins: origins a browser may call from (CORS); none by default.
    """
    limits = limits or ServerLimits()
    inner = _sync_engine(engine)
    tokenizer = tokenizer if tokenizer is not None else inner.tokenizer
    capacity = _capacity(inner)
    if max_model_len is None:
        max_model_len = capacity
    elif not 1 <= max_model_len <= capacity:
        raise ValueError(
            f"max_model_len={max_model_len} is not in [1, {capacity}]: the model's context and the KV cache "
            f"hold {capacity} tokens per sequence"
        )
    server = _Server(
        engine, inner, tokenizer, max_model_len, model_name, embedder, embedding_model_name, limits, _fingerprint(inner)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has drained (or, past its graceful timeout, cancelled) the requests by now; stop the
        # engine's loop so the process can exit.
        server.pool.shutdown(wait=False, cancel_futures=True)
        result = engine.shutdown()
        if inspect.isawaitable(result):
            await result

    # No /docs or /openapi.json: the schema is OpenAI's, and an unauthenticated schema endpoint only helps probes.
    app = FastAPI(
        title="plm_engine OpenAI-compatible server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = server
    _add_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request):
        return await server.completions(req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        return await server.chat(req, request)

    @app.post("/v1/embeddings")
    async def embeddings(req: P.EmbeddingRequest):
        return await server.embeddings(req)

    @app.get("/v1/models")
    async def models():
        return P.ModelList(data=server.model_cards()).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        card = next((c for c in server.model_cards() if c.id == model_id), None)
        if card is None:
            raise P.APIError(404, f"model {P.clip(model_id)} not found", param="model", code="model_not_found")
        return card.model_dump()

    @app.post("/tokenize")
    async def tokenize(req: P.TokenizeRequest):
        return await server.tokenize(req)

    @app.post("/detokenize")
    async def detokenize(req: P.DetokenizeRequest):
        return await server.detokenize(req)

    @app.get("/health")
    async def health():
        try:
            server.stats()
            alive = server.alive()
        except Exception:  # an engine that cannot report its state is not healthy
            log.exception("health check: the engine cannot report its state")
            alive = False
        if not alive:
            why = "engine unhealthy: its step loop is not running"
            if getattr(engine, "dead_error", None) is not None:
                why += " (it stopped after repeated step failures; see the server log)"
            return JSONResponse(P.error_body(why, "service_unavailable", code="engine_dead"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    # Starlette wraps in reverse order of adding: the Guard sees every request first (after CORS, which
    # must answer browsers' unauthenticated preflight requests itself).
    app.add_middleware(
        Guard,
        metrics=server.metrics,
        api_key=api_key,
        max_body_bytes=limits.max_body_bytes,
        body_timeout=limits.body_timeout,
        allowed_hosts=allowed_hosts,
    )
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Request-Id"],
        )
    return app


# ---- request handling -------------------------------------------------------------------------------


@dataclass
class _Choice:
    """One engine request's accumulated output."""

    index: int
    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[dict | None] | None = None


class _Aborted(Exception):
    """The engine aborted a request the client still waits for (the server is shutting down)."""


class _Admission:
    """A request's places in the admission queue: one per engine request, given back when that request
    produces its first output (or ends), all of them when the HTTP response is over."""

    def __init__(self, server: _Server, n: int):
        self.server, self.left = server, n
        server.queued += n

    def started(self) -> None:
        if self.left:
            self.left -= 1
            self.server.queued -= 1

    def close(self) -> None:
        self.server.queued -= self.left
        self.left = 0


class _AdmittedStream(StreamingResponse):
    """A streaming response that gives its admission back however the stream ends (even never started)."""

    def __init__(self, body, admission: _Admission, **kw):
        super().__init__(body, **kw)
        self.admission = admission

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.admission.close()


class _Server:
    def __init__(
        self, engine, inner, tokenizer, max_model_len, model_name, embedder, embedding_model_name, limits, fingerprint
    ):
        from plm_engine.generation import SamplingParams

        self.engine, self.tok, self.max_model_len = engine, tokenizer, max_model_len
        self.model_name, self.embedder, self.embedding_model_name = model_name, embedder, embedding_model_name
        self.limits, self.SamplingParams, self.fingerprint = limits, SamplingParams, fingerprint
        self.vocab_size = min(int(tokenizer.vocab_size), int(inner.config.vocab_size))
        self.metrics = ServerMetrics(self.stats, model_name, max_model_len)
        self.pool = ThreadPoolExecutor(max_workers=limits.tokenizer_threads, thread_name_prefix="plm-tokenize")
        self.queued = 0  # engine requests admitted but without a first output yet

    def stats(self) -> dict:
        return self.engine.stats()

    def alive(self) -> bool:
        return bool(getattr(self.engine, "is_alive", lambda: True)())

    def model_cards(self) -> list[P.ModelCard]:
        inner = getattr(self.engine, "engine", self.engine)  # the Engine inside an AsyncEngine
        cards = [
            P.ModelCard(id=self.model_name, max_model_len=self.max_model_len, weights=getattr(inner, "weights", None))
        ]
        if self.embedder is not None:
            cards.append(P.ModelCard(id=self.embedding_model_name, max_model_len=self.embedder.max_length))
        return cards

    async def _off_loop(self, fn, *args):
        """fn(*args) in the tokenizer pool, so the event loop keeps relaying tokens meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---- shared validation ----

    def _check_model(self, name: str | None, embedding: bool = False):
        served = self.embedding_model_name if embedding else self.model_name
        if embedding and self.embedder is None:
            raise P.APIError(
                404,
                f"model {P.clip(name)} not found: this server serves no embedding model (start it with --embedding-model)",
                param="model",
                code="model_not_found",
            )
        if name != served:
            raise P.APIError(
                404,
                f"model {P.clip(name)} not found; this server serves {served!r}",
                param="model",
                code="model_not_found",
            )

    def _check_common(self, req):
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > self.limits.max_stop:
            raise P.APIError(400, f"at most {self.limits.max_stop} stop sequences, got {len(stop)}", param="stop")
        if any(not s for s in stop):
            raise P.APIError(400, "stop sequences must be non-empty strings", param="stop")
        for s in stop:
            _check_text(s, "stop")
        if req.stop_token_ids:
            self._check_ids(req.stop_token_ids, "stop_token_ids")
        return stop

    def _check_ids(self, ids: list[int], param: str) -> list[int]:
        v = self.vocab_size
        bad = next((t for t in ids if not 0 <= t < v), None)
        if bad is not None:
            raise P.APIError(400, f"{param}: token ids must be in [0, {v}), got {P.clip(bad)}", param=param)
        return list(ids)

    def _encode_texts(self, texts: list[str], param: str, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text (in the tokenizer pool: the batch API releases the GIL)."""
        for t in texts:
            _check_text(t, param)
        if not texts:
            return []
        batch = getattr(self.tok, "encode_batch", None)
        if batch is not None:
            return [list(ids) for ids in batch(texts, add_special_tokens=add_special_tokens)]
        return [list(self.tok.encode(t, add_special_tokens=add_special_tokens)) for t in texts]

    def _encode_prompts(self, raw: list[str | list[int]], truncate: int | None) -> list[list[int]]:
        encoded = iter(self._encode_texts([x for x in raw if isinstance(x, str)], "prompt"))
        out = [next(encoded) if isinstance(x, str) else self._check_ids(x, "prompt") for x in raw]
        return [ids[-truncate:] for ids in out] if truncate else out

    def _token_budget(self, prompt_ids: list[int], max_tokens: int | None, param: str) -> int:
        """max_tokens for one prompt: what was asked, or the rest of the context when nothing was."""
        n = len(prompt_ids)
        if n == 0:
            raise P.APIError(400, "the prompt is empty", param="prompt")
        if n >= self.max_model_len:
            raise P.APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has {n} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return self.max_model_len - n
        if n + max_tokens > self.max_model_len:
            raise P.APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{n + max_tokens} were requested ({n} in the prompt, {max_tokens} in the completion);"
                f" reduce {param}",
                param=param,
                code="context_length_exceeded",
            )
        return max_tokens

    def _params(self, req, stop, max_tokens: int, logprobs: int | None, seed: int | None):
        kw = dict(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k in (None, -1) else req.top_k,
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=seed,
            max_tokens=max_tokens,
            stop=tuple(stop),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            min_tokens=req.min_tokens,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logit_bias=self._logit_bias(req),
            structured=_structured_output(req),
            # Echo with logprobs (/v1/completions) reports the prompt's tokens too.
            prompt_logprobs=logprobs if getattr(req, "echo", False) and logprobs is not None else None,
        )
        try:
            return self.SamplingParams(**kw)
        except ValueError as e:
            raise P.APIError(400, str(e)) from e

    def _check_choices(self, n_prompts: int, n: int) -> None:
        total = n_prompts * n
        if total > self.limits.max_choices:
            raise P.APIError(
                400,
                f"prompts x n = {total} exceeds this server's limit of {self.limits.max_choices} choices per request",
                param="n",
            )
        if total > self.limits.max_queued_requests:
            raise P.APIError(
                400,
                f"prompts x n = {total} exceeds this server's queue of {self.limits.max_queued_requests} requests",
                param="n",
            )

    def _logit_bias(self, req) -> dict[int, float] | None:
        """OpenAI's {"token id": bias} as {id: bias}; ids must be token ids of this model (the sampler
        clamps the biases to [-100, 100])."""
        if not req.logit_bias:
            return None
        vocab = getattr(self.tok, "vocab_size", None)
        out = {}
        for key, bias in req.logit_bias.items():
            try:
                tid = int(key)
            except ValueError:
                raise P.APIError(
                    400, f"logit_bias keys must be token ids, got {key[:50]!r}", param="logit_bias"
                ) from None
            if tid < 0 or (vocab is not None and tid >= vocab):
                raise P.APIError(400, f"logit_bias token id {tid} is out of range [0, {vocab})", param="logit_bias")
            out[tid] = bias
        return out

    def _jobs(self, prompts: list[list[int]], req, stop, max_tokens, logprobs, param):
        """(choice index, prompt ids, SamplingParams) for every prompt x n; seeded samples get seed + j so
        the n samples of one prompt differ but stay reproducible."""
        self._check_choices(len(prompts), req.n)
        jobs = []
        structured = _structured_output(req)
        if structured is not None:
            # Checked here, before a streamed response sends its headers, so a bad grammar is a 400.
            try:
                self.engine.engine.grammars.validate(structured)
            except ValueError as e:
                raise P.APIError(400, str(e)) from e
        for p, ids in enumerate(prompts):
            budget = self._token_budget(ids, max_tokens, param)
            for j in range(req.n):
                seed = None if req.seed is None else (req.seed + j) % 2**63
                jobs.append((p * req.n + j, ids, self._params(req, stop, budget, logprobs, seed)))
        return jobs

    # ---- admission ----

    def _refuse_if_busy(self, n: int) -> None:
        """503 when the engine is dead, 429 when admitting n more engine requests would overflow the queue."""
        if not self.alive():
            self.metrics.rejected("engine_dead")
            raise _engine_dead()
        limit = self.limits.max_queued_requests
        if self.queued + n > limit:
            self.metrics.rejected("queue_full")
            raise P.APIError(
                429,
                f"the server is busy: {self.queued} requests are waiting to start (limit {limit}); retry later",
                code="queue_full",
                headers={"Retry-After": str(self.limits.retry_after)},
            )

    def _admit(self, n: int) -> _Admission:
        self._refuse_if_busy(n)  # again: the queue may have filled while this request was tokenized
        return _Admission(self, n)

    # ---- generation plumbing ----

    async def _stream_one(
        self, index: int, prompt_ids: list[int], params, request_id: str, t0: float, admission: _Admission
    ) -> AsyncIterator[tuple[int, object]]:
        """The engine's deltas for one request, as (index, RequestOutput), recording latency metrics."""
        m, last, n_out, finish, started = self.metrics, t0, 0, None, False
        try:
            async with contextlib.aclosing(self.engine.stream(prompt_ids, params, request_id=request_id)) as outs:
                async for out in outs:
                    now, k = time.perf_counter(), len(out.new_token_ids)
                    if not started:
                        started = True
                        admission.started()
                    if k:
                        if n_out == 0:
                            m.first_token(now - t0)
                        else:
                            for _ in range(k):
                                m.inter_token((now - last) / k)
                        last, n_out = now, n_out + k
                    if out.finished:
                        finish = out.finish_reason
                        if finish not in FINISH_REASONS:
                            raise _Aborted("the request was aborted by the server (it is shutting down)")
                    yield index, out
        finally:
            if not started:
                admission.started()
            done = finish in FINISH_REASONS
            m.finished(len(prompt_ids), n_out, finish or "abort", time.perf_counter() - t0 if done else None)

    def _generate(self, jobs, request_id: str, t0: float, admission: _Admission) -> AsyncIterator[tuple[int, object]]:
        streams = [self._stream_one(i, ids, params, f"{request_id}-{i}", t0, admission) for i, ids, params in jobs]
        return _merge(streams)

    async def _collect(self, jobs, request_id: str, request: Request, t0: float) -> list[_Choice]:
        choices = {i: _Choice(i, ids) for i, ids, _ in jobs}
        admission = self._admit(len(jobs))

        async def run():
            async with contextlib.aclosing(self._generate(jobs, request_id, t0, admission)) as events:
                async for i, out in events:
                    _accumulate(choices[i], out)
            return [choices[i] for i in sorted(choices)]

        try:
            return await _cancel_on_disconnect(request, run())
        except ValueError as e:  # what the engine refuses at admission
            raise P.APIError(400, str(e)) from e
        except EngineDeadError as e:
            log.error("request %s: the engine is dead: %s", request_id, e)
            raise _engine_dead() from e
        except _Aborted as e:
            raise P.APIError(503, str(e), code="aborted") from e
        finally:
            admission.close()

    def _chunk(self, rid: str, kind: str, created: int, choices: list, usage: dict | None = None) -> dict:
        """One streamed chunk of request rid: a text_completion or a chat.completion.chunk."""
        return {
            "id": rid,
            "object": kind,
            "created": created,
            "model": self.model_name,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
            "usage": usage,
        }

    def _sse(self, jobs, request_id: str, t0: float, first_chunks, to_chunks, usage_chunk) -> StreamingResponse:
        """The streaming response: headers and `first_chunks` at once, then the engine's deltas; an error
        after the headers is reported in-band (as OpenAI does) and the stream still ends with [DONE]."""
        admission = self._admit(len(jobs))

        async def body():
            events = self._generate(jobs, request_id, t0, admission)
            try:
                for chunk in first_chunks:
                    yield _sse(chunk)
                async for event in events:
                    for chunk in to_chunks(*event):
                        yield _sse(chunk)
                if usage_chunk is not None:
                    yield _sse(usage_chunk())
            except Exception as e:
                yield _sse(_stream_error(e, request_id))
            finally:
                await events.aclose()
            yield "data: [DONE]\n\n"

        return _AdmittedStream(
            body(),
            admission,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ---- /v1/completions ----

    async def completions(self, req: P.CompletionRequest, request: Request):
        t0, rid = time.perf_counter(), _request_id(request)
        self._check_model(req.model)
        reject_unsupported(req, COMPLETIONS)
        stop = self._check_common(req)
        if req.best_of not in (None, req.n):
            raise P.APIError(400, "best_of is not supported (use n)", param="best_of")
        raw = _prompt_list(req.prompt, "prompt")
        self._check_choices(len(raw), req.n)
        self._refuse_if_busy(len(raw) * req.n)  # before spending time on tokenization
        prompts = await self._off_loop(self._encode_prompts, raw, req.truncate_prompt_tokens)
        jobs = self._jobs(prompts, req, stop, req.max_tokens, req.logprobs, "max_tokens")
        rid = f"cmpl-{rid}"
        echo = {}
        if req.echo:
            # The prompt as the client sent it: text as is, token ids decoded with their special tokens.
            texts = await self._off_loop(self._echo_texts, raw)
            echo = {i: texts[i // req.n] for i, _, _ in jobs}
        want_lp = req.logprobs is not None

        if not req.stream:
            choices = await self._collect(jobs, rid, request, t0)
            out = []
            for c in choices:
                lp = None
                if want_lp:
                    entries = _prompt_entries(c.prompt_ids, c.prompt_logprobs) if req.echo else []
                    lp = self._completion_logprobs(entries + c.logprobs, 0)
                out.append(
                    P.CompletionChoice(
                        index=c.index, text=echo.get(c.index, "") + c.text, logprobs=lp, finish_reason=c.finish_reason
                    )
                )
            usage = _usage(prompts, choices)
            return P.CompletionResponse(
                id=rid, model=self.model_name, system_fingerprint=self.fingerprint, choices=out, usage=usage
            ).model_dump()

        created, offsets, counts = int(time.time()), {i: len(echo.get(i, "")) for i, _, _ in jobs}, {}

        chunk = functools.partial(self._chunk, rid, "text_completion", created)

        pending_echo = dict(echo) if want_lp else {}  # echoed with the prompt's log-probs in the first delta

        def to_chunks(i, out):
            counts[i] = counts.get(i, 0) + len(out.new_token_ids)
            lp, text = None, out.new_text
            if want_lp:
                entries = _new_logprobs(out)
                if i in pending_echo:
                    text = pending_echo.pop(i) + text
                    entries = _prompt_entries(out.prompt_token_ids, out.prompt_logprobs) + entries
                    offsets[i] = 0
                lp = self._completion_logprobs(entries, offsets[i]).model_dump()
                offsets[i] += len(text) - len(out.new_text)
            offsets[i] += len(out.new_text)
            if text or out.finished or lp:
                yield chunk(
                    [
                        {
                            "index": i,
                            "text": text,
                            "logprobs": lp,
                            "finish_reason": out.finish_reason if out.finished else None,
                        }
                    ]
                )

        first = [
            chunk([{"index": i, "text": t, "logprobs": None, "finish_reason": None}])
            for i, t in echo.items()
            if i not in pending_echo
        ]
        usage = None
        if req.stream_options and req.stream_options.include_usage:
            usage = lambda: chunk([], _stream_usage(prompts, counts))
        return self._sse(jobs, rid, t0, first, to_chunks, usage)

    def _echo_texts(self, raw: list[str | list[int]]) -> list[str]:
        return [x if isinstance(x, str) else self.tok.decode(x, skip_special_tokens=False) for x in raw]

    def _completion_logprobs(self, entries: list[dict], offset: int) -> P.CompletionLogprobs:
        lp = P.CompletionLogprobs()
        for e in entries:
            tok = self.tok.decode([e["token_id"]])
            lp.tokens.append(tok)
            first_of_prompt = e["logprob"] is None  # as OpenAI: no log-prob for an echoed prompt's first token
            lp.token_logprobs.append(None if first_of_prompt else float(e["logprob"]))
            lp.top_logprobs.append(
                None if first_of_prompt else {self.tok.decode([t]): float(v) for t, v in e.get("top") or []}
            )
            lp.text_offset.append(offset)
            offset += len(tok)
        return lp

    # ---- /v1/chat/completions ----

    def _conversation(self, messages: list[P.ChatMessage]) -> list[dict]:
        if not getattr(self.tok, "chat_template", None):
            raise P.APIError(
                400, f"model {self.model_name!r} has no chat template; use /v1/completions", param="messages"
            )
        conv = []
        for k, msg in enumerate(messages):
            if isinstance(msg.content, list):
                bad = [p.type for p in msg.content if p.type != "text" or p.text is None]
                if bad:
                    raise P.APIError(
                        400,
                        f"messages[{k}].content: only text parts are supported, got {P.clip(bad[0])}",
                        param=f"messages.{k}.content",
                    )
                text = "".join(p.text for p in msg.content)
            else:
                text = msg.content or ""
            # Chat templates know "system"; OpenAI's newer "developer" role means the same.
            conv.append({"role": "system" if msg.role == "developer" else msg.role, "content": text})
        return conv

    def _chat_ids(self, conv: list[dict], add_generation_prompt: bool = True, add_special_tokens: bool = False):
        """Render the template and tokenize (in the tokenizer pool)."""
        for m in conv:
            _check_text(m["content"], "messages")
        try:
            text = self.tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # a template may raise on role orders it does not support
            raise P.APIError(
                400, f"the chat template rejected the messages: {str(e)[: P.ECHO_LIMIT]}", param="messages"
            ) from e
        # The template writes every special token the prompt needs (a BOS included, for templates that
        # start with {{ bos_token }}: Llama 3, Mistral, Gemma); letting the tokenizer add its own too
        # would give such models two BOS tokens. transformers and vLLM encode templates the same way.
        return self._encode_texts([text], "messages", add_special_tokens=add_special_tokens)[0]

    async def chat(self, req: P.ChatCompletionRequest, request: Request):
        t0, rid = time.perf_counter(), _request_id(request)
        self._check_model(req.model)
        reject_unsupported(req, CHAT)
        stop = self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise P.APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if (
            req.max_tokens is not None
            and req.max_completion_tokens is not None
            and req.max_tokens != req.max_completion_tokens
        ):
            raise P.APIError(400, "max_tokens and max_completion_tokens disagree", param="max_completion_tokens")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        conv = self._conversation(req.messages)
        self._check_choices(1, req.n)
        self._refuse_if_busy(req.n)
        prompt = await self._off_loop(self._chat_ids, conv)
        if req.truncate_prompt_tokens:
            prompt = prompt[-req.truncate_prompt_tokens :]
        jobs = self._jobs([prompt], req, stop, max_tokens, logprobs, param)
        rid = f"chatcmpl-{rid}"

        if not req.stream:
            choices = await self._collect(jobs, rid, request, t0)
            out = [
                P.ChatChoice(
                    index=c.index,
                    message=P.ChatResponseMessage(content=c.text),
                    logprobs=self._chat_logprobs(c.logprobs) if req.logprobs else None,
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ]
            usage = _usage([prompt], choices)
            return P.ChatCompletionResponse(
                id=rid, model=self.model_name, system_fingerprint=self.fingerprint, choices=out, usage=usage
            ).model_dump()

        created, counts = int(time.time()), {}

        chunk = functools.partial(self._chunk, rid, "chat.completion.chunk", created)

        def to_chunks(i, out):
            counts[i] = counts.get(i, 0) + len(out.new_token_ids)
            lp = self._chat_logprobs(_new_logprobs(out)).model_dump() if req.logprobs else None
            if out.new_text or lp:
                yield chunk([{"index": i, "delta": {"content": out.new_text}, "logprobs": lp, "finish_reason": None}])
            if out.finished:
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}])

        # OpenAI opens every choice with a role-only delta.
        first = [
            chunk(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
            for i, _, _ in jobs
        ]
        usage = None
        if req.stream_options and req.stream_options.include_usage:
            usage = lambda: chunk([], _stream_usage([prompt], counts))
        return self._sse(jobs, rid, t0, first, to_chunks, usage)

    def _chat_logprobs(self, entries: list[dict]) -> P.ChatLogprobs:
        def tok(t):
            s = self.tok.decode([t])
            return s, list(s.encode("utf-8"))

        content = []
        for e in entries:
            s, b = tok(e["token_id"])
            top = [
                P.TopLogprob(token=ts, logprob=float(v), bytes=tb)
                for (ts, tb), v in ((tok(t), v) for t, v in e.get("top") or [])
            ]
            content.append(P.TokenLogprob(token=s, logprob=float(e["logprob"]), bytes=b, top_logprobs=top))
        return P.ChatLogprobs(content=content)

    # ---- /tokenize, /detokenize (vLLM's) ----

    async def tokenize(self, req: P.TokenizeRequest):
        if req.model is not None:
            self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise P.APIError(400, "send exactly one of 'prompt' and 'messages'", param="prompt")
        if req.messages is not None:
            conv = self._conversation(req.messages)
            special = bool(req.add_special_tokens)  # the template writes the special tokens
            ids = await self._off_loop(self._chat_ids, conv, req.add_generation_prompt, special)
        else:
            special = True if req.add_special_tokens is None else req.add_special_tokens
            ids = (await self._off_loop(self._encode_texts, [req.prompt], "prompt", special))[0]
        body = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [self.tok.id_to_token(t) for t in ids]
        return body

    async def detokenize(self, req: P.DetokenizeRequest):
        if req.model is not None:
            self._check_model(req.model)
        ids = self._check_ids(req.tokens, "tokens")
        text = await self._off_loop(lambda: self.tok.decode(ids, skip_special_tokens=False))
        return {"prompt": text}

    # ---- /v1/embeddings ----

    def _embed_tokenize(self, items: list[str | list[int]]) -> list[list[int]]:
        for x in items:
            if isinstance(x, str):
                _check_text(x, "input")
        try:
            return [self.embedder.tokenize(x) for x in items]
        except ValueError as e:
            raise P.APIError(400, str(e), param="input") from e

    async def embeddings(self, req: P.EmbeddingRequest):
        self._check_model(req.model, embedding=True)
        items = _prompt_list(req.input, "input")
        if len(items) > self.limits.max_embedding_inputs:
            raise P.APIError(
                400, f"at most {self.limits.max_embedding_inputs} inputs per request, got {len(items)}", param="input"
            )
        dims = self.embedder.dimensions
        if req.dimensions is not None and dims is not None and req.dimensions != dims:
            raise P.APIError(
                400,
                f"dimensions={req.dimensions} is not supported: {self.embedding_model_name} "
                f"embeddings have {dims} dimensions",
                param="dimensions",
            )
        batch = await self._off_loop(self._embed_tokenize, items)
        emb = await asyncio.to_thread(self.embedder.embed_ids, batch)  # (n, hidden) unit vectors
        if req.encoding_format == "base64":
            vectors = [base64.b64encode(row.numpy().astype("<f4").tobytes()).decode("ascii") for row in emb]
        else:
            vectors = emb.tolist()
        n = sum(len(ids) for ids in batch)
        data = [P.EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)]
        self.metrics.embedded(n)
        return P.EmbeddingResponse(
            data=data, model=self.embedding_model_name, usage=P.Usage(prompt_tokens=n, total_tokens=n)
        ).model_dump()


# ---- helpers ----------------------------------------------------------------------------------------


def _sync_engine(engine):
    """The Engine behind an AsyncEngine (for its tokenizer and model config)."""
    for name in ("engine", "_engine"):
        inner = getattr(engine, name, None)
        if inner is not None and hasattr(inner, "tokenizer"):
            return inner
    if hasattr(engine, "tokenizer"):
        return engine
    raise ValueError(f"create_app: cannot find the engine behind {type(engine).__name__}")


def _capacity(inner) -> int:
    """Tokens one sequence can hold: the model's context, or the whole KV cache when that is smaller."""
    context = int(getattr(inner, "context_len", inner.config.max_position_embeddings))
    cache = getattr(inner, "cache_tokens", None)
    return min(context, int(cache)) if cache is not None else context


def _fingerprint(inner) -> str:
    """OpenAI's system_fingerprint: changes when the code version, weights' config, dtype or device do."""
    import plm_engine

    parts = [
        plm_engine.__version__,
        repr(getattr(inner, "config", "")),
        str(getattr(inner, "dtype", "")),
        str(getattr(inner, "device", "")),
    ]
    return "fp_" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "unknown")


def _check_text(text: str, param: str) -> None:
    """400 for text that is not valid Unicode (a lone surrogate such as "\\ud800" is valid JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise P.APIError(
            400,
            f"{param}: not valid Unicode text (lone surrogate U+{ord(text[e.start]):04X} at character {e.start})",
            param=param,
            code="invalid_text",
        ) from None


def _engine_dead() -> P.APIError:
    return P.APIError(
        503,
        "the engine is not running (it stopped after repeated failures, or the server is shutting down)",
        code="engine_dead",
    )


def _stream_error(e: Exception, request_id: str) -> dict:
    """The in-band error event of a stream whose headers are sent."""
    if isinstance(e, EngineDeadError):
        log.error("request %s: the engine is dead: %s", request_id, e)
        return _engine_dead().body()
    if isinstance(e, _Aborted):
        return P.error_body(str(e), "service_unavailable", code="aborted")
    if isinstance(e, ValueError):  # refused at admission by the engine
        return P.APIError(400, str(e)).body()
    log.error("request %s: generation failed", request_id, exc_info=e)
    return P.error_body(
        f"generation failed (request id {request_id}); the details are in the server log", "internal_server_error"
    )


def _structured_output(req):
    """The request's structured-output constraint (StructuredOutputParams) or None; at most one of
    response_format (json_object / json_schema), guided_json / guided_regex / guided_choice /
    guided_grammar, structured_outputs and grammar may be given."""
    from plm_engine.generation.structured import StructuredOutputParams

    given = {}
    rf = req.response_format
    if rf is not None:
        kind = rf.get("type", "text")
        if kind == "json_object":
            given["response_format"] = dict(json_object=True)
        elif kind == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise P.APIError(
                    400,
                    "response_format json_schema needs json_schema.schema, a JSON schema object",
                    param="response_format",
                )
            given["response_format"] = dict(json=schema)
        elif kind != "text":
            raise P.APIError(
                400,
                f"response_format type {str(kind)[:50]!r} is not supported (text, json_object, json_schema)",
                param="response_format",
            )
    for name, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
        ("grammar", "grammar"),
    ):
        if getattr(req, name) is not None:
            given[name] = {key: getattr(req, name)}
    if req.structured_outputs:
        so = {k: v for k, v in req.structured_outputs.items() if v not in (None, False)}
        unknown = sorted(set(so) - {"json", "json_object", "regex", "choice", "grammar"})
        if unknown:
            raise P.APIError(400, f"structured_outputs.{unknown[0][:50]} is not supported", param="structured_outputs")
        given["structured_outputs"] = so
    if not given:
        return None
    if len(given) > 1:
        raise P.APIError(400, f"give one structured-output constraint, got {', '.join(given)}", param=next(iter(given)))
    ((param, spec),) = given.items()
    try:
        return StructuredOutputParams(**spec)
    except (TypeError, ValueError) as e:
        raise P.APIError(400, str(e), param=param) from e


def _prompt_list(prompt, param: str) -> list[str | list[int]]:
    """OpenAI's prompt forms (str, [str], [int], [[int]]) as a list of str or token-id lists."""
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if not items or any(len(x) == 0 for x in items):
        raise P.APIError(400, f"{param} must not be empty", param=param)
    return items


def _new_logprobs(out) -> list[dict]:
    """Log-prob entries of this delta's new tokens (works whether the engine reports them per delta or
    cumulatively: they are always the last len(new_token_ids) entries)."""
    k = len(out.new_token_ids)
    return list(out.logprobs[-k:]) if out.logprobs and k else []


def _prompt_entries(prompt_ids: list[int], prompt_logprobs: list | None) -> list[dict]:
    """The engine's prompt log-probs as log-prob entries (the first token's logprob None)."""
    if prompt_logprobs is None:
        return []
    return [
        e if e is not None else {"token_id": t, "logprob": None, "top": None}
        for t, e in zip(prompt_ids, prompt_logprobs)
    ]


def _accumulate(c: _Choice, out) -> None:
    if out.prompt_logprobs is not None:
        c.prompt_logprobs = out.prompt_logprobs
    c.text += out.new_text
    c.token_ids += list(out.new_token_ids)
    c.logprobs += _new_logprobs(out)
    if out.finished:
        c.finish_reason = out.finish_reason
        if out.text is not None:
            c.text = out.text  # the engine's final text is authoritative (stop strings trimmed)


def _usage(prompts: list[list[int]], choices: list[_Choice]) -> P.Usage:
    p, c = sum(len(x) for x in prompts), sum(len(ch.token_ids) for ch in choices)
    return P.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _stream_usage(prompts: list[list[int]], counts: dict[int, int]) -> dict:
    p, c = sum(len(x) for x in prompts), sum(counts.values())
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


_DONE = object()


async def _merge(streams: list) -> AsyncIterator:
    """Interleave several async generators as their items arrive; closing the merge closes them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(gen):
        try:
            async with contextlib.aclosing(gen):
                async for item in gen:
                    await queue.put(item)
        except Exception as e:  # re-raised in the consumer
            await queue.put(e)
        finally:
            queue.put_nowait(_DONE)

    tasks = [asyncio.ensure_future(pump(g)) for g in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ClientDisconnected(Exception):
    pass


async def _cancel_on_disconnect(request: Request, coro):
    """Await `coro`, cancelling it (and raising ClientDisconnected) if the client goes away first."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected()
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


def _add_error_handlers(app: FastAPI) -> None:
    def reply(e: P.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(P.APIError)
    async def api_error(_, e: P.APIError):
        return reply(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return reply(
                P.APIError(
                    400,
                    f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "),
                    code="json_invalid",
                )
            )
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        if loc:
            msg += f" (got {P.clip(first.get('input'))})"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more error{'s' if len(errs) > 2 else ''})"
        return reply(P.APIError(400, msg, param=param, code=first.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return reply(P.APIError(e.status_code, str(e.detail)))

    @app.exception_handler(ClientDisconnected)
    async def disconnected(_, e):
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    # Any other exception reaches middleware.Guard, which logs it and answers a generic 500 with the
    # request id (a handler here would run outside the Guard, in Starlette's ServerErrorMiddleware).
