"""Tiny models the model, generation and server tests share: random-weight transformers references (their
configs, perturbation and saved folder), and our bart-tiny preset fitted to a BPE tokenizer trained on one line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

VOCAB = 320


def bart_kwargs(decoder_layers: int, ffn: int) -> dict:
    """BartConfig / MBartConfig / MarianConfig keywords of a 2-encoder-layer, 64-wide model."""
    return dict(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=decoder_layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
        max_position_embeddings=64,
        dropout=0.0,
        forced_eos_token_id=None,
    )


def t5_kwargs(**overrides) -> dict:
    """T5Config keywords of a 2-layer, 64-wide model with 16 relative-position buckets."""
    common = dict(vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4, dropout_rate=0.0)
    return {**common, "relative_attention_num_buckets": 16, "decoder_start_token_id": 0, **overrides}


def bart_tiny_with_tokenizer(folder: Path):
    """(tokenizer, ModelConfig): a seq2seq-style BPE tokenizer trained on a one-line corpus written to
    folder, and the bart-tiny preset with its vocabulary and special token ids."""
    from plm_engine.models import ModelConfig
    from plm_engine.training import data as D

    corpus = folder / "corpus.txt"
    corpus.write_text("the king and the queen speak of love and war and night\n" * 50)
    tok = D.train_bpe([str(corpus)], 300, style="seq2seq")
    config = ModelConfig.preset(
        "bart-tiny",
        vocab_size=tok.vocab_size,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
    )
    return tok, config


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


def saved_random_hf(name: str, build: Callable[[], torch.nn.Module], tmp_path_factory) -> tuple:
    """(name, model, folder): the transformers model build() returns, randomized, saved with save_pretrained."""
    torch.manual_seed(0)
    hf = build().eval()
    randomize(hf)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    return name, hf, path
