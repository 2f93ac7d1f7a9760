"""Our Transformer against HF transformers on the same random weights (saved with save_pretrained).

fp32 logits must agree to 1e-4 of the logit scale, with and without padding; bf16 follows the 2x rule
against an fp64 HF run. No hub access: every model is built from a config.
"""

from __future__ import annotations

import copy

import pytest
import torch

from plm_engine.models import ModelConfig, Transformer, load_model
from tests.tiny_models import randomize, saved_random_hf
from tests.utils import assert_2x_rule, assert_logits_match

transformers = pytest.importorskip("transformers")

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
BERT = dict(COMMON, intermediate_size=112, hidden_dropout_prob=0, attention_probs_dropout_prob=0)


def _hf_configs():
    t = transformers
    return {
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(**COMMON, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)),
        "bert": lambda: t.BertForMaskedLM(t.BertConfig(**BERT)),
        "llama-gqa": lambda: t.LlamaForCausalLM(
            t.LlamaConfig(
                **COMMON, intermediate_size=112, num_key_value_heads=2, rope_theta=5e4, tie_word_embeddings=False
            )
        ),
        "qwen2-bias": lambda: t.Qwen2ForCausalLM(
            t.Qwen2Config(**COMMON, intermediate_size=112, num_key_value_heads=1, tie_word_embeddings=True)
        ),
        "llama3-scaling": lambda: t.LlamaForCausalLM(
            t.LlamaConfig(
                **{**COMMON, "max_position_embeddings": 256},
                intermediate_size=112,
                num_key_value_heads=4,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
                rope_theta=5e5,
            )
        ),
    }


@pytest.fixture(scope="module", params=list(_hf_configs()))
def pair(request, tmp_path_factory):
    return saved_random_hf(request.param, _hf_configs()[request.param], tmp_path_factory)


def _inputs(b=3, s=21, pad=None):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if pad == "right":
        mask[1, 13:] = 0
        mask[2, 5:] = 0
    elif pad == "left":
        mask[1, :8] = 0
        mask[2, :17] = 0
    return ids, mask


def _hf_logits(hf, ids, mask):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits.float()


@pytest.mark.parametrize("pad", [None, "right", "left"])
def test_fp32_logits_match_transformers(pair, pad):
    name, hf, path = pair
    if pad == "left" and name == "bert":
        pytest.skip("BERT is right-padded")
    ours = load_model(path, dtype=torch.float32)
    ids, mask = _inputs(pad=pad)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask if pad else None).logits
    ref = _hf_logits(hf, ids, mask)
    assert_logits_match(out, ref, mask.bool(), name, pad)


def test_bf16_follows_2x_rule(pair):
    name, hf, path = pair
    ours = load_model(path, dtype=torch.bfloat16)
    ids, mask = _inputs(pad="right")
    with torch.no_grad():
        out = ours(ids, attention_mask=mask).logits.float()
    ref = _hf_logits(copy.deepcopy(hf).double(), ids, mask)
    low = _hf_logits(copy.deepcopy(hf).to(torch.bfloat16), ids, mask)
    keep = mask.bool()
    # 2x HF's own bf16 error, with bf16's atol scaled by the logits.
    assert_2x_rule(out[keep], ref[keep], low[keep], dtype=torch.bfloat16, what=f"{name} bf16 logits")


def test_save_pretrained_round_trip(pair, tmp_path):
    """Ours -> save_pretrained -> transformers and -> load_model give the same logits."""
    name, hf, path = pair
    ours = load_model(path)
    ours.save_pretrained(tmp_path)
    back = type(hf).from_pretrained(tmp_path).eval()
    ids, mask = _inputs()
    torch.testing.assert_close(_hf_logits(back, ids, mask), _hf_logits(hf, ids, mask), rtol=0, atol=0)
    again = load_model(tmp_path)
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_causal_loss_and_grads_match_transformers(pair):
    name, hf, path = pair
    if name == "bert":
        pytest.skip("masked LM: see test_mlm_loss_matches_transformers")
    ours = load_model(path).train()
    ids, mask = _inputs(pad="right")
    labels = ids.masked_fill(mask == 0, -100)
    loss = ours(ids, attention_mask=mask, labels=labels).loss
    ref = hf.train()(input_ids=ids, attention_mask=mask, labels=labels).loss
    hf.eval()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    ref.backward()
    ours_emb = ours.tok_embed.weight.grad
    hf_emb = hf.get_input_embeddings().weight.grad
    torch.testing.assert_close(ours_emb, hf_emb, rtol=1e-4, atol=1e-5)
    hf.zero_grad()


def test_mlm_loss_matches_transformers(pair):
    name, hf, path = pair
    if name != "bert":
        pytest.skip("BERT only")
    ours = load_model(path)
    ids, mask = _inputs(pad="right")
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    labels[mask == 0] = -100
    with torch.no_grad():
        loss = ours(ids, attention_mask=mask, labels=labels).loss
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_classification_matches_transformers(tmp_path):
    t = transformers
    cfg = t.BertConfig(**BERT, num_labels=3)
    hf = t.BertForSequenceClassification(cfg).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.num_labels == 3
    ids, mask = _inputs(pad="right")
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = ours.classify(ids, attention_mask=mask, labels=labels)
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)


def test_from_scratch_presets_train_step():
    for name in ("gpt2-tiny", "bert-tiny", "llama-tiny"):
        model = Transformer(ModelConfig.preset(name)).train()
        ids = torch.randint(0, 512, (2, 9))
        labels = ids.clone() if name != "bert-tiny" else ids.masked_fill(torch.rand(2, 9) < 0.5, -100)
        loss = model(ids, labels=labels).loss
        loss.backward()
        assert torch.isfinite(loss) and 5.0 < loss.item() < 7.5  # ~ln(512) at init
        no_grad = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith("pooler")]
        assert not no_grad, f"{name}: parameters without a gradient: {no_grad}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_train_step(dtype):
    """Under autocast the residual stream stays fp32 and the fused ops get consistent dtypes."""
    for name in ("gpt2-tiny", "bert-tiny", "llama-tiny"):
        model = Transformer(ModelConfig.preset(name, num_labels=2)).train()
        ids = torch.randint(0, 512, (2, 9))
        labels = ids.clone() if name != "bert-tiny" else ids.masked_fill(torch.rand(2, 9) < 0.5, -100)
        with torch.autocast("cpu", dtype=dtype):
            ref = model(ids, labels=labels).loss
            loss = ref + model.classify(ids, labels=torch.tensor([0, 1])).loss
        loss.backward()
        with torch.no_grad():
            fp32 = model(ids, labels=labels).loss
        assert torch.isfinite(loss) and abs(ref.item() - fp32.item()) < 0.05 * fp32.item(), (name, ref, fp32)
        assert all(
            p.grad is not None and torch.isfinite(p.grad).all()
            for n, p in model.named_parameters()
            if not n.startswith("pooler")
        )
