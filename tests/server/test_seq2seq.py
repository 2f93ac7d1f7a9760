"""/v1/completions with an encoder-decoder model: a tiny random BART with a seq2seq BPE tokenizer answers
what the offline engine answers (greedy), streamed and not, with the source's token count as usage."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.server.conftest import ServerThread

PROMPTS = ["the king speaks of war", "love and night"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from plm_engine.generation import AsyncEngine, Engine, SamplingParams
    from plm_engine.models import ModelConfig, build_model
    from plm_engine.models.tokenizer import Tokenizer
    from plm_engine.server import create_app
    from plm_engine.training import data as D

    tmp = tmp_path_factory.mktemp("seq2seq")
    corpus = tmp / "corpus.txt"
    corpus.write_text("the king and the queen speak of love and war and night\n" * 50)
    D.train_bpe([str(corpus)], 300, style="seq2seq").save(str(tmp / "tok"))
    tok = Tokenizer.from_folder(tmp / "tok")
    config = ModelConfig.preset(
        "bart-tiny",
        vocab_size=tok.vocab_size,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():  # larger random weights than the training init, so the greedy answer varies
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = dict(zip(PROMPTS, Engine(model, tokenizer=tok, max_num_seqs=4).generate(PROMPTS, greedy)))
    engine = AsyncEngine(Engine(model, tokenizer=tok, max_num_seqs=4, kv_cache_tokens=1024))
    with ServerThread(create_app(engine, model_name="tiny-bart")) as srv:
        srv.expected = expected
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield srv


def test_completions_with_a_seq2seq_model(served):
    extra = {"ignore_eos": True}
    for p in PROMPTS:
        exp = served.expected[p]
        assert len(exp.token_ids) == MAX_TOKENS and exp.text
        r = served.client.completions.create(
            model="tiny-bart", prompt=p, temperature=0, max_tokens=MAX_TOKENS, extra_body=extra
        )
        assert r.choices[0].text == exp.text
        assert r.usage.prompt_tokens == len(exp.prompt_token_ids)  # the encoder's input, </s> included
        assert r.usage.completion_tokens == MAX_TOKENS
    stream = served.client.completions.create(
        model="tiny-bart", prompt=PROMPTS[0], temperature=0, max_tokens=MAX_TOKENS, stream=True, extra_body=extra
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == served.expected[PROMPTS[0]].text
