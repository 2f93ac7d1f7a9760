"""Under load: 64 concurrent streaming clients (openai AsyncOpenAI over loopback) all get complete,
correct answers and the server stays healthy; a client that disconnects mid-stream has its engine
request aborted and its KV blocks freed."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

from tests.server.conftest import ServerThread, tiny_llama, wait_until

MODEL = "tiny-llama"
N_CLIENTS = 64


@pytest.fixture(scope="module")
def load_server(smollm2_tokenizer):
    from plm_engine.generation import AsyncEngine, Engine, SamplingParams
    from plm_engine.server import create_app

    tok = smollm2_tokenizer
    model = tiny_llama(tok.vocab_size, seed=1)
    prompts = [f"Request {i}: say something about the number {i * 7}." for i in range(N_CLIENTS)]
    max_tokens = [6 + i % 11 for i in range(N_CLIENTS)]  # different lengths finish at different steps
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens]
    offline = Engine(model, tokenizer=tok, max_num_seqs=N_CLIENTS, kv_cache_tokens=N_CLIENTS * 64)
    expected = offline.generate(prompts, params)
    del offline

    # Fewer sequences than clients and a small cache: requests queue and the scheduler must keep up.
    engine = AsyncEngine(Engine(model, tokenizer=tok, max_num_seqs=32, kv_cache_tokens=32 * 48))
    with ServerThread(create_app(engine, model_name=MODEL)) as srv:
        srv.engine, srv.cases = engine, list(zip(prompts, max_tokens, expected))
        yield srv


def test_64_concurrent_streams(load_server):
    srv = load_server

    async def one(client, prompt, max_tokens):
        stream = await client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage, n_chunks = "", None, None, 0
        async for chunk in stream:
            n_chunks += 1
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
        return text, finish, usage, n_chunks

    async def main():
        limits = httpx.Limits(max_connections=N_CLIENTS + 8)
        async with openai.AsyncOpenAI(
            base_url=srv.url + "/v1",
            api_key="unused",
            max_retries=0,
            timeout=90,
            http_client=openai.DefaultAsyncHttpxClient(limits=limits),
        ) as client:
            jobs = [one(client, p, m) for p, m, _ in srv.cases]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=90)

    t0 = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert len(results) == N_CLIENTS
    for (prompt, _, exp), (text, finish, usage, n_chunks) in zip(srv.cases, results):
        assert text == exp.text, f"{prompt!r}: streamed {text!r} != offline {exp.text!r}"
        assert finish == exp.finish_reason
        assert usage.completion_tokens == len(exp.token_ids) and usage.prompt_tokens == len(exp.prompt_token_ids)
        assert n_chunks >= 2
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    # The engine's counters are a snapshot taken at the end of a step: the last reply can arrive first.
    wait_until(
        lambda: (
            srv.engine.stats()["num_running"]
            == srv.engine.stats()["num_waiting"]
            == srv.engine.stats()["kv_blocks_used"]
            == 0
        ),
        timeout=10,
        what="the engine to go idle",
    )
    print(f"{N_CLIENTS} streaming clients served in {elapsed:.1f}s")


def test_disconnect_mid_stream_aborts_and_frees_blocks(load_server):
    srv = load_server
    before = srv.engine.stats()["requests_aborted"]
    body = {
        "model": MODEL,
        "prompt": "Keep talking forever",
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few events (blank separators included)
            assert any(line.startswith("data: {") for line in got)
            assert srv.engine.stats()["kv_blocks_used"] > 0
        # Leaving the block closed the connection mid-stream.

    def aborted_and_freed():
        s = srv.engine.stats()
        return s["requests_aborted"] == before + 1 and s["kv_blocks_used"] == 0 and s["num_running"] == 0

    wait_until(aborted_and_freed, timeout=20, what="the abandoned request to be aborted")
    metrics = httpx.get(srv.url + "/metrics").text
    assert f"plm_engine_num_requests_aborted {before + 1}" in metrics
    assert "plm_engine_kv_cache_blocks_used 0" in metrics
    assert 'plm_engine_request_finished_total{finish_reason="abort"}' in metrics
    # Still serving.
    r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_disconnect_during_non_streaming_request_aborts(load_server):
    srv = load_server
    before = srv.engine.stats()["requests_aborted"]
    body = json.dumps(
        {"model": MODEL, "prompt": "Keep talking", "max_tokens": 240, "ignore_eos": True, "temperature": 0}
    ).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_until(
            lambda: srv.engine.stats()["num_running"] == 1, timeout=20, what="the request to start", interval=0.002
        )
    # Closed while the engine is still generating (240 tokens take far longer than the poll interval).

    def aborted_and_freed():
        s = srv.engine.stats()
        return s["requests_aborted"] == before + 1 and s["kv_blocks_used"] == 0

    wait_until(aborted_and_freed, timeout=20, what="the abandoned non-streaming request to be aborted")
