"""Training-step benchmark: plm_engine's Transformer (fused attention fwd+bwd, fused norms, fused linear
cross-entropy) against the same GPT-2 architecture in HF transformers (GPT2LMHeadModel from a config, SDPA
attention) with a plain PyTorch loop. Same shapes, same batch, same optimizer (AdamW, fused), same run.

One step = forward with labels + backward + optimizer step + zero_grad; the figure is the median step
time over --steps timed steps after --warmup; on CPU the providers run --rounds times in alternation (a
fresh process each time) and each keeps its best round, so that a slow spell of a shared machine does not
fall on one provider only. tokens/s = batch * seq_len / step time. MFU = tokens/s *
flops_per_token (PaLM formula, plm_engine.training.metrics) / peak (a GPU's data sheet; on CPU a measured
large-matmul rate). Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU each provider runs in its
own child process and reports its peak resident set size (ru_maxrss), which includes the Python runtime.

    python benchmarks/bench_train.py                     # CPU, reduced GPT-2 (hidden 256, 4 layers)
    python benchmarks/bench_train.py --device cuda --size gpt2 --batch 16 --seq 1024 --precision bf16 --json
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import common
import torch

SIZES = {
    # (hidden, layers, heads, vocab): GPT-2 shapes, reduced for a CPU run
    "cpu-small": (256, 4, 4, 8192),
    "gpt2": (768, 12, 12, 50257),
}


def model_config(size: str, seq: int):
    """Our GPT-2 config of this size (HF's GPT2Config below matches it field by field)."""
    from plm_engine.models import ModelConfig

    hidden, layers, heads, vocab = SIZES[size]
    return ModelConfig(
        arch="gpt2",
        vocab_size=vocab,
        hidden_size=hidden,
        n_layers=layers,
        n_heads=heads,
        max_position_embeddings=max(seq, 1024),
    )


def build(provider: str, size: str, seq: int, device: str):
    hidden, layers, heads, vocab = SIZES[size]
    torch.manual_seed(0)
    if provider == "plm_engine":
        from plm_engine.models import Transformer

        cfg = model_config(size, seq)
        return Transformer(cfg).to(device).train(), cfg
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=max(seq, 1024),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg).to(device).train(), cfg


def run_provider(provider: str, args, queue=None) -> dict:
    torch.set_num_threads(args.threads) if args.threads else None
    device = args.device
    model, _ = build(provider, args.size, args.seq, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(1)
    vocab = SIZES[args.size][3]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if args.precision == "bf16" else None

    def step():
        if amp is not None:
            with amp:
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    losses = [step().item() for _ in range(args.warmup)]
    times = []
    for _ in range(args.steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    ms = statistics.median(times) * 1e3
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    out = {
        "provider": provider,
        "step_ms": ms,
        "tokens_per_s": args.batch * args.seq / (ms / 1e3),
        "peak_mem_mib": peak,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "params": sum(p.numel() for p in model.parameters()),
    }
    if queue is not None:
        queue.put(out)
    return out


COLUMNS = [
    "bench",
    "provider",
    "size",
    "batch",
    "seq",
    "precision",
    "step_ms",
    "tokens_per_s",
    "speedup_vs_hf",
    "mfu",
    "peak_mem_mib",
    "first_loss",
    "last_loss",
    "params",
    "peak_flops",
]


@dataclass(frozen=True)
class Case:
    size: str
    batch: int
    seq: int
    precision: str

    @property
    def labels(self) -> dict:
        return {
            "bench": "train_step",
            "size": self.size,
            "batch": self.batch,
            "seq": self.seq,
            "precision": self.precision,
        }


def setup(args, providers):
    """Runs every provider first (each in its own process on CPU: a clean peak RSS, no allocator state
    shared), so that each row can carry its speedup over HF and its MFU."""
    from plm_engine.training.metrics import flops_per_token, peak_flops

    results: dict[str, dict] = {}
    cuda = args.device.startswith("cuda")
    for _ in range(1 if cuda else args.rounds):
        for provider in providers:
            if cuda:
                r = run_provider(provider, args)
            else:
                ctx = mp.get_context("spawn")
                q = ctx.Queue()
                proc = ctx.Process(target=run_provider, args=(provider, args, q))
                proc.start()
                r = q.get()
                proc.join()
            if provider not in results or r["step_ms"] < results[provider]["step_ms"]:
                results[provider] = r
    mc = model_config(args.size, args.seq)
    peak = peak_flops(torch.device(args.device), args.precision)
    base = results.get("hf")

    def provider(name):
        r = dict(results[name])
        del r["provider"]
        r["mfu"] = r["tokens_per_s"] * flops_per_token(mc, args.seq, r["params"]) / peak
        r["peak_flops"] = peak
        r["speedup_vs_hf"] = r["tokens_per_s"] / base["tokens_per_s"] if base else ""
        return r

    return provider


def main(argv=None) -> int:
    p = common.parser("train", __doc__, ("plm_engine", "hf"))
    p.add_argument("--size", default=None, choices=sorted(SIZES), help="default: cpu-small on CPU, gpt2 on GPU")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="CPU: runs of each provider, in alternation (best kept)")
    args = p.parse_args(argv)
    if args.quick:  # smoke run: 2 timed steps after 1 warm-up
        args.steps, args.warmup, args.rounds = 2, 1, 1
    common.require_device("train", args.device)
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("gpt2" if cuda else "cpu-small")
    args.batch = args.batch or (16 if cuda else 8)
    args.seq = args.seq or (1024 if cuda else 128)
    providers = common.split_list(args.providers, "", ("plm_engine", "hf"), "provider")
    return common.run(
        "train",
        args,
        [Case(args.size, args.batch, args.seq, args.precision)],
        lambda c, device: setup(args, providers),
        providers=lambda c: providers,
        columns=COLUMNS,
        table=[c for c in COLUMNS if c not in ("bench", "params", "peak_flops")],
        baseline="hf",
    )


if __name__ == "__main__":
    sys.exit(main())
