"""The two real default models against transformers' own loading of the same files.

SmolLM2-135M (GGUF, Q4_1): same logits within fp32 tolerance and the same 32 greedy tokens for a few
prompts. MiniLM-L6 (HF folder): the same mean-pooled sentence embeddings (cosine > 1 - 1e-4).
Both skip with the pip command when the model package is not installed.
"""

from __future__ import annotations

import pytest
import torch

from plm_engine import load_model, load_tokenizer
from plm_engine.models.registry import default_model_path

transformers = pytest.importorskip("transformers")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,"]


def _path_or_skip(name):
    try:
        return default_model_path(name)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2():
    path = _path_or_skip("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m"), hf


def _greedy(model, ids, n, eos):
    """Greedy continuation with full forwards (no cache), an oracle independent of the generator; eos is
    suppressed as HF's min_new_tokens does, so both run the full n tokens."""
    out = ids
    with torch.no_grad():
        for _ in range(n):
            logits = model(out).logits[:, -1]
            logits[:, eos] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
    return out[0, ids.shape[1] :].tolist()


def test_smollm2_logits_match_transformers_gguf(smollm2):
    ours, tok, hf = smollm2
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            a = ours(ids).logits
            b = hf(input_ids=ids).logits
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= 1e-4 * scale, f"{prompt!r}: max |diff| {err:.3g}, logit scale {scale:.3g}"


def test_smollm2_greedy_tokens_match_transformers(smollm2):
    ours, tok, hf = smollm2
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ref = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=32,
                do_sample=False,
                min_new_tokens=32,
                pad_token_id=tok.eos_token_id,
            )[0, ids.shape[1] :].tolist()
        assert _greedy(ours, ids, 32, tok.eos_token_id) == ref, f"greedy continuation of {prompt!r} differs"


def test_minilm_embeddings_match_transformers():
    path = _path_or_skip("minilm-l6")
    ours, tok = load_model("minilm-l6"), load_tokenizer("minilm-l6")
    hf = transformers.BertModel.from_pretrained(path).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["A man is playing a guitar.", "The weather is lovely today!", "Transformers are neural networks.", "short"]
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    assert [tok.encode(t) for t in texts] == [
        row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    with torch.no_grad():
        ref_h = hf(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        ref = (ref_h * m).sum(1) / m.sum(1)
        emb = ours.embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)
    assert cos.min().item() > 1 - 1e-4, cos
    torch.testing.assert_close(emb, ref, rtol=1e-4, atol=1e-4)
