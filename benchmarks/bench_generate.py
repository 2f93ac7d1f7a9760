"""Generation benchmark: plm_engine's Engine against HF transformers `generate`, same weights, same run.

Providers:
  plm_engine   Engine (paged KV cache, continuous batching; CUDA graphs on GPU)
  hf           transformers generate, dynamic cache (the same weights: our model saved with save_pretrained)
  hf_static    transformers generate with cache_implementation="static" (batch-1 only; skipped if it fails)
Cases:
  decode_b1    one prompt, greedy, --decode-tokens new tokens: time to first token (prompt + first token)
               and decode tokens/s = (n - 1) / (time after the first token)
  throughput   --requests requests, prompt lengths uniform in 16..256 and output lengths in 16..128
               (ignore_eos), all submitted at once; tokens/s = requested output tokens / wall time.
               HF runs them in input order in left-padded batches of --hf-batch, each batch generating its
               longest output length (the extra tokens it makes are not counted).
  quality      (dtypes other than float32) the greedy continuations of fixed prompts against fp32:
               prompts whose first 16 tokens are identical, mean / max |log-prob difference|
Also reported: weight bandwidth = bytes of weights read per decode step (every parameter once; an untied
input embedding is only gathered, so it is left out) x decode steps/s, against the memory bandwidth
measured here by a large copy (bytes read + written) with the same thread count.

Rows go to benchmarks/results/generate.csv (dtype in every row).

    python benchmarks/bench_generate.py                          # CPU, float32 and bfloat16
    python benchmarks/bench_generate.py --quick --no-csv         # smoke run
    python benchmarks/bench_generate.py --device cuda --dtypes bfloat16 --out-dir $OUT --json
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from plm_engine.generation import Engine, SamplingParams  # noqa: E402
from plm_engine.generation.quality import compare_greedy  # noqa: E402

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type with an oil-based ink and a wooden press. Within a few decades"
)
COLUMNS = common.ENV_COLUMNS + [
    "case",
    "provider",
    "model",
    "dtype",
    "batch",
    "requests",
    "prompt_tokens",
    "gen_tokens",
    "ttft_ms",
    "decode_tok_s",
    "throughput_tok_s",
    "wall_s",
    "weight_gbps",
    "membw_gbps",
    "bw_util",
    "speedup_vs_hf_fp32",
    "n_identical",
    "mean_abs_logprob_diff",
    "max_abs_logprob_diff",
    "note",
]


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure_membw(device: str, mib: int = 256, reps: int = 5) -> float:
    """GB/s of a large tensor copy (bytes read + written), median of reps."""
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times[1:]) / 1e9


def weight_bytes(model) -> int:
    seen, total = set(), 0
    skip = None if model.lm_head is None else model.tok_embed.weight.data_ptr()
    for p in model.parameters():
        if p.data_ptr() in seen or p.data_ptr() == skip:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


# ---- plm_engine -------------------------------------------------------------------------------------


def ours_decode_b1(model, tok, prompt_ids, n, device):
    eng = Engine(
        model,
        tokenizer=tok,
        max_num_seqs=1,
        kv_cache_tokens=len(prompt_ids) + n + 64,
        cuda_graphs=device.startswith("cuda"),
    )
    eng.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    eng.add_request(prompt_ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    first = None
    while eng.has_unfinished():
        outs = eng.step()
        if first is None and any(o.new_token_ids for o in outs):
            first = time.perf_counter()
    end = time.perf_counter()
    return dict(ttft_ms=(first - t0) * 1e3, decode_tok_s=(n - 1) / (end - first), gen_tokens=n)


def ours_throughput(model, tok, prompts, out_lens, device):
    total = sum(len(p) + o for p, o in zip(prompts, out_lens))
    eng = Engine(
        model,
        tokenizer=tok,
        max_num_seqs=len(prompts),
        kv_cache_tokens=total + 16 * len(prompts),
        cuda_graphs=device.startswith("cuda"),
    )
    eng.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in out_lens]
    t = time.perf_counter()
    outs = eng.generate(prompts, params)
    wall = time.perf_counter() - t
    gen = sum(len(o.token_ids) for o in outs)
    assert gen == sum(out_lens), (gen, sum(out_lens))
    return dict(
        throughput_tok_s=gen / wall, wall_s=wall, gen_tokens=gen, note=f"preemptions={eng.stats()['num_preemptions']}"
    )


# ---- HF transformers ------------------------------------------------------------------------------


def hf_generate(hf, ids, mask, n, **kw):
    with torch.no_grad():
        return hf.generate(
            ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw
        )


def hf_decode_b1(hf, prompt_ids, n, device, **kw):
    ids = torch.tensor([prompt_ids], device=device)
    mask = torch.ones_like(ids)
    hf_generate(hf, ids, mask, 8, **kw)  # warm-up
    sync(device)
    t = time.perf_counter()
    hf_generate(hf, ids, mask, 1, **kw)
    sync(device)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    out = hf_generate(hf, ids, mask, n, **kw)
    sync(device)
    tn = time.perf_counter() - t
    assert out.shape[1] == len(prompt_ids) + n
    return dict(ttft_ms=t1 * 1e3, decode_tok_s=(n - 1) / (tn - t1), gen_tokens=n)


def hf_throughput(hf, prompts, out_lens, batch, device):
    hf_generate(hf, torch.tensor([prompts[0]], device=device), None, 4)  # warm-up
    t = time.perf_counter()
    made = 0
    for i in range(0, len(prompts), batch):
        ps, os_ = prompts[i : i + batch], out_lens[i : i + batch]
        width = max(map(len, ps))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=device)
        hf_generate(hf, ids, mask, max(os_))
        made += max(os_) * len(ps)
    sync(device)
    wall = time.perf_counter() - t
    return dict(
        throughput_tok_s=sum(out_lens) / wall,
        wall_s=wall,
        gen_tokens=sum(out_lens),
        note=f"batches of {batch}; {made} tokens made, {sum(out_lens)} counted",
    )


# ---- driver ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=common.default_device())
    ap.add_argument("--dtypes", default="float32,bfloat16", help="our engine's weight dtypes (comma-separated)")
    ap.add_argument("--hf-dtypes", default="float32", help="HF's weight dtypes (comma-separated)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-static", action="store_true", help="skip HF with the static cache")
    ap.add_argument("--quick", action="store_true", help="8 requests, 16 decode tokens (smoke run)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.requests, args.decode_tokens = min(args.requests, 8), min(args.decode_tokens, 16)
    import transformers

    from plm_engine.models import load_model, load_tokenizer

    dev = args.device
    env = common.env_info(dev)
    tok = load_tokenizer(args.model)
    base = load_model(args.model, dtype=torch.float32, device=dev)
    prompt_ids = tok.encode(PROMPT)
    rng = random.Random(0)
    lo, hi = 16, (256 if not args.quick else 64)
    vocab_lo = 100  # skip the special / control tokens at the start of the vocabulary
    prompts = [
        [rng.randrange(vocab_lo, base.config.vocab_size) for _ in range(rng.randint(lo, hi))]
        for _ in range(args.requests)
    ]
    out_lens = [rng.randint(16, 128 if not args.quick else 32) for _ in range(args.requests)]
    membw = measure_membw(dev)
    rows = []

    def row(case, provider, dtype, res, batch, model=None):
        r = {
            **env,
            "case": case,
            "provider": provider,
            "model": args.model,
            "dtype": dtype,
            "batch": batch,
            "requests": args.requests if case == "throughput" else 1,
            "membw_gbps": round(membw, 2),
            **res,
        }
        if case == "decode_b1" and model is not None:
            r["weight_gbps"] = round(weight_bytes(model) * res["decode_tok_s"] / 1e9, 2)
            r["bw_util"] = round(r["weight_gbps"] / membw, 3)
        r["prompt_tokens"] = len(prompt_ids) if case == "decode_b1" else sum(map(len, prompts))
        for k in (
            "ttft_ms",
            "decode_tok_s",
            "throughput_tok_s",
            "wall_s",
            "mean_abs_logprob_diff",
            "max_abs_logprob_diff",
        ):
            if isinstance(r.get(k), float):
                r[k] = round(r[k], 4)
        rows.append(r)
        print({k: r[k] for k in r if k not in env}, file=sys.stderr, flush=True)
        return r

    hf_ref = {}
    if not args.skip_hf:
        with tempfile.TemporaryDirectory() as d:
            base.save_pretrained(d)
            for name in args.hf_dtypes.split(","):
                dt = getattr(torch, name)
                hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dt).to(dev).eval()
                r = row("decode_b1", "hf", name, hf_decode_b1(hf, prompt_ids, args.decode_tokens, dev), 1)
                hf_ref.setdefault(("decode_b1", name), r["decode_tok_s"])
                if not args.skip_static:
                    try:
                        res = hf_decode_b1(hf, prompt_ids, args.decode_tokens, dev, cache_implementation="static")
                        row("decode_b1", "hf_static", name, res, 1)
                    except Exception as e:  # not every transformers/device combination supports it
                        row("decode_b1", "hf_static", name, dict(note=f"failed: {type(e).__name__}: {e}"[:200]), 1)
                r = row(
                    "throughput", "hf", name, hf_throughput(hf, prompts, out_lens, args.hf_batch, dev), args.hf_batch
                )
                hf_ref.setdefault(("throughput", name), r["throughput_tok_s"])
                del hf

    for name in args.dtypes.split(","):
        dt = getattr(torch, name)
        model = base if dt == torch.float32 else copy.deepcopy(base).to(dt)
        quality = {}
        if dt != torch.float32:
            q = compare_greedy(base, model, tok)
            quality = {k: q[k] for k in ("n_identical", "mean_abs_logprob_diff", "max_abs_logprob_diff")}
            row(
                "quality",
                "plm_engine",
                name,
                dict(quality, note=f"{q['n_prompts']} prompts x {q['n_tokens']} greedy tokens vs float32"),
                1,
            )
        r = row(
            "decode_b1", "plm_engine", name, ours_decode_b1(model, tok, prompt_ids, args.decode_tokens, dev), 1, model
        )
        if ("decode_b1", "float32") in hf_ref:
            r["speedup_vs_hf_fp32"] = round(r["decode_tok_s"] / hf_ref[("decode_b1", "float32")], 3)
        r = row("throughput", "plm_engine", name, ours_throughput(model, tok, prompts, out_lens, dev), args.requests)
        if ("throughput", "float32") in hf_ref:
            r["speedup_vs_hf_fp32"] = round(r["throughput_tok_s"] / hf_ref[("throughput", "float32")], 3)
    for r in rows:
        if r["provider"] == "hf" and r["dtype"] == "float32" and r["case"] in ("decode_b1", "throughput"):
            r["speedup_vs_hf_fp32"] = 1.0

    if not args.no_csv:
        path = common.append_csv(Path(args.out_dir) / "generate.csv", rows, COLUMNS)
        print(f"appended {len(rows)} rows to {path}", file=sys.stderr)
    if args.json:
        common.print_json_lines(rows)
    else:
        common.print_table(
            rows,
            [
                "case",
                "provider",
                "dtype",
                "batch",
                "ttft_ms",
                "decode_tok_s",
                "throughput_tok_s",
                "weight_gbps",
                "bw_util",
                "speedup_vs_hf_fp32",
                "n_identical",
                "mean_abs_logprob_diff",
                "note",
            ],
            title=f"generate: {args.model} on {dev}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
