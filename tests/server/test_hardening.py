"""Issue 16 point 1: what a public endpoint needs. One BOS for templates that write bos_token; token ids
and text checked (400, never a 500); errors with a generic message and a request id; no schema
endpoints; API keys compared as digests of the raw bytes; the Host header checked on loopback; CORS."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest

from tests.server.conftest import ServerThread, serve_args, tiny_bert, tiny_engine

MODEL = "tiny"

# A chat template that starts with {{ bos_token }}, as Llama 3's, Mistral's and Gemma's do.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[ {{ m['role'] }} ] {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}[ assistant ]{% endif %}"
)
WORDS = "[ ] system user assistant hello world what is two plus be brief".split()


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A word-level tokenizer whose post-processor prepends <s> (as Llama's and Mistral's do)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    from plm_engine.models.tokenizer import Tokenizer as PlmTokenizer

    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PlmTokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=BOS_TEMPLATE)


@pytest.fixture(scope="module")
def bos_server(bos_tokenizer):
    from plm_engine.server import create_app

    engine = tiny_engine(bos_tokenizer, max_num_seqs=2, kv_cache_tokens=1024)
    with ServerThread(create_app(engine, model_name=MODEL)) as srv:
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        srv.http = httpx.Client(base_url=srv.url, timeout=60)
        yield srv
        srv.http.close()


def test_chat_prompt_has_one_bos(bos_server, bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    assert bos_tokenizer.encode("hello world")[0] == bos  # the tokenizer adds a BOS to plain text
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus two"}]
    ids = bos_server.http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    assert ids[0] == bos and ids.count(bos) == 1, ids
    rendered = bos_tokenizer.apply_chat_template(messages)
    assert ids == bos_tokenizer.encode(rendered, add_special_tokens=False)
    # The chat request runs exactly those ids: same usage and same greedy text as a completion on them.
    chat = bos_server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6)
    assert chat.usage.prompt_tokens == len(ids)
    completion = bos_server.client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=6)
    assert chat.choices[0].message.content == completion.choices[0].text
    # A plain prompt keeps the tokenizer's BOS (one).
    r = bos_server.http.post("/tokenize", json={"prompt": "hello world"}).json()
    assert r["tokens"] == bos_tokenizer.encode("hello world") and r["tokens"].count(bos) == 1


@pytest.fixture(scope="module")
def served(smollm2_tokenizer, minilm_tokenizer):
    from plm_engine.server import Embedder, create_app

    embedder = Embedder(tiny_bert(minilm_tokenizer.vocab_size), minilm_tokenizer)
    engine = tiny_engine(smollm2_tokenizer)
    with ServerThread(create_app(engine, embedder, model_name=MODEL, embedding_model_name="emb")) as srv:
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        srv.http = httpx.Client(base_url=srv.url, timeout=60)
        srv.engine, srv.vocab = engine, minilm_tokenizer.vocab_size
        yield srv
        srv.http.close()


def test_embedding_token_ids_are_range_checked(served):
    for bad in ([1, served.vocab], [5, -1], [[101, 2000], [10**9]]):
        with pytest.raises(openai.BadRequestError, match=r"token ids must be ints in \[0, "):
            served.client.embeddings.create(model="emb", input=bad)
    ok = served.client.embeddings.create(model="emb", input=[101, 2000, 102], encoding_format="float")
    assert len(ok.data[0].embedding) > 0
    assert served.http.get("/health").status_code == 200


RAW_SURROGATE = "a\\ud800b"  # valid JSON for a lone surrogate, which no UTF-8 tokenizer can take


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "{RAW_SURROGATE}", "max_tokens": 2}}'),
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": ["ok", "{RAW_SURROGATE}"], "max_tokens": 2}}'),
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "hi", "stop": ["{RAW_SURROGATE}"]}}'),
        (
            "/v1/chat/completions",
            f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "{RAW_SURROGATE}"}}]}}',
        ),
        ("/v1/embeddings", f'{{"model": "emb", "input": "{RAW_SURROGATE}"}}'),
        ("/tokenize", f'{{"prompt": "{RAW_SURROGATE}"}}'),
        ("/v1/completions", f'{{"model": "{RAW_SURROGATE}", "prompt": "hi"}}'),  # echoed in the 404
    ],
)
def test_lone_surrogates_are_a_4xx(served, path, body):
    r = served.http.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if r.status_code == 400:
        assert "surrogate" in err["message"] and err["code"] == "invalid_text"


def test_internal_errors_are_generic_with_a_request_id(smollm2_tokenizer, caplog):
    from plm_engine.server import create_app

    class Broken:
        """The real tokenizer, except that encoding fails with an internal detail in its message."""

        def __getattr__(self, name):
            return getattr(smollm2_tokenizer, name)

        def encode_batch(self, texts, add_special_tokens=True):
            raise RuntimeError("secret-internal-detail at 0xdeadbeef")

    engine = tiny_engine(smollm2_tokenizer, max_num_seqs=1, kv_cache_tokens=512)
    with ServerThread(create_app(engine, model_name=MODEL, tokenizer=Broken())) as srv:
        with caplog.at_level(logging.ERROR, logger="plm_engine.server"):
            r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 500
        rid = r.headers["x-request-id"]
        msg = r.json()["error"]["message"]
        assert "secret" not in msg and "0xdeadbeef" not in msg and rid in msg
        assert any(rid in rec.getMessage() and "secret-internal-detail" in str(rec.exc_info) for rec in caplog.records)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert info.value.request_id and info.value.request_id in str(info.value)
        # Token-id prompts need no tokenizing: still served.
        assert client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2).usage.completion_tokens >= 1


def test_echoed_input_is_cut(served):
    huge = "x" * 100_000
    for body in (
        {"model": huge, "prompt": "hi"},
        {"model": MODEL, "prompt": "hi", "temperature": huge},
        {"model": MODEL, "prompt": {"deep": [huge] * 3}},
        {"model": MODEL, "prompt": "hi", "logit_bias": {huge: 1}},
    ):
        r = served.http.post("/v1/completions", json=body)
        assert 400 <= r.status_code < 500
        err = r.json()["error"]
        assert len(err["message"]) < 600, err["message"][:300]
        assert err["param"] is None or len(err["param"]) <= 200
    assert len(served.http.get("/v1/models/" + "m" * 8000).json()["error"]["message"]) < 600


def test_no_schema_endpoints(served):
    for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
        assert served.http.get(path).status_code == 404


def test_api_key_digest_non_ascii_and_scope(smollm2_tokenizer):
    from plm_engine.server import create_app

    key = "clé-秘密-🔑"
    engine = tiny_engine(smollm2_tokenizer, max_num_seqs=1, kv_cache_tokens=512)
    with ServerThread(create_app(engine, model_name=MODEL, api_key=key)) as srv:
        good = {"Authorization": b"Bearer " + key.encode("utf-8")}
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        r = httpx.post(srv.url + "/v1/completions", json=body, headers=good)
        assert r.status_code == 200, r.text
        for bad in (
            b"Bearer " + key.encode("latin-1", "replace"),
            b"Bearer cl\xe9",
            b"Bearer " + key.encode()[:-1],
            b"",
        ):
            r = httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": bad})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        # Everything but the probes needs the key, the vLLM-style endpoints and unknown paths included.
        for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/models/tiny"), ("GET", "/x")):
            assert httpx.request(method, srv.url + path, json={}).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200 and httpx.get(srv.url + "/metrics").status_code == 200
        ascii_engine_key = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            ascii_engine_key.models.list()


def test_host_header_checked_on_loopback(smollm2_tokenizer):
    from plm_engine.server import cli, create_app

    args = serve_args("--allowed-host", "my-proxy.internal")
    hosts = cli.allowed_hosts(args)
    assert set(hosts) >= {"localhost", "127.0.0.1", "::1", "my-proxy.internal"}
    assert cli.allowed_hosts(serve_args("--host", "0.0.0.0")) is None  # a public bind is reached by any name

    engine = tiny_engine(smollm2_tokenizer, max_num_seqs=1, kv_cache_tokens=512)
    with ServerThread(create_app(engine, model_name=MODEL, allowed_hosts=hosts)) as srv:
        port = srv.port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "my-proxy.internal"):
            assert httpx.get(srv.url + "/v1/models", headers={"Host": host}).status_code == 200, host
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io", "", "localhost.evil"):
            r = httpx.get(srv.url + "/v1/models", headers={"Host": host})
            assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_host", host
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL]


def test_cors_origin(smollm2_tokenizer):
    from plm_engine.server import create_app

    engine = tiny_engine(smollm2_tokenizer, max_num_seqs=1, kv_cache_tokens=512)
    app = create_app(engine, model_name=MODEL, api_key="k", cors_origins=["https://app.example"])
    with ServerThread(app) as srv:
        pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        r = httpx.options(
            srv.url + "/v1/completions", headers={**pre, "Access-Control-Request-Headers": "authorization"}
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.options(srv.url + "/v1/completions", headers={**pre, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        # Errors reach the page too (the browser needs the header to read them).
        r = httpx.get(srv.url + "/v1/models", headers={"Origin": "https://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
    # Without --cors-origin no CORS header is ever sent.
    engine = tiny_engine(smollm2_tokenizer, max_num_seqs=1, kv_cache_tokens=512)
    with ServerThread(create_app(engine, model_name=MODEL)) as srv:
        r = httpx.get(srv.url + "/v1/models", headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_error_replies_are_json_even_for_odd_input(served):
    # Bodies whose error message would quote text that is not UTF-8-encodable or not JSON at all.
    for raw in (b'{"model": "\\udfff", "prompt": 1}', b"\xff\xfe", b'{"model": "tiny", "prompt": "hi", "n": 1e400}'):
        r = served.http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and json.loads(r.text)["error"]["message"]
