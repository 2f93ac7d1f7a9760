"""A dead engine (its step keeps raising, as after a CUDA error): in-flight streams end with an error event
and [DONE], /health turns 503, new requests fail at once with 503, and requests whose listener is gone
never run. Aborted requests never show finish_reason "abort" (not in OpenAI's set)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from tests.server.conftest import ServerThread, tiny_engine, wait_until

MODEL = "tiny"


def sse_events(response) -> list:
    """The data payloads of a server-sent-event stream: dicts, and the string "[DONE]"."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_dead_engine(smollm2_tokenizer):
    from plm_engine.server import create_app

    engine = tiny_engine(smollm2_tokenizer, max_num_seqs=2, kv_cache_tokens=1024)
    inner = engine.engine
    calls = []

    def broken_step():
        calls.append(time.monotonic())
        raise RuntimeError("CUDA error: an illegal memory access was encountered (secret detail)")

    with ServerThread(create_app(engine, model_name=MODEL)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=30)
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        inner.step = broken_step  # from here on every step fails

        # A stream in flight: headers were sent, so the failure arrives in-band and the stream still ends.
        body = {"model": MODEL, "prompt": "Tell me", "max_tokens": 50, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            rid = r.headers["x-request-id"]
            events = sse_events(r)
        assert events[-1] == "[DONE]" and "error" in events[-2], events
        msg = events[-2]["error"]["message"]
        assert rid in msg and "secret" not in msg and "CUDA" not in msg
        # The openai client raises on that event.
        with pytest.raises(openai.APIError):
            for _ in client.completions.create(model=MODEL, prompt="again", max_tokens=5, stream=True):
                pass
        # A third failed step in a row: the engine declares itself dead.
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert info.value.status_code in (500, 503)
        wait_until(lambda: not engine.is_alive(), timeout=10, what="the engine to be declared dead")
        assert len(calls) == 3

        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert "secret" not in r.text
        t0 = time.monotonic()
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                client.completions.create(model=MODEL, prompt="hi", max_tokens=5, stream=stream)
            assert info.value.status_code == 503 and info.value.code == "engine_dead"
        assert time.monotonic() - t0 < 5  # fast: nothing waits on a loop that is gone
        assert len(calls) == 3  # nothing ran any more
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'plm_engine_requests_rejected_total{reason="engine_dead"} 2.0' in metrics


def test_requests_without_a_listener_never_run(smollm2_tokenizer):
    """A failed step fails every registered stream, those whose add command is still queued included:
    those adds must be dropped, not run for nobody."""
    from plm_engine.generation import SamplingParams

    engine = tiny_engine(smollm2_tokenizer, max_num_seqs=2, kv_cache_tokens=1024)
    inner = engine.engine
    go, calls = threading.Event(), []

    def step_then_fail():
        calls.append(1)
        go.wait(10)  # hold the step thread while a second request is submitted
        raise RuntimeError("boom")

    original, inner.step = inner.step, step_then_fail
    params = SamplingParams(temperature=0, max_tokens=4)

    async def main():
        async def consume(prompt):
            try:
                async for _ in engine.stream(prompt, params):
                    pass
            except RuntimeError as e:
                return str(e)
            return "finished"

        first = asyncio.ensure_future(consume([1, 2, 3]))
        while not calls:
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(consume([4, 5, 6, 7]))
        while not engine._cmds:  # its add waits behind the running step
            await asyncio.sleep(0.01)
        go.set()
        return await asyncio.gather(first, second)

    try:
        assert asyncio.run(asyncio.wait_for(main(), 30)) == ["boom", "boom"]
        time.sleep(0.3)  # give the loop time to (wrongly) admit and step the second request
        assert len(calls) == 1, "a request whose listener had gone was run"
        s = engine.stats()
        assert s["prompt_tokens_total"] == 3 and s["num_waiting"] == s["num_running"] == s["kv_blocks_used"] == 0
        assert engine.is_alive()  # one failed step is not death
    finally:
        inner.step = original
        engine.shutdown()


def test_abort_is_not_a_finish_reason(smollm2_tokenizer):
    from plm_engine.server import create_app

    engine = tiny_engine(smollm2_tokenizer, max_num_seqs=2, kv_cache_tokens=1024)
    with ServerThread(create_app(engine, model_name=MODEL)) as srv:
        body = {"model": MODEL, "prompt": "Go on", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            engine.shutdown()  # the server aborts what is in flight
            events = [json.loads(first[6:])] + [
                x if x == "[DONE]" else json.loads(x) for x in (line[6:] for line in lines if line.startswith("data: "))
            ]
        assert events[-1] == "[DONE]"
        reasons = {c.get("finish_reason") for e in events[:-1] for c in e.get("choices", [])}
        assert reasons <= {None, "stop", "length"}, reasons
        assert events[-2]["error"]["code"] == "aborted"
