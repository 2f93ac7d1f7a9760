"""Issue 16 point 2: a bounded admission queue (429 with Retry-After), uvicorn's concurrency limit, head and
body read timeouts, streaming headers sent before the first token, and max_model_len = min(context, KV
cache) reported by /v1/models with 400 beyond it."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest

from tests.server.conftest import ServerThread, serve_args, tiny_engine, wait_until

MODEL = "tiny"


def slowed(engine, seconds: float = 0.01):
    """Make every engine step take at least `seconds`, so a long request keeps its slot for a while."""
    inner = engine.engine
    step = inner.step

    def slow_step():
        time.sleep(seconds)
        return step()

    inner.step = slow_step
    return engine


@pytest.fixture()
def one_slot_server(smollm2_tokenizer):
    """max_num_seqs=1 and a queue of 2: one running request, two waiting, the next one refused."""
    from plm_engine.server import ServerLimits, create_app

    engine = slowed(tiny_engine(smollm2_tokenizer, max_num_seqs=1, kv_cache_tokens=1024), 0.05)
    app = create_app(engine, model_name=MODEL, limits=ServerLimits(max_queued_requests=2, retry_after=3))
    with ServerThread(app) as srv:
        srv.engine, srv.state = engine, app.state.server
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        yield srv


LONG = {"model": MODEL, "prompt": "Keep going", "max_tokens": 200, "ignore_eos": True, "temperature": 0}


def test_queue_limit_429_with_retry_after(one_slot_server):
    srv = one_slot_server
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as running:
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data: {"))  # it has its first token: not queued
            results = []

            def waiter():
                results.append(httpx.post(srv.url + "/v1/completions", json={**LONG, "max_tokens": 2}, timeout=60))

            threads = [threading.Thread(target=waiter) for _ in range(2)]
            for t in threads:
                t.start()
            wait_until(lambda: srv.state.queued == 2, timeout=20, what="two queued requests")
            with pytest.raises(openai.RateLimitError) as info:
                srv.client.completions.create(model=MODEL, prompt="one more", max_tokens=2)
            assert info.value.response.headers["retry-after"] == "3"
            assert info.value.code == "queue_full"
            r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 429 and r.headers["retry-after"] == "3"
        # Closing the long stream frees the slot: the waiting ones run, the queue empties.
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [200, 200]
        assert srv.state.queued == 0
        assert srv.client.completions.create(model=MODEL, prompt="now", max_tokens=2).usage.completion_tokens >= 1
        metrics = http.get("/metrics").text
        assert 'plm_engine_requests_rejected_total{reason="queue_full"} 2.0' in metrics


def test_streaming_headers_before_first_token(one_slot_server):
    srv = one_slot_server
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
            next(line for line in lines if line.startswith("data: {"))
            t0 = time.monotonic()
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=chat) as queued:
                # The headers (and the role delta) came while the request still waits for the busy slot.
                assert queued.status_code == 200 and queued.headers["content-type"].startswith("text/event-stream")
                assert srv.state.queued == 1 and time.monotonic() - t0 < 5
                queued_lines = queued.iter_lines()
                first = next(line for line in queued_lines if line.startswith("data: "))
                assert '"role":"assistant"' in first and srv.state.queued == 1
    wait_until(lambda: srv.state.queued == 0, timeout=20, what="the queue to empty after the clients left")
    wait_until(lambda: srv.engine.stats()["kv_blocks_used"] == 0, timeout=20, what="the blocks to be freed")


def test_max_model_len(smollm2_tokenizer):
    from plm_engine.server import create_app

    # The KV cache (128 tokens) is smaller than the context (256): it is the limit.
    engine = tiny_engine(smollm2_tokenizer, max_num_seqs=2, kv_cache_tokens=128)
    with pytest.raises(ValueError, match="max_model_len=1000 is not in"):
        create_app(engine, model_name=MODEL, max_model_len=1000)
    with ServerThread(create_app(engine, model_name=MODEL)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["max_model_len"] == 128
        with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
            client.completions.create(model=MODEL, prompt="hi", max_tokens=200)
        r = client.completions.create(model=MODEL, prompt="hi", max_tokens=120, extra_body={"ignore_eos": True})
        assert r.usage.total_tokens <= 128 and r.choices[0].finish_reason == "length"
        # Without max_tokens the completion may fill what is left of max_model_len.
        r = client.completions.create(model=MODEL, prompt="hi", max_tokens=None, extra_body={"ignore_eos": True})
        assert r.usage.total_tokens == 128
    engine = tiny_engine(smollm2_tokenizer, max_num_seqs=2, kv_cache_tokens=1024)
    with ServerThread(create_app(engine, model_name=MODEL, max_model_len=40)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        assert client.models.retrieve(MODEL).model_extra["max_model_len"] == 40
        with pytest.raises(openai.BadRequestError, match="maximum context length is 40"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=39)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    sock.settimeout(timeout)
    t0, data = time.monotonic(), b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data, time.monotonic() - t0
        data += chunk


@pytest.fixture()
def cli_server(smollm2_tokenizer):
    """The app behind the CLI's own uvicorn configuration, with short timeouts and a small limit."""
    from plm_engine.server import ServerLimits, cli, create_app

    args = serve_args(
        "--port", "0", "--header-timeout", "0.5", "--body-timeout", "0.5", "--limit-concurrency", "2",
        "--timeout-keep-alive", "1", "--max-header-bytes", "4096", "--log-level", "warning",
    )  # fmt: skip
    engine = tiny_engine(smollm2_tokenizer, max_num_seqs=1, kv_cache_tokens=512)
    app = create_app(engine, model_name=MODEL, limits=ServerLimits(body_timeout=args.body_timeout))
    with ServerThread(app, cli.uvicorn_config(app, args)) as srv:
        yield srv


def test_head_and_body_timeouts(cli_server):
    port = cli_server.port
    # Nothing sent at all, and a head trickled too slowly: closed after ~0.5 s with a 408.
    for first in (b"", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(first)
            data, took = read_until_closed(s, timeout=10)
        assert data.startswith(b"HTTP/1.1 408") and 0.3 < took < 5, (data, took)
    # A complete head but a body that never finishes: the app answers 408 (OpenAI-shaped).
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": '
        )
        data, took = read_until_closed(s, timeout=10)
    assert data.startswith(b"HTTP/1.1 408") and b"request_timeout" in data and took < 5, data
    # A head growing past --max-header-bytes is refused without waiting for its end.
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 8000)
        data, _ = read_until_closed(s, timeout=10)
    assert data.startswith(b"HTTP/1.1 400"), data[:80]  # h11 refused it (a timeout would be a 408)
    # A well-behaved request after all that.
    assert httpx.get(cli_server.url + "/health").status_code == 200


def test_limit_concurrency(cli_server):
    assert httpx.get(cli_server.url + "/health").status_code == 200
    with socket.create_connection(("127.0.0.1", cli_server.port)):  # one idle connection: 2 with ours
        r = httpx.get(cli_server.url + "/health")
        assert r.status_code == 503
    wait_until(lambda: httpx.get(cli_server.url + "/health").status_code == 200, timeout=10, what="the slot back")


def test_cli_backpressure_arguments(monkeypatch):
    monkeypatch.delenv("PLM_ENGINE_API_KEY", raising=False)
    a = serve_args()
    assert (a.max_queued_requests, a.limit_concurrency, a.max_model_len) == (256, 1024, None)
    assert (a.header_timeout, a.body_timeout, a.timeout_keep_alive, a.max_header_bytes) == (10.0, 30.0, 5.0, 16384)
    assert a.cors_origin == [] and a.allowed_host == []
    a = serve_args("--max-model-len", "512", "--cors-origin", "https://a", "--cors-origin", "https://b")
    assert a.max_model_len == 512 and a.cors_origin == ["https://a", "https://b"]
