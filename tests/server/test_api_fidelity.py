"""The server-side parts of OpenAI/vLLM API fidelity: system_fingerprint, /v1/models/{id}, /tokenize and
/detokenize, echo, stop_token_ids and truncate_prompt_tokens, and a 400 (never silence) for every field
that would change the output and is not supported yet."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import ServerThread, tiny_engine

MODEL = "tiny"


@pytest.fixture(scope="module")
def srv(smollm2_tokenizer):
    from plm_engine.server import create_app

    engine = tiny_engine(smollm2_tokenizer, seed=3, max_num_seqs=4, kv_cache_tokens=2048)
    with ServerThread(create_app(engine, model_name=MODEL)) as s:
        s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        s.http = httpx.Client(base_url=s.url, timeout=60)
        s.tok = smollm2_tokenizer
        yield s
        s.http.close()


def test_system_fingerprint_and_finish_reasons(srv):
    chat = [{"role": "user", "content": "hi"}]
    fps = {
        srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=3).system_fingerprint,
        srv.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=3).system_fingerprint,
    }
    chunks = list(srv.client.chat.completions.create(model=MODEL, messages=chat, max_tokens=3, stream=True))
    fps |= {c.system_fingerprint for c in chunks}
    assert len(fps) == 1 and next(iter(fps)).startswith("fp_")
    assert {c.choices[0].finish_reason for c in chunks} <= {None, "stop", "length"}
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_models_retrieve(srv):
    m = srv.client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model" and m.model_extra["max_model_len"] == 256
    with pytest.raises(openai.NotFoundError):
        srv.client.models.retrieve("gpt-4o")


def test_tokenize_detokenize(srv):
    text = "Hello, world! Ünïcödé ✓"
    r = srv.http.post("/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == srv.tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    assert r["token_strs"] == [srv.tok.id_to_token(t) for t in r["tokens"]]
    back = srv.http.post("/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert back == {"prompt": text}
    messages = [{"role": "user", "content": "hi"}]
    chat = srv.http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert chat == srv.tok.encode(srv.tok.apply_chat_template(messages), add_special_tokens=False)
    no_gen = srv.http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()["tokens"]
    assert len(no_gen) < len(chat) and chat[: len(no_gen)] == no_gen
    # Its count is what a chat request is charged.
    usage = srv.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage
    assert usage.prompt_tokens == len(chat)
    for path, body, status in (
        ("/tokenize", {"prompt": "a", "messages": messages}, 400),
        ("/tokenize", {}, 400),
        ("/tokenize", {"model": "other", "prompt": "a"}, 404),
        ("/detokenize", {"tokens": [1, 10**9]}, 400),
        ("/detokenize", {"tokens": [-1]}, 400),
        ("/detokenize", {"tokens": "abc"}, 400),
    ):
        r = srv.http.post(path, json=body)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, body


def test_echo(srv):
    prompt = "Echo this prompt"
    plain = srv.client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=5)
    r = srv.client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=5, echo=True, n=2)
    assert [c.text for c in r.choices] == [prompt + plain.choices[0].text] * 2
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    # Token ids echo as their text, special tokens included.
    ids = [srv.tok.bos_token_id, *srv.tok.encode(prompt)]
    r = srv.client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=5, echo=True)
    assert r.choices[0].text.startswith(srv.tok.decode(ids, skip_special_tokens=False))
    assert r.choices[0].text.startswith(srv.tok.bos_token + prompt)
    stream = srv.client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=5, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == prompt + plain.choices[0].text


def test_stop_token_ids_and_truncate_prompt_tokens(srv):
    prompt = "Count with me: one two three four five six seven"
    plain = srv.client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=8, extra_body={"ignore_eos": True}
    )
    ids = srv.tok.encode(prompt)
    out = srv.http.post("/tokenize", json={"prompt": plain.choices[0].text, "add_special_tokens": False}).json()
    stop_id = out["tokens"][2]
    r = srv.client.completions.create(
        model=MODEL,
        prompt=prompt,
        temperature=0,
        max_tokens=8,
        extra_body={"stop_token_ids": [stop_id], "ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens <= 3
    with pytest.raises(openai.BadRequestError, match="stop_token_ids"):
        srv.client.completions.create(model=MODEL, prompt=prompt, extra_body={"stop_token_ids": [10**9]})
    # The last k prompt tokens only: the same answer as sending those k ids.
    r = srv.client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=6, extra_body={"truncate_prompt_tokens": 5}
    )
    tail = srv.client.completions.create(model=MODEL, prompt=ids[-5:], temperature=0, max_tokens=6)
    assert r.usage.prompt_tokens == 5 and r.choices[0].text == tail.choices[0].text
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens"):
        srv.client.completions.create(model=MODEL, prompt=prompt, extra_body={"truncate_prompt_tokens": 0})


# Output-changing fields still refused (structured output, logit_bias, min_tokens and the vLLM extras are
# supported: tests/server/test_structured_api.py).
UNSUPPORTED = {
    "json_schema": {"json_schema": {"type": "object"}},
    "prompt_logprobs": {"prompt_logprobs": 1},
    "use_beam_search": {"use_beam_search": True},
    "bad_words": {"bad_words": ["x"]},
    "allowed_token_ids": {"allowed_token_ids": [1, 2]},
    "typical_p": {"typical_p": 0.5},
    "mirostat": {"mirostat": 2},
    "length_penalty": {"length_penalty": 0.5},
    "guided_whitespace_pattern": {"guided_whitespace_pattern": " *"},
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_output_changing_fields_are_refused(srv, case, endpoint):
    extra = UNSUPPORTED[case]
    name = next(iter(extra))
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            srv.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body=extra
            )
        else:
            srv.client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body=extra)
    assert info.value.code == "unsupported_field" and info.value.param == name and name in str(info.value)


def test_no_op_values_and_unknown_fields_pass(srv):
    neutral = {
        "logit_bias": {},
        "response_format": {"type": "text"},
        "min_tokens": 0,
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
        "use_beam_search": False,
        "guided_json": None,
        "some_future_field": {"anything": 1},
    }
    r = srv.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body=neutral
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    for extra in ({"echo": True}, {"chat_template": "{{ 'x' }}"}, {"tools": [{"type": "function"}]}):
        with pytest.raises(openai.BadRequestError, match="not"):
            srv.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body=extra
            )
    with pytest.raises(openai.BadRequestError, match="suffix"):
        srv.client.completions.create(model=MODEL, prompt="hi", suffix="tail")
