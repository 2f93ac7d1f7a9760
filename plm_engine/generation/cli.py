"""`plm-engine generate "prompt"`: stream a continuation to the terminal, then the speed figures.

The text goes to stdout as it is produced; the figures (prompt and decode tokens per second, time to
first token) go to stderr, so `plm-engine generate ... > out.txt` keeps only the text.
"""

from __future__ import annotations

import argparse
import sys
import time

from plm_engine.generation.options import DEFAULT_MODEL, add_model_options, model_options

# The sampling flags below carry SamplingParams' field names, so the params are read from them by name
# (--stop's list becomes a tuple in SamplingParams).
SAMPLING_FLAGS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "max_tokens",
    "stop",
    "ignore_eos",
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("generate", help=f"stream a continuation of a prompt (default model {DEFAULT_MODEL})")
    s.add_argument("prompt", help="the prompt text")
    add_model_options(s)
    s.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default: %(default)s)")
    s.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: off)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (default: off)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default: off)")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable; not printed)")
    s.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    s.add_argument("--no-cuda-graphs", action="store_true", help="run decode eagerly on CUDA")
    s.set_defaults(func=run)
    return s


def run(args) -> int:
    import torch

    from plm_engine.generation.engine import Engine
    from plm_engine.generation.sampler import SamplingParams

    try:
        params = SamplingParams(**{name: getattr(args, name) for name in SAMPLING_FLAGS})
    except ValueError as e:
        print(f"plm-engine generate: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    engine = Engine(**model_options(args), device=device, max_num_seqs=1, cuda_graphs=not args.no_cuda_graphs)
    load_s = time.perf_counter() - t0
    tok = engine.tokenizer
    if args.chat:
        if tok is None or not tok.chat_template:
            print(f"plm-engine generate: --chat: model {args.model!r} has no chat template", file=sys.stderr)
            return 2
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        prompt = tok.encode(text, add_special_tokens=False)  # the template already wrote any BOS
    else:
        prompt = args.prompt
    try:
        start = time.perf_counter()
        rid = engine.add_request(prompt, params)
    except ValueError as e:
        print(f"plm-engine generate: {e}", file=sys.stderr)
        return 2
    first = final = None
    try:
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id != rid:
                    continue
                if first is None and out.new_token_ids:
                    first = time.perf_counter()
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
                final = out
    except KeyboardInterrupt:
        engine.abort(rid)
        print("\n[interrupted]", file=sys.stderr)
        return 130
    end = time.perf_counter()
    assert final is not None, "the request's final output ends the loop"
    sys.stdout.write("\n")
    n_prompt, n_gen = final.num_prompt_tokens, len(final.token_ids)
    ttft = (first or end) - start
    decode_s = end - (first or end)
    decode_tps = (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else float("nan")
    print(
        f"[{args.model} {engine.weights} on {engine.device}; loaded in {load_s:.1f}s] "
        f"prompt {n_prompt} tok at {n_prompt / ttft:.1f} tok/s | time to first token {ttft * 1000:.0f} ms | "
        f"decode {n_gen} tok at {decode_tps:.1f} tok/s | finish: {final.finish_reason}",
        file=sys.stderr,
    )
    return 0
