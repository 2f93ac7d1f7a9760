"""The pure-ASGI guard in front of the app: request id, Host check, API key, body size and read timeout,
request counting.

It runs before routing, so everything it refuses is refused before any parsing, and every response
(its own refusals included) is counted and carries an `X-Request-Id` header (the openai client reports it
as `request_id`; the server log uses the same id).

The body is read (up to the size limit, within the read timeout) before the app sees it, so an oversized
or trickled body is refused with 413 / 408 without being parsed; the app then reads the buffered copy and
after that receive() is the server's again (the app uses it to notice a disconnect).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid

from starlette.responses import JSONResponse

from plm_engine.server import protocol as P

log = logging.getLogger("plm_engine.server")

ENDPOINTS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
)
OPEN_PATHS = ("/health", "/metrics")  # probes and scrapers need no key
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def endpoint_label(path: str) -> str:
    """A bounded label for metrics: known endpoints by name, everything else 'other'."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def host_name(value: str) -> str:
    """The host of a Host header without its port ('[::1]:8000' -> '::1', 'a.b:80' -> 'a.b'), lower-cased."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end != -1 else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def key_digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key if isinstance(key, bytes) else key.encode("utf-8")).digest()


class Guard:
    """api_key: required as `Authorization: Bearer <key>` on every path but OPEN_PATHS; compared as
    SHA-256 digests of the raw bytes (constant time, any length, non-ASCII keys sent as UTF-8 work).
    allowed_hosts: when given, the Host header's name must be one of them (DNS-rebinding defence for a
    server bound to loopback). body_timeout: seconds the whole request body may take to arrive."""

    def __init__(
        self,
        app,
        metrics,
        api_key: str | None,
        max_body_bytes: int,
        body_timeout: float | None = None,
        allowed_hosts: list[str] | None = None,
    ):
        self.app, self.metrics, self.max_body, self.body_timeout = app, metrics, max_body_bytes, body_timeout
        self._expected = key_digest(b"Bearer " + api_key.encode("utf-8")) if api_key is not None else None
        self.allowed_hosts = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        path = scope["path"]
        label = endpoint_label(path)

        started = False

        async def tagged_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.request(label, message["status"])
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        def refuse(err: P.APIError):
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, tagged_send)

        headers = dict(scope["headers"])
        if self.allowed_hosts is not None:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                log.warning("request %s: refused Host %s", rid, P.clip(host))
                return await refuse(
                    P.APIError(
                        403,
                        "this server does not answer for that Host header (start it with --allowed-host NAME to add one)",
                        code="invalid_host",
                    )
                )
        if self._expected is not None and path not in OPEN_PATHS:
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(key_digest(got), self._expected):
                return await refuse(
                    P.APIError(
                        401, "missing or incorrect API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
                    )
                )

        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self._run(scope, receive, tagged_send, lambda: started)
        too_big = P.APIError(
            413, f"request body larger than this server's limit of {self.max_body} bytes", code="request_too_large"
        )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await refuse(too_big)
        chunks, size = [], 0
        deadline = None if self.body_timeout is None else time.monotonic() + self.body_timeout
        while True:
            try:
                if deadline is None:
                    message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                log.info("request %s: body not received within %.1f s", rid, self.body_timeout)
                return await refuse(
                    P.APIError(
                        408,
                        f"the request body did not arrive within {self.body_timeout:g} s",
                        code="request_timeout",
                        headers={"Connection": "close"},
                    )
                )
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await refuse(too_big)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def buffered_receive():
            return replay.pop() if replay else await receive()

        return await self._run(scope, buffered_receive, tagged_send, lambda: started)

    async def _run(self, scope, receive, send, started):
        try:
            await self.app(scope, receive, send)
        except Exception as e:
            # What no handler turned into a reply: a bug or a broken dependency. The client learns only
            # that it failed and under which id; the log gets the traceback.
            rid = scope["state"]["request_id"]
            log.error("request %s: %s %s failed", rid, scope["method"], scope["path"], exc_info=e)
            if not started():
                err = P.APIError(500, f"internal server error (request id {rid}); the details are in the server log")
                await JSONResponse(err.body(), status_code=500)(scope, receive, send)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when its graceful-shutdown time is over; the engine
            # requests were aborted on the way out, so end the request task quietly instead of letting
            # uvicorn log the cancellation as an application error.
            log.info("%s %s cancelled at shutdown", scope["method"], scope["path"])
