"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models,
/health and /metrics, over an AsyncEngine whose step loop runs in the background.

Every generation request becomes one engine request per (prompt, sample): each is an async stream of
token deltas. Streaming responses relay the deltas as server-sent events (`data: {...}` then
`data: [DONE]`); non-streaming responses collect them. A client that goes away cancels its streams,
which aborts the engine requests and frees their KV blocks (the AsyncEngine contract); for a
non-streaming request we watch the connection ourselves, since Starlette only does so while streaming.

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`): 400 for anything wrong
with the request (including what SamplingParams or the engine reject with ValueError), 401 for a
missing or wrong API key, 404 for an unknown model or path, 413 for an oversized body, 500 otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from plm_engine.server import protocol as P
from plm_engine.server.metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger("plm_engine.server")

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics")


@dataclass
class ServerLimits:
    """Request-size limits (DESIGN.md section 8). Token limits come from the model's context."""

    max_body_bytes: int = 1 << 20  # JSON body; a 1 MiB prompt is ~250k tokens, far past any context here
    max_choices: int = 64  # prompts x n in one generation request
    max_stop: int = 16  # stop strings
    max_embedding_inputs: int = 2048  # as the OpenAI API

    def __post_init__(self):
        for name in ("max_body_bytes", "max_choices", "max_stop", "max_embedding_inputs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ServerLimits: {name} must be a positive integer, got {v!r}")


def create_app(
    engine,
    embedder=None,
    api_key: str | None = None,
    model_name: str = "smollm2-135m",
    embedding_model_name: str = "minilm-l6",
    limits: ServerLimits | None = None,
    tokenizer=None,
    max_model_len: int | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` (an AsyncEngine) and optionally `embedder` (server.embeddings.Embedder).

    tokenizer / max_model_len default to those of the engine's model. api_key: when set, every /v1
    request needs `Authorization: Bearer <api_key>` (/health and /metrics stay open for probes/scrapers).
    """
    limits = limits or ServerLimits()
    inner = _sync_engine(engine)
    tokenizer = tokenizer if tokenizer is not None else inner.tokenizer
    if max_model_len is None:
        max_model_len = int(inner.model.config.max_position_embeddings)
    server = _Server(engine, tokenizer, max_model_len, model_name, embedder, embedding_model_name, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has drained (or, past its graceful timeout, cancelled) the requests by now; stop the
        # engine's loop so the process can exit.
        result = engine.shutdown()
        if inspect.isawaitable(result):
            await result

    app = FastAPI(title="plm_engine OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
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
        cards = [P.ModelCard(id=model_name, max_model_len=max_model_len)]
        if embedder is not None:
            cards.append(P.ModelCard(id=embedding_model_name, max_model_len=embedder.max_length))
        return P.ModelList(data=cards).model_dump()

    @app.get("/health")
    async def health():
        try:
            server.stats()
            alive = getattr(server.engine, "is_alive", lambda: True)()
        except Exception as e:  # an engine that cannot report its state is not healthy
            return JSONResponse(P.error_body(f"engine unhealthy: {e}", "service_unavailable"), status_code=503)
        if not alive:
            return JSONResponse(
                P.error_body("engine unhealthy: its step loop is not running", "service_unavailable"), status_code=503
            )
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    # Runs before routing: counts every response (auth and size rejections included).
    app.add_middleware(_Guard, metrics=server.metrics, api_key=api_key, max_body_bytes=limits.max_body_bytes)
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


class _Server:
    def __init__(self, engine, tokenizer, max_model_len, model_name, embedder, embedding_model_name, limits):
        from plm_engine.generation import SamplingParams

        self.engine, self.tok, self.max_model_len = engine, tokenizer, max_model_len
        self.model_name, self.embedder, self.embedding_model_name = model_name, embedder, embedding_model_name
        self.limits, self.SamplingParams = limits, SamplingParams
        self.metrics = ServerMetrics(self.stats)

    def stats(self) -> dict:
        return self.engine.stats()

    # ---- shared validation ----

    def _check_model(self, name: str, embedding: bool = False):
        served = self.embedding_model_name if embedding else self.model_name
        if embedding and self.embedder is None:
            raise P.APIError(
                404,
                f"model {name!r} not found: this server serves no embedding model (start it with --embedding-model)",
                param="model",
                code="model_not_found",
            )
        if name != served:
            raise P.APIError(
                404, f"model {name!r} not found; this server serves {served!r}", param="model", code="model_not_found"
            )

    def _check_common(self, req):
        for name, neutral in P.UNSUPPORTED_OUTPUT_FIELDS.items():
            if getattr(req, name) is not None and getattr(req, name) != neutral:
                raise P.APIError(400, f"{name} is not supported by this server", param=name)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > self.limits.max_stop:
            raise P.APIError(400, f"at most {self.limits.max_stop} stop sequences, got {len(stop)}", param="stop")
        if any(not s for s in stop):
            raise P.APIError(400, "stop sequences must be non-empty strings", param="stop")
        return stop

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

    @staticmethod
    def _truncate(prompts: list[list[int]], req) -> list[list[int]]:
        """vLLM's truncate_prompt_tokens: keep the last k tokens of each prompt."""
        k = req.truncate_prompt_tokens
        return prompts if k is None else [p[-k:] for p in prompts]

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tok.encode(prompt))
        vocab = getattr(self.tok, "vocab_size", None)
        if any(t < 0 or (vocab is not None and t >= vocab) for t in prompt):
            raise P.APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)

    def _jobs(self, prompts: list[list[int]], req, stop, max_tokens, logprobs, param):
        """(choice index, prompt ids, SamplingParams) for every prompt x n; seeded samples get seed + j so
        the n samples of one prompt differ but stay reproducible."""
        if len(prompts) * req.n > self.limits.max_choices:
            raise P.APIError(
                400,
                f"prompts x n = {len(prompts) * req.n} exceeds this server's limit of "
                f"{self.limits.max_choices} choices per request",
                param="n",
            )
        jobs = []
        for p, ids in enumerate(prompts):
            budget = self._token_budget(ids, max_tokens, param)
            for j in range(req.n):
                seed = None if req.seed is None else (req.seed + j) % 2**63
                jobs.append((p * req.n + j, ids, self._params(req, stop, budget, logprobs, seed)))
        return jobs

    # ---- generation plumbing ----

    async def _stream_one(
        self, index: int, prompt_ids: list[int], params, request_id: str, t0: float
    ) -> AsyncIterator[tuple[int, object]]:
        """The engine's deltas for one request, as (index, RequestOutput), recording latency metrics."""
        m, last, n_out, finish = self.metrics, t0, 0, None
        try:
            async with contextlib.aclosing(self.engine.stream(prompt_ids, params, request_id=request_id)) as outs:
                async for out in outs:
                    now, k = time.perf_counter(), len(out.new_token_ids)
                    if k:
                        if n_out == 0:
                            m.ttft.observe(now - t0)
                        else:
                            for _ in range(k):
                                m.itl.observe((now - last) / k)
                        last, n_out = now, n_out + k
                    if out.finished:
                        finish = out.finish_reason
                    yield index, out
        finally:
            m.prompt_tokens.inc(len(prompt_ids))
            m.generation_tokens.inc(n_out)
            m.finished.inc(finish_reason=finish or "abort")
            if finish:
                m.e2e.observe(time.perf_counter() - t0)

    def _generate(self, jobs, request_id: str) -> AsyncIterator[tuple[int, object]]:
        t0 = time.perf_counter()
        streams = [self._stream_one(i, ids, params, f"{request_id}-{i}", t0) for i, ids, params in jobs]
        return _merge(streams)

    async def _collect(self, jobs, request_id: str, request: Request) -> list[_Choice]:
        choices = {i: _Choice(i, ids) for i, ids, _ in jobs}

        async def run():
            async with contextlib.aclosing(self._generate(jobs, request_id)) as events:
                async for i, out in events:
                    _accumulate(choices[i], out)
            return [choices[i] for i in sorted(choices)]

        try:
            return await _cancel_on_disconnect(request, run())
        except ValueError as e:  # what the engine refuses at admission
            raise P.APIError(400, str(e)) from e

    async def _prefetched_sse(self, events, first_chunks, to_chunks, usage_chunk, request: Request):
        """Wait for the first engine output before answering, so errors the engine raises at admission
        (a ValueError) still become a 400 JSON response instead of an error inside a 200 stream."""
        try:
            first = await _cancel_on_disconnect(request, anext(events, None))
        except ValueError as e:
            await events.aclose()
            raise P.APIError(400, str(e)) from e
        except BaseException:
            await events.aclose()
            raise

        async def body():
            try:
                for chunk in first_chunks:
                    yield _sse(chunk)
                if first is not None:
                    for chunk in to_chunks(*first):
                        yield _sse(chunk)
                async for event in events:
                    for chunk in to_chunks(*event):
                        yield _sse(chunk)
                if usage_chunk is not None:
                    yield _sse(usage_chunk())
            except Exception as e:  # headers are sent: report in-band, as OpenAI does
                log.exception("stream failed")
                yield _sse(P.error_body(f"generation failed: {e}", "internal_server_error"))
            finally:
                await events.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    # ---- /v1/completions ----

    async def completions(self, req: P.CompletionRequest, request: Request):
        self._check_model(req.model)
        stop = self._check_common(req)
        if req.best_of not in (None, req.n):
            raise P.APIError(400, "best_of is not supported (use n)", param="best_of")
        if req.suffix:
            raise P.APIError(400, "suffix is not supported", param="suffix")
        raw = _prompt_list(req.prompt, "prompt")
        prompts = self._truncate([self._encode(p) for p in raw], req)
        jobs = self._jobs(prompts, req, stop, req.max_tokens, req.logprobs, "max_tokens")
        rid = f"cmpl-{uuid.uuid4().hex}"
        echo = (
            {
                # The prompt as given; the tokens the model saw when truncate_prompt_tokens cut it.
                i: (
                    raw[i // req.n]
                    if isinstance(raw[i // req.n], str) and req.truncate_prompt_tokens is None
                    else self.tok.decode(prompts[i // req.n])
                )
                for i, _, _ in jobs
            }
            if req.echo
            else {}
        )
        want_lp = req.logprobs is not None

        if not req.stream:
            choices = await self._collect(jobs, rid, request)
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
            return P.CompletionResponse(id=rid, model=self.model_name, choices=out, usage=usage).model_dump()

        created, offsets, counts = int(time.time()), {i: len(echo.get(i, "")) for i, _, _ in jobs}, {}

        def chunk(choices, usage=None):
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": choices,
                "usage": usage,
            }

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
        return await self._prefetched_sse(self._generate(jobs, rid), first, to_chunks, usage, request)

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

    def _chat_prompt(self, messages: list[P.ChatMessage]) -> list[int]:
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
                        f"messages[{k}].content: only text parts are supported, got {bad[0]!r}",
                        param=f"messages.{k}.content",
                    )
                text = "".join(p.text for p in msg.content)
            else:
                text = msg.content or ""
            # Chat templates know "system"; OpenAI's newer "developer" role means the same.
            conv.append({"role": "system" if msg.role == "developer" else msg.role, "content": text})
        try:
            prompt = self.tok.apply_chat_template(conv, add_generation_prompt=True)
        except Exception as e:  # a template may raise on role orders it does not support
            raise P.APIError(400, f"the chat template rejected the messages: {e}", param="messages") from e
        return self._encode(prompt) if isinstance(prompt, str) else list(prompt)

    async def chat(self, req: P.ChatCompletionRequest, request: Request):
        self._check_model(req.model)
        stop = self._check_common(req)
        if req.tools:
            raise P.APIError(400, "tools are not supported", param="tools")
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
        prompt = self._truncate([self._chat_prompt(req.messages)], req)[0]
        jobs = self._jobs([prompt], req, stop, max_tokens, logprobs, param)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        if not req.stream:
            choices = await self._collect(jobs, rid, request)
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
            return P.ChatCompletionResponse(id=rid, model=self.model_name, choices=out, usage=usage).model_dump()

        created, counts = int(time.time()), {}

        def chunk(choices, usage=None):
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": choices,
                "usage": usage,
            }

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
        return await self._prefetched_sse(self._generate(jobs, rid), first, to_chunks, usage, request)

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

    # ---- /v1/embeddings ----

    async def embeddings(self, req: P.EmbeddingRequest):
        self._check_model(req.model, embedding=True)
        items = _prompt_list(req.input, "input")
        if len(items) > self.limits.max_embedding_inputs:
            raise P.APIError(
                400, f"at most {self.limits.max_embedding_inputs} inputs per request, got {len(items)}", param="input"
            )
        try:
            batch = [self.embedder.tokenize(x) for x in items]
        except ValueError as e:
            raise P.APIError(400, str(e), param="input") from e
        emb = await asyncio.to_thread(self.embedder.embed_ids, batch)  # (n, hidden) unit vectors
        if req.dimensions is not None and req.dimensions != emb.shape[1]:
            raise P.APIError(
                400,
                f"dimensions={req.dimensions} is not supported: {self.embedding_model_name} "
                f"embeddings have {emb.shape[1]} dimensions",
                param="dimensions",
            )
        if req.encoding_format == "base64":
            vectors = [base64.b64encode(row.numpy().astype("<f4").tobytes()).decode("ascii") for row in emb]
        else:
            vectors = emb.tolist()
        n = sum(len(ids) for ids in batch)
        data = [P.EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)]
        self.metrics.prompt_tokens.inc(n)
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
    raise ValueError(
        f"create_app: cannot find the tokenizer of {type(engine).__name__}; pass tokenizer= and max_model_len="
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
        return JSONResponse(e.body(), status_code=e.status)

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
        got = first.get("input")
        shown = repr(got) if not isinstance(got, dict) or len(repr(got)) < 200 else "{...}"
        msg = f"{param or 'body'}: {first.get('msg', 'invalid value')}" + (f" (got {shown})" if loc else "")
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more error{'s' if len(errs) > 2 else ''})"
        return reply(P.APIError(400, msg, param=param, code=first.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return reply(P.APIError(e.status_code, str(e.detail)))

    @app.exception_handler(ClientDisconnected)
    async def disconnected(_, e):
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(Exception)
    async def internal(_, e: Exception):
        log.exception("unhandled error")
        return reply(P.APIError(500, f"internal error: {type(e).__name__}: {e}"))


class _Guard:
    """Pure ASGI middleware around the app: request counting, API key, body-size limit.

    The body is read (up to the limit) before the app sees it, so an oversized body is refused with 413
    without being parsed, and the app then reads the buffered copy; after that, receive() is the
    server's again (the app uses it to notice a disconnect).
    """

    def __init__(self, app, metrics: ServerMetrics, api_key: str | None, max_body_bytes: int):
        self.app, self.metrics, self.api_key, self.max_body = app, metrics, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.inc(endpoint=endpoint, status=str(message["status"]))
            await send(message)

        if self.api_key is not None and path.startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
                err = P.APIError(
                    401, "missing or incorrect API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
                )
                return await JSONResponse(err.body(), status_code=401)(scope, receive, counting_send)

        if scope["method"] in ("POST", "PUT", "PATCH"):
            too_big = P.APIError(
                413, f"request body larger than this server's limit of {self.max_body} bytes", code="request_too_large"
            )
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await JSONResponse(too_big.body(), status_code=413)(scope, receive, counting_send)
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body:
                    return await JSONResponse(too_big.body(), status_code=413)(scope, receive, counting_send)
                if not message.get("more_body", False):
                    break
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def buffered_receive():
                return replay.pop() if replay else await receive()

            return await self._run(scope, buffered_receive, counting_send)
        return await self._run(scope, receive, counting_send)

    async def _run(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when its graceful-shutdown time is over; the engine
            # requests were aborted on the way out, so end the request task quietly instead of letting
            # uvicorn log the cancellation as an application error.
            log.info("%s %s cancelled at shutdown", scope["method"], scope["path"])
