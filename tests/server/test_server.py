"""The OpenAI-compatible server through the official `openai` client and raw HTTP: greedy answers equal
the offline engine's, streaming, logprobs, seeds, stops, embeddings, metrics, bad input, API key.

One tiny random llama (SmolLM2 tokenizer and chat template) and one tiny random BERT (MiniLM tokenizer)
serve every test in this module; the expected answers come from an offline Engine over the same weights.
"""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch

from tests.server.conftest import ServerThread, tiny_bert, tiny_llama, wait_until

MODEL, EMB_MODEL = "tiny-llama", "tiny-bert"
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,", "def fibonacci(n):"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
MAX_TOKENS = 12
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def served(smollm2_tokenizer, minilm_tokenizer):
    from plm_engine.generation import AsyncEngine, Engine, SamplingParams
    from plm_engine.server import Embedder, ServerLimits, create_app

    tok = smollm2_tokenizer
    model = tiny_llama(tok.vocab_size)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    offline = Engine(model, tokenizer=tok, max_num_seqs=8, kv_cache_tokens=4096)
    chat_prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    outs = offline.generate(PROMPTS + [chat_prompt], greedy)
    expected = dict(zip(PROMPTS + ["chat"], outs))
    del offline

    bert = tiny_bert(minilm_tokenizer.vocab_size)
    embedder = Embedder(bert, minilm_tokenizer)
    engine = AsyncEngine(Engine(model, tokenizer=tok, max_num_seqs=16, kv_cache_tokens=8192))
    app = create_app(
        engine,
        embedder,
        model_name=MODEL,
        embedding_model_name=EMB_MODEL,
        limits=ServerLimits(max_body_bytes=BODY_LIMIT),
    )
    with ServerThread(app) as srv:
        srv.expected, srv.tok, srv.engine, srv.embedder = expected, tok, engine, embedder
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        srv.http = httpx.Client(base_url=srv.url, timeout=60)
        yield srv
        srv.http.close()


def test_models_and_health(served):
    ids = [m.id for m in served.client.models.list().data]
    assert ids == [MODEL, EMB_MODEL]
    r = served.http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_completions_equal_offline(served):
    for p in PROMPTS:
        exp = served.expected[p]
        r = served.client.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=MAX_TOKENS)
        assert r.object == "text_completion" and r.model == MODEL
        c = r.choices[0]
        assert c.text == exp.text and c.finish_reason == exp.finish_reason
        assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert r.usage.completion_tokens == len(exp.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # All prompts in one request: one choice per prompt, in prompt order.
    r = served.client.completions.create(model=MODEL, prompt=PROMPTS, temperature=0, max_tokens=MAX_TOKENS)
    assert [c.index for c in r.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in r.choices] == [served.expected[p].text for p in PROMPTS]
    r = served.client.completions.create(
        model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=MAX_TOKENS, echo=True
    )
    assert r.choices[0].text == PROMPTS[0] + served.expected[PROMPTS[0]].text
    # Token-id prompts are taken as they are.
    ids = served.expected[PROMPTS[0]].prompt_token_ids
    r = served.client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=MAX_TOKENS)
    assert r.choices[0].text == served.expected[PROMPTS[0]].text


def test_completions_stream_equals_offline(served):
    p = PROMPTS[1]
    exp = served.expected[p]
    chunks = list(
        served.client.completions.create(
            model=MODEL,
            prompt=p,
            temperature=0,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == exp.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == exp.finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == len(exp.token_ids)
    assert usage_chunk.usage.prompt_tokens == len(exp.prompt_token_ids)


def test_chat_equals_offline(served):
    exp = served.expected["chat"]
    r = served.client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=MAX_TOKENS)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == exp.text
    assert r.choices[0].finish_reason == exp.finish_reason
    assert r.usage.prompt_tokens == len(exp.prompt_token_ids) and r.usage.completion_tokens == len(exp.token_ids)

    stream = served.client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_completion_tokens=MAX_TOKENS, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == exp.text
    assert chunks[-1].choices[0].finish_reason == exp.finish_reason
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)

    # n=2 streams two choices interleaved; greedy, both are the offline answer.
    texts, finish = {0: "", 1: ""}, {}
    for c in served.client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=MAX_TOKENS, n=2, stream=True
    ):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason or finish.get(ch.index)
    assert texts == {0: exp.text, 1: exp.text} and finish == {0: exp.finish_reason, 1: exp.finish_reason}


def test_chat_without_max_tokens_fills_the_context(served):
    # No max_tokens: the rest of the context; ignore_eos (an engine extension) keeps it going to the end.
    exp = served.expected["chat"]
    r = served.client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == 256 == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].message.content.startswith(exp.text)


def test_logprobs(served):
    p = PROMPTS[0]
    exp = served.expected[p]
    r = served.client.completions.create(model=MODEL, prompt=p, temperature=0, max_tokens=MAX_TOKENS, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(exp.token_ids)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-4)  # greedy takes the most likely token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    r = served.client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert all(math.isclose(t.logprob, t.top_logprobs[0].logprob, abs_tol=1e-4) for t in content)


def test_seed_n_and_stop(served):
    kw = dict(model=MODEL, prompt=PROMPTS[2], temperature=1.0, top_p=0.9, max_tokens=8, seed=1234)
    a, b = served.client.completions.create(**kw), served.client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text  # a seed makes sampling reproducible
    r = served.client.completions.create(**{**kw, "n": 3})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.choices[0].text == a.choices[0].text  # sample j uses seed + j
    assert r.usage.prompt_tokens == len(served.expected[PROMPTS[2]].prompt_token_ids)

    exp = served.expected[PROMPTS[3]].text
    visible = [i for i, ch in enumerate(exp) if i >= 2 and not ch.isspace()]
    if not visible:
        pytest.skip("the random model's greedy text has no usable stop string")
    stop = exp[visible[0] : visible[0] + 2]
    r = served.client.completions.create(
        model=MODEL, prompt=PROMPTS[3], temperature=0, max_tokens=MAX_TOKENS, stop=[stop, "\x00never"]
    )
    assert r.choices[0].text == exp[: exp.find(stop)] and r.choices[0].finish_reason == "stop"


def test_embeddings(served):
    texts = ["A sentence to embed.", "Another, longer sentence to embed for the test."]
    ids = [served.embedder.tokenize(t) for t in texts]
    ref = served.embedder.embed_ids(ids)  # (2, hidden), unit rows
    assert torch.allclose(ref.norm(dim=-1), torch.ones(2), atol=1e-5)
    for fmt in ("base64", "float"):  # the client asks for base64 unless told
        kw = {} if fmt == "base64" else {"encoding_format": "float"}
        r = served.client.embeddings.create(model=EMB_MODEL, input=texts, **kw)
        got = torch.tensor([d.embedding for d in sorted(r.data, key=lambda d: d.index)])
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5)
        assert r.usage.prompt_tokens == sum(len(x) for x in ids) == r.usage.total_tokens
    # Batching pads: each input alone embeds the same.
    alone = served.client.embeddings.create(model=EMB_MODEL, input=texts[0], encoding_format="float")
    assert torch.allclose(torch.tensor(alone.data[0].embedding), ref[0], atol=1e-5)


def test_metrics_after_requests(served):
    served.client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=4)
    r = served.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['plm_engine_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert samples["plm_engine_prompt_tokens_total"] > 0 and samples["plm_engine_generation_tokens_total"] > 0
    assert samples["plm_engine_time_to_first_token_seconds_count"] >= 1
    assert samples["plm_engine_inter_token_latency_seconds_count"] >= 1
    for name in (
        "num_requests_waiting",
        "num_requests_running",
        "kv_cache_blocks_total",
        "kv_cache_blocks_used",
        "kv_cache_usage_ratio",
    ):
        assert f"plm_engine_{name}" in samples
    assert samples["plm_engine_kv_cache_blocks_total"] > 0


def _post(path, body):
    return ("POST", path, json.dumps(body).encode())


GOOD = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
CHAT_OK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_INPUTS = {
    "malformed json": ("POST", "/v1/completions", b'{"model": "tiny-llama", "prompt": '),
    "json array body": _post("/v1/completions", [1, 2]),
    "empty body": ("POST", "/v1/completions", b""),
    "missing prompt": _post("/v1/completions", {"model": MODEL}),
    "missing model": _post("/v1/completions", {"prompt": "hi"}),
    "prompt wrong type": _post("/v1/completions", {**GOOD, "prompt": {"text": "hi"}}),
    "empty prompt": _post("/v1/completions", {**GOOD, "prompt": ""}),
    "max_tokens wrong type": _post("/v1/completions", {**GOOD, "max_tokens": "many"}),
    "max_tokens zero": _post("/v1/completions", {**GOOD, "max_tokens": 0}),
    "unknown model": _post("/v1/completions", {**GOOD, "model": "gpt-9"}),
    "prompt longer than context": _post("/v1/completions", {**GOOD, "prompt": "hello " * 400}),
    "max_tokens beyond context": _post("/v1/completions", {**GOOD, "max_tokens": 1000}),
    "token id out of vocab": _post("/v1/completions", {**GOOD, "prompt": [1, 2, 10**9]}),
    "negative token id": _post("/v1/completions", {**GOOD, "prompt": [1, -5]}),
    "temperature too high": _post("/v1/completions", {**GOOD, "temperature": 5}),
    "temperature negative": _post("/v1/completions", {**GOOD, "temperature": -0.5}),
    "top_p above 1": _post("/v1/completions", {**GOOD, "top_p": 1.5}),
    "top_p zero": _post("/v1/completions", {**GOOD, "top_p": 0}),
    "presence penalty": _post("/v1/completions", {**GOOD, "presence_penalty": 3}),
    "frequency penalty nan": (
        "POST",
        "/v1/completions",
        b'{"model": "tiny-llama", "prompt": "hi", "frequency_penalty": NaN}',
    ),
    "top_k wrong type": _post("/v1/completions", {**GOOD, "top_k": "x"}),
    "min_p above 1": _post("/v1/completions", {**GOOD, "min_p": 2}),
    "repetition penalty zero": _post("/v1/completions", {**GOOD, "repetition_penalty": 0}),
    "logprobs too many": _post("/v1/completions", {**GOOD, "logprobs": 50}),
    "n zero": _post("/v1/completions", {**GOOD, "n": 0}),
    "n too many choices": _post("/v1/completions", {**GOOD, "n": 100}),
    "seed negative": _post("/v1/completions", {**GOOD, "seed": -1}),
    "stop wrong type": _post("/v1/completions", {**GOOD, "stop": 5}),
    "too many stops": _post("/v1/completions", {**GOOD, "stop": [f"s{i}" for i in range(20)]}),
    "empty stop": _post("/v1/completions", {**GOOD, "stop": [""]}),
    "best_of": _post("/v1/completions", {**GOOD, "best_of": 3}),
    "logit_bias id out of range": _post("/v1/completions", {**GOOD, "logit_bias": {"999999": 10}}),
    "chat missing messages": _post("/v1/chat/completions", {"model": MODEL}),
    "chat empty messages": _post("/v1/chat/completions", {**CHAT_OK, "messages": []}),
    "chat bad role": _post("/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "wizard", "content": "x"}]}),
    "chat message not object": _post("/v1/chat/completions", {**CHAT_OK, "messages": ["hi"]}),
    "chat image part": _post(
        "/v1/chat/completions",
        {
            **CHAT_OK,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
        },
    ),
    "chat tools": _post(
        "/v1/chat/completions", {**CHAT_OK, "tools": [{"type": "function", "function": {"name": "f"}}]}
    ),
    "chat top_logprobs without logprobs": _post("/v1/chat/completions", {**CHAT_OK, "top_logprobs": 2}),
    "chat max_tokens beyond context": _post("/v1/chat/completions", {**CHAT_OK, "max_tokens": 500}),
    "chat unknown model": _post("/v1/chat/completions", {**CHAT_OK, "model": "nope"}),
    "embeddings unknown model": _post("/v1/embeddings", {"model": MODEL, "input": "x"}),
    "embeddings empty input": _post("/v1/embeddings", {"model": EMB_MODEL, "input": ""}),
    "embeddings input too long": _post("/v1/embeddings", {"model": EMB_MODEL, "input": "word " * 600}),
    "embeddings wrong format": _post("/v1/embeddings", {"model": EMB_MODEL, "input": "x", "encoding_format": "hex"}),
    "embeddings dimensions": _post("/v1/embeddings", {"model": EMB_MODEL, "input": "x", "dimensions": 7}),
    "oversized body": _post("/v1/completions", {**GOOD, "prompt": "x" * (BODY_LIMIT + 10)}),
    "unknown path": ("POST", "/v1/engines/foo", b"{}"),
    "wrong method": ("GET", "/v1/completions", None),
}
STATUS = {
    "unknown model": 404,
    "chat unknown model": 404,
    "embeddings unknown model": 404,
    "oversized body": 413,
    "unknown path": 404,
    "wrong method": 405,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_openai_error(served, case):
    method, path, body = BAD_INPUTS[case]
    r = served.http.request(method, path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == STATUS.get(case, 400), r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert set(err) == {"message", "type", "param", "code"}


def test_bad_input_leaves_server_healthy(served):
    # A chunked body (no Content-Length) past the limit is cut off too.
    def chunks():
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b" " * 1024

    r = served.http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # The openai client raises its typed errors from our bodies.
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        served.client.completions.create(model=MODEL, prompt="hi", max_tokens=10_000)
    with pytest.raises(openai.NotFoundError, match="not found"):
        served.client.chat.completions.create(model="gpt-4o", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        served.client.chat.completions.create(model=MODEL, messages=CHAT, temperature=9)
    assert served.http.get("/health").status_code == 200
    r = served.client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=MAX_TOKENS)
    assert r.choices[0].text == served.expected[PROMPTS[0]].text
    # The engine's counters are a snapshot taken at the end of a step: the reply can reach the client first.
    idle = lambda s: s["num_running"] == 0 and s["num_waiting"] == 0 and s["kv_blocks_used"] == 0
    wait_until(lambda: idle(served.engine.stats()), timeout=10, what="the engine to go idle")


def test_api_key(smollm2_tokenizer):
    from plm_engine.generation import AsyncEngine, Engine
    from plm_engine.server import create_app

    engine = AsyncEngine(
        Engine(
            tiny_llama(smollm2_tokenizer.vocab_size), tokenizer=smollm2_tokenizer, max_num_seqs=2, kv_cache_tokens=512
        )
    )
    with ServerThread(create_app(engine, api_key="s3cret", model_name=MODEL)) as srv:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(srv.url + "/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(**body).usage.completion_tokens >= 1
        assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'plm_engine_requests_total{endpoint="/v1/completions",status="401"} 3' in metrics
        engine.shutdown()  # a dead step loop must show in the health probe
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
