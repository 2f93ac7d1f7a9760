"""Quality guard for lower-precision weights: does a model's greedy continuation stay close to fp32's?

Used by the tests and by benchmarks/bench_generate.py (which prints it next to the speed it buys).
"""

from __future__ import annotations

import torch

from plm_engine.generation.engine import Engine
from plm_engine.generation.sampler import SamplingParams

GUARD_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
)


@torch.no_grad()
def _token_logprobs(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for the continuation tokens t >= n_prompt, in fp32, by one causal forward."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    logits = model(x).logits[0, n_prompt - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, x[0, n_prompt:, None]).squeeze(1).cpu()


def compare_greedy(ref_model, model, tokenizer, prompts=GUARD_PROMPTS, n_tokens: int = 16) -> dict:
    """Greedy n_tokens from both models (ignoring EOS, so every continuation has n_tokens); then both
    models score the reference continuation. Returns per-prompt rows and a summary: how many prompts
    agree on all n_tokens, the first-divergence positions, and the mean / max |log-prob difference|."""
    p = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
    refs = Engine(
        ref_model, tokenizer=tokenizer, max_num_seqs=len(prompts), kv_cache_tokens=4096, cuda_graphs=False
    ).generate(list(prompts), p)
    outs = Engine(
        model, tokenizer=tokenizer, max_num_seqs=len(prompts), kv_cache_tokens=4096, cuda_graphs=False
    ).generate(list(prompts), p)
    rows, diffs = [], []
    for prompt, r, o in zip(prompts, refs, outs):
        ids = r.prompt_token_ids + r.token_ids
        d = (
            _token_logprobs(ref_model, ids, r.num_prompt_tokens) - _token_logprobs(model, ids, r.num_prompt_tokens)
        ).abs()
        diffs.append(d)
        same = next((i for i, (a, b) in enumerate(zip(r.token_ids, o.token_ids)) if a != b), n_tokens)
        rows.append(dict(prompt=prompt, identical_prefix=same, max_abs_logprob_diff=float(d.max())))
    all_d = torch.cat(diffs)
    return dict(
        rows=rows,
        n_prompts=len(prompts),
        n_tokens=n_tokens,
        n_identical=sum(r["identical_prefix"] == n_tokens for r in rows),
        mean_abs_logprob_diff=float(all_d.mean()),
        max_abs_logprob_diff=float(all_d.max()),
    )
