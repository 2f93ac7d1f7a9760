"""Encoder-decoder models in the engine: greedy output equals transformers' generate (BART, Marian, T5 on
random weights), also through preemption and chunked recompute; the encoder runs once per request and its
keys/values are released with it; bad prompts are clear errors; `plm-engine generate` on a seq2seq folder."""

from __future__ import annotations

import argparse

import pytest
import torch

from plm_engine.generation import Engine, SamplingParams
from plm_engine.models import load_model

transformers = pytest.importorskip("transformers")

V = 320
MAX_NEW = 16
BART = dict(
    vocab_size=V,
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=96,
    decoder_ffn_dim=96,
    max_position_embeddings=64,
    dropout=0.0,
    forced_eos_token_id=None,
)


def hf_model(family: str):
    t = transformers
    if family == "bart":
        return t.BartForConditionalGeneration(t.BartConfig(**BART))
    if family == "marian":
        cfg = dict(BART, pad_token_id=V - 1, decoder_start_token_id=V - 1, eos_token_id=0, scale_embedding=True)
        return t.MarianMTModel(t.MarianConfig(**cfg))
    cfg = t.T5Config(
        vocab_size=V,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=16,
        relative_attention_max_distance=12,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        n_positions=64,
    )
    return t.T5ForConditionalGeneration(cfg)


@pytest.fixture(scope="module", params=["bart", "marian", "t5"])
def pair(request, tmp_path_factory):
    """A random-init transformers model (weights scaled up so greedy output varies) and ours, loaded from
    its save_pretrained folder."""
    torch.manual_seed(0)
    hf = hf_model(request.param).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, load_model(path)


def prompts(n_lens=(5, 13, 1, 22)) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, V - 2, (n,), generator=g).tolist() for n in n_lens]


def hf_greedy(hf, prompt: list[int], repetition_penalty: float = 1.0) -> list[int]:
    out = hf.generate(
        torch.tensor([prompt]),
        do_sample=False,
        num_beams=1,
        max_new_tokens=MAX_NEW,
        min_length=0,
        repetition_penalty=repetition_penalty,
    )
    return out[0, 1:].tolist()  # without the decoder start token


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_matches_transformers_generate(pair, penalty):
    """Greedy decoding of four prompts batched in one engine equals transformers' generate of each. Random
    post-norm models (BART, Marian) tend to repeat one token: the repetition penalty (on the decoder's
    tokens, in both) makes every step's choice depend on the decoder's history."""
    family, hf, ours = pair
    engine = Engine(ours, max_num_seqs=4, kv_cache_tokens=512, block_size=16)
    ps = prompts()
    outs = engine.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, repetition_penalty=penalty))
    for p, o in zip(ps, outs):
        assert o.token_ids == hf_greedy(hf, p, penalty), f"{family}: prompt of {len(p)} tokens"
        assert o.prompt_token_ids == p and o.num_prompt_tokens == len(p)
    if penalty != 1.0:  # the test needs outputs that vary, within and across prompts
        assert min(len(set(o.token_ids)) for o in outs) > 2 and len({tuple(o.token_ids) for o in outs}) > 1
    assert engine.seq2seq.num_sources == 0, "finished requests must release their cross-attention keys/values"
    assert engine.stats()["prompt_tokens_total"] == sum(len(p) for p in ps)


def test_preemption_and_chunked_recompute_keep_the_output(pair):
    """A cache too small for four requests: sequences are preempted, keep their encoded source, and are
    recomputed in chunks of 3 tokens (chunked prefill over the paged cache); the output does not change."""
    family, hf, ours = pair
    ps = prompts()
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    roomy = Engine(ours, max_num_seqs=4, kv_cache_tokens=512, block_size=16).generate(ps, params)
    tight = Engine(ours, max_num_seqs=4, kv_cache_tokens=40, block_size=4, max_prefill_tokens=3)
    outs = tight.generate(ps, params)
    assert tight.stats()["num_preemptions"] > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert tight.seq2seq.num_sources == 0


def test_abort_releases_the_source(pair):
    _, _, ours = pair
    engine = Engine(ours, max_num_seqs=2, kv_cache_tokens=256)
    rid = engine.add_request(prompts()[1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()
    assert engine.seq2seq.num_sources == 1
    assert engine.abort(rid) and engine.seq2seq.num_sources == 0


def test_bad_prompts_are_clear_errors(pair):
    _, _, ours = pair
    engine = Engine(ours, max_num_seqs=2, kv_cache_tokens=256)
    with pytest.raises(ValueError, match="encoder's context holds 64"):
        engine.add_request(list(range(3, 70)))
    with pytest.raises(ValueError, match=rf"ints in \[0, {V}\)"):
        engine.add_request([5, V])
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    # the decoder's context bounds the output: 63 new tokens after the start token
    seq = engine.make_sequence([5, 6], SamplingParams(max_tokens=1000))
    assert seq.max_tokens == 63 and seq.prompt_token_ids == [ours.config.decoder_start_token_id]


def test_cli_generate_with_a_seq2seq_folder(tmp_path, capsys):
    """`plm-engine generate --model <folder>`: a tiny BART saved with a tokenizer streams its answer."""
    from plm_engine.generation import cli
    from plm_engine.models import ModelConfig, build_model
    from plm_engine.training import data as D

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the king and the queen speak of love and war and night\n" * 50)
    tok = D.train_bpe([str(corpus)], 300, style="seq2seq")
    c = ModelConfig.preset(
        "bart-tiny",
        vocab_size=tok.vocab_size,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path / "model"
    build_model(c).save_pretrained(folder)
    tok.save(str(folder))
    p = argparse.ArgumentParser(prog="plm-engine")
    cli.add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["generate", "the queen", "--model", str(folder), "--max-tokens", "7", "--temperature", "0"])
    args.ignore_eos = True
    assert cli.run(args) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and "decode 7 tok" in err and "finish: length" in err
    assert "prompt 3 tok" in err  # "the queen" is 2 BPE tokens + </s>, the encoder's input
