"""Seq2SeqTransformer against HF transformers on the same random weights: BART (post-norm, learned
positions), mBART (pre-norm, scaled embeddings), Marian (sinusoidal positions; shared and separate
vocabularies), T5 (relative position buckets; tied head with the rescale, and untied).

fp32 logits must agree to 1e-4 of the logit scale on padded batches (both sides padded); loss and
gradients agree; save_pretrained round-trips through transformers. No hub access: every model is built
from a config with random weights.
"""

from __future__ import annotations

import math

import pytest
import torch

from plm_engine.models import ModelConfig, Seq2SeqTransformer, build_model, load_model

transformers = pytest.importorskip("transformers")

VOCAB = 320
BART_COMMON = dict(
    vocab_size=VOCAB,
    d_model=64,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=112,
    decoder_ffn_dim=112,
    max_position_embeddings=64,
    dropout=0.0,
    forced_eos_token_id=None,
)


def hf_models() -> dict:
    """name -> a builder of a random-init transformers model (the families and their variants)."""
    t = transformers
    t5 = dict(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=8,  # heads x d_kv = 32 != d_model: the projections are not square
        d_ff=112,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=20,  # short, so the log-spaced buckets are exercised
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    marian = dict(BART_COMMON, pad_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 1, eos_token_id=0)
    return {
        "bart": lambda: t.BartForConditionalGeneration(t.BartConfig(**BART_COMMON)),
        "mbart": lambda: t.MBartForConditionalGeneration(
            t.MBartConfig(**BART_COMMON, scale_embedding=True, activation_function="relu", decoder_start_token_id=2)
        ),
        "marian": lambda: t.MarianMTModel(t.MarianConfig(**marian, scale_embedding=True, activation_function="swish")),
        "marian-separate-vocab": lambda: t.MarianMTModel(
            t.MarianConfig(
                **{**marian, "pad_token_id": VOCAB - 41, "decoder_start_token_id": VOCAB - 41},
                decoder_vocab_size=VOCAB - 40,
                share_encoder_decoder_embeddings=False,
            )
        ),
        "t5-gated-tied": lambda: t.T5ForConditionalGeneration(t.T5Config(**t5, feed_forward_proj="gated-gelu")),
        "t5-relu-untied": lambda: _untie(t.T5ForConditionalGeneration(t.T5Config(**t5, feed_forward_proj="relu"))),
    }


def _untie(model):
    """A T5 whose lm_head is its own tensor (T5 v1.0 style checkpoints; transformers 5 ties at init)."""
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)
    return model


def randomize(model: torch.nn.Module) -> None:
    """Perturb every parameter and final_logits_bias (HF inits biases to 0 and norms to 1), so a mapping
    error shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:  # not Marian's frozen sinusoidal tables
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("final_logits_bias"):
                b.add_(torch.randn(b.shape, generator=g))


@pytest.fixture(scope="module", params=list(hf_models()))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = hf_models()[request.param]().eval()
    randomize(hf)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


def batch(hf, pad: bool):
    """Source (3, 13) and target (3, 9) ids with masks; rows 1 and 2 padded on both sides when pad."""
    g = torch.Generator().manual_seed(2)
    src = torch.randint(3, VOCAB - 40, (3, 13), generator=g)
    tgt = torch.randint(3, VOCAB - 40, (3, 9), generator=g)
    sm, tm = torch.ones_like(src), torch.ones_like(tgt)
    if pad:
        sm[1, 6:], sm[2, 1:] = 0, 0  # row 2: a one-token source
        tm[1, 4:], tm[2, 7:] = 0, 0
    return src, sm, tgt, tm


def hf_logits(hf, src, sm, tgt, tm):
    with torch.no_grad():
        return hf(input_ids=src, attention_mask=sm, decoder_input_ids=tgt, decoder_attention_mask=tm).logits


@pytest.mark.parametrize("pad", [False, True])
def test_fp32_logits_match_transformers(pair, pad):
    name, hf, path = pair
    ours = load_model(path, dtype=torch.float32)
    assert isinstance(ours, Seq2SeqTransformer)
    src, sm, tgt, tm = batch(hf, pad)
    with torch.no_grad():
        out = ours(src, attention_mask=sm if pad else None, decoder_input_ids=tgt, decoder_attention_mask=tm).logits
    ref = hf_logits(hf, src, sm, tgt, tm)
    keep = tm.bool()
    err = (out[keep] - ref[keep]).abs().max().item()
    scale = ref[keep].abs().max().item()
    assert err <= 1e-4 * scale, f"{name} pad={pad}: max |diff| {err:.3g} vs logit scale {scale:.3g}"
    if pad:
        assert (out[~keep] == 0).all(), "padding positions must come back as zeros"


def test_config_variant_is_what_transformers_built(pair):
    name, hf, path = pair
    c = load_model(path).config
    expect = {
        "bart": dict(pre_norm=False, positions="learned", embed_norm=True, share_embeddings=True),
        "mbart": dict(pre_norm=True, scale_embedding=True, activation="relu"),
        "marian": dict(positions="sinusoidal", embed_norm=False, activation="silu", scale_embedding=True),
        "marian-separate-vocab": dict(share_embeddings=False, decoder_vocab_size=VOCAB - 40),
        "t5-gated-tied": dict(activation="geglu", tie_word_embeddings=True, scale_decoder_outputs=True),
        "t5-relu-untied": dict(activation="relu", tie_word_embeddings=False),
    }[name]
    assert {k: getattr(c, k) for k in expect} == expect


def test_loss_and_grads_match_transformers(pair):
    """labels only (decoder input = labels shifted right, as transformers does); -100 ignored."""
    name, hf, path = pair
    ours = load_model(path).train()
    src, sm, tgt, tm = batch(hf, pad=True)
    labels = tgt.masked_fill(tm == 0, -100)
    loss = ours(src, attention_mask=sm, labels=labels).loss
    # mBART's own shift moves each row's last token to the front; give it the standard one.
    dec = ours.shift_right(labels) if name == "mbart" else None
    ref = hf.train()(input_ids=src, attention_mask=sm, decoder_input_ids=dec, labels=labels).loss
    hf.eval()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    ref.backward()
    hf_q = hf.get_encoder().layers[0].self_attn.q_proj if hasattr(hf.get_encoder(), "layers") else None
    if hf_q is None:  # T5
        hf_q = hf.get_encoder().block[0].layer[0].SelfAttention.q
    d = ours.config.n_heads * ours.config.head_dim
    torch.testing.assert_close(ours.encoder[0].attn.qkv.weight.grad[:d], hf_q.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        ours.embed.weight.grad, hf.get_encoder().get_input_embeddings().weight.grad, rtol=1e-4, atol=1e-6
    )
    hf.zero_grad()


def test_save_pretrained_round_trip(pair, tmp_path):
    """Ours -> save_pretrained -> transformers and -> load_model give the same logits and weights."""
    name, hf, path = pair
    ours = load_model(path)
    ours.save_pretrained(tmp_path)
    back = type(hf).from_pretrained(tmp_path).eval()
    src, sm, tgt, tm = batch(hf, pad=True)
    torch.testing.assert_close(hf_logits(back, src, sm, tgt, tm), hf_logits(hf, src, sm, tgt, tm), rtol=0, atol=0)
    again = load_model(tmp_path)
    assert again.config == ours.config
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("preset", ["bart-tiny", "t5-tiny", "mbart-small-cpu"])
def test_from_scratch_presets_train_step(preset, tmp_path):
    model = build_model(ModelConfig.preset(preset)).train()
    v = ModelConfig.preset(preset).vocab_size
    src, tgt = torch.randint(3, 512, (2, 11)), torch.randint(3, 512, (2, 7))
    loss = model(src, attention_mask=torch.tensor([[1] * 11, [1] * 5 + [0] * 6]), labels=tgt).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - math.log(v)) < 1.5  # ~ln(vocab) at init
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.save_pretrained(tmp_path)  # our own configs load in transformers too
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(src, decoder_input_ids=tgt).logits,
            hf(input_ids=src, decoder_input_ids=tgt).logits,
            rtol=1e-4,
            atol=1e-4,
        )


def test_bad_input_is_a_clear_error():
    model = build_model(ModelConfig.preset("bart-tiny"))
    src = torch.randint(3, 512, (2, 5))
    with pytest.raises(ValueError, match="decoder_input_ids or labels"):
        model(src)
    with pytest.raises(ValueError, match="out of range"):
        model(src, decoder_input_ids=torch.full((2, 3), 512))
    with pytest.raises(ValueError, match="context is 256"):
        model(torch.randint(3, 512, (1, 300)), decoder_input_ids=src[:1])
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(src, decoder_input_ids=src, labels=src[:, :2])
    with pytest.raises(ValueError, match="encoder-decoder"):
        Seq2SeqTransformer(ModelConfig.preset("gpt2-tiny"))
