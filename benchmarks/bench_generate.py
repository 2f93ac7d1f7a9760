"""Generation benchmark: plm_engine's Engine against llama.cpp and HF transformers, same weights, same run.

Providers:
  plm_engine   Engine (paged KV cache, continuous batching; on the CPU the decode step is one C++ call
               (native, generation/native_decode.py) or, with --compile 1, compiled per batch bucket;
               CUDA graphs on a GPU). Its rows name the decode path that ran (decode_path)
  llama_cpp    llama.cpp through llama-cpp-python (pip install 'plm_engine[bench]'; CPU only), on the same
               GGUF: the default model's file as shipped (Q4_1, a reference row) and up-cast by llama.cpp's
               own quantizer (llama_model_quantize, ALL_F32 / MOSTLY_F16, allow_requantize) to F32 and
               F16, the precisions compared with ours (our float32 against F32, bfloat16/float16 against
               F16). Skipped with a note when llama_cpp is not installed.
  hf           transformers generate on the same weights (our model saved with save_pretrained), in each of
               --hf-dtypes; hf_static: the same with its static KV cache (unless --skip-static)
Cases, at every --threads count (1 and all physical cores by default). plm_engine and llama.cpp runs
interleave, --repeats times; each row is the median, and vs_llama_cpp the median of the per-repeat ratios:
  load        seconds to load: plm_engine load_model(--model, dtype) warm (the on-disk GGUF cache filled
              by a first load); llama.cpp its model and a context from its GGUF file (mmap, its default)
  decode_b1   one prompt, greedy, --decode-tokens tokens: decode tok/s after the first token (prefill and
              the first token not timed); weight GB/s = bytes of weights read per step x steps/s, against
              the read bandwidth measured here (a large reduction, same threads)
  streams     --streams prompts decoding together (llama.cpp: one llama_batch, one sequence id per
              stream): output tok/s over all streams after the first token
  prefill     one prompt of --prefill-tokens tokens: prompt tok/s of the forward that processes it (and
              picks its first token)
  overhead    plm_engine: host overhead of a batch-1 decode step = its wall time minus the self CPU time of
              the compute ops in it (plm_engine:: kernels and aten compute ops, torch.profiler), as a share
              of the step; the compiled step's small fused glue kernels count as overhead (conservative).
              The native step's kernels are seen inside its one C++ call: it opens a profiler scope named
              like the op around each kernel it calls (csrc/cpu/kernels.h), so their self time is kernel
              time and the rest of the call (checks, views, allocation, the profiler's own cost) is host
  memory      (CPU) resident memory while generating, each provider in a fresh process on the file's own
              quantization (ours: "gguf", the blocks as stored; llama.cpp: the file as shipped): VmRSS
              after --streams prompts x --decode-tokens greedy tokens minus VmRSS after the imports, less
              the KV cache (llama.cpp's as allocated, F16, zero-filled at start; ours the bytes of the tokens
              held, as its pages become resident only when written), against the GGUF file size. Our
              tokenizer loads after the first reading, like llama.cpp's vocabulary
  quality     (dtypes other than float32) greedy continuations of fixed prompts against float32
  throughput  (only with --cases ...,throughput) random request mix, plm_engine vs HF (older case)

    python benchmarks/bench_generate.py --no-csv                       # CPU: everything, CSV not written
    python benchmarks/bench_generate.py --quick --no-csv               # smoke run
    python benchmarks/bench_generate.py --device cuda --dtypes bfloat16 --out-dir $OUT --json
Rows go to benchmarks/results/generate.csv unless --no-csv (new columns are added to an older header).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from plm_engine.generation import Engine, SamplingParams  # noqa: E402
from plm_engine.generation.model_runner import physical_cores  # noqa: E402
from plm_engine.generation.quality import compare_greedy  # noqa: E402

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type with an oil-based ink and a wooden press. Within a few decades"
)
# llama.cpp's name for the precision ours is compared with.
# "gguf": ours running the file's blocks as stored (load_model's default), against llama.cpp on the file
# as shipped (the default model's is Q4_1; the row keeps that name).
LLAMA_PAIR = {"float32": "F32", "bfloat16": "F16", "float16": "F16", "gguf": "Q4_1"}
COLUMNS = common.ENV_COLUMNS + [
    "case",
    "provider",
    "model",
    "precision",
    "dtype",
    "batch",
    "requests",
    "prompt_tokens",
    "gen_tokens",
    "ttft_ms",
    "tok_s",
    "decode_tok_s",
    "throughput_tok_s",
    "load_s",
    "wall_s",
    "repeats",
    "vs_llama_cpp",
    "host_overhead",
    "decode_path",
    "step_ms",
    "weight_gbps",
    "membw_gbps",
    "read_gbps",
    "bw_util",
    "rss_mb",
    "kv_mb",
    "file_mb",
    "rss_vs_file",
    "speedup_vs_hf_fp32",
    "n_identical",
    "mean_abs_logprob_diff",
    "max_abs_logprob_diff",
    "note",
]
# aten ops that compute (their self time is kernel time); everything else in a step is host work.
COMPUTE_ATEN = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::embedding",
    "aten::index_select",
    "aten::index",
    "aten::argmax",
    "aten::max",
    "aten::topk",
    "aten::sort",
    "aten::_softmax",
    "aten::_log_softmax",
    "aten::cat",
    "aten::add",
    "aten::mul",
    "aten::sum",
}


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


def measure_read_bw(device: str, mib: int = 512, reps: int = 5) -> float:
    """GB/s read by the fastest of a few full reductions over a buffer larger than the caches (the
    highest is taken: the goal compares our decode with the best read speed this machine shows)."""
    x = torch.randn(mib * 2**20 // 4, device=device)
    best = 0.0
    for fn in (lambda: x.sum(), lambda: x.amax(), lambda: torch.dot(x, x)):
        times = []
        for _ in range(reps + 1):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
        best = max(best, x.numel() * 4 / statistics.median(times[1:]) / 1e9)
    return best


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter and weight buffer (GGUF blocks) once; an
    untied input embedding is only gathered, so it is left out."""
    seen, total = set(), 0
    emb = model.tok_embed
    table = emb.qweight if hasattr(emb, "qweight") else emb.weight
    skip = None if model.lm_head is None else table.data_ptr()
    for p in [*model.parameters(), *model.buffers()]:
        if p.data_ptr() in seen or p.data_ptr() == skip:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def cpu_isa() -> str:
    return common.cpu_flags()


# ---- plm_engine -------------------------------------------------------------------------------------


def new_engine(model, tok, args, device, threads):
    cache = args.streams * (args.prefill_tokens + args.decode_tokens + 64)
    return Engine(
        model,
        tokenizer=tok,
        max_num_seqs=max(args.streams, 1),
        kv_cache_tokens=cache,
        cuda_graphs=device.startswith("cuda"),
        compile=None if args.compile is None else args.compile == "1",
        num_threads=threads or None,
    )


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def ours_decode(eng, prompts, n, device):
    """Output tok/s of len(prompts) streams decoding together, after their prefill and first token."""
    for p in prompts:
        eng.add_request(p, greedy(n))
    eng.step()  # every prompt prefilled, first tokens sampled (the prompts fit one prefill chunk)
    sync(device)
    t = time.perf_counter()
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
    sync(device)
    wall = time.perf_counter() - t
    if steps != n - 1:
        raise RuntimeError(f"expected {n - 1} decode steps, ran {steps}")
    return dict(tok_s=len(prompts) * steps / wall, step_ms=wall / steps * 1e3, gen_tokens=n)


def ours_prefill(eng, prompt, device):
    eng.add_request(prompt, greedy(1))
    sync(device)
    t = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    sync(device)
    wall = time.perf_counter() - t
    return dict(tok_s=len(prompt) / wall, wall_s=wall)


def ours_overhead(eng, prompt, steps=16):
    """Host share of batch-1 decode steps: step wall time minus the compute ops' self CPU time.

    host_overhead is conservative: the wall time is the profiled steps', so the profiler's own cost per
    event counts as host. The note adds the share against the same number of unprofiled steps run just
    before (the kernels' time still from the profiled ones)."""
    from torch.profiler import ProfilerActivity, profile

    eng.add_request(prompt, greedy(2 * steps + 8))
    for _ in range(4):  # prefill, then warm decode steps
        eng.step()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    plain = time.perf_counter() - t
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:  # kineto logs to fd 2
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        wall = time.perf_counter() - t
    while eng.has_unfinished():
        eng.step()
    kernel_us = sum(
        e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("plm_engine::") or e.key in COMPUTE_ATEN
    )
    host = max(wall - kernel_us / 1e6, 0.0)
    plain_host = max(plain - kernel_us / 1e6, 0.0)
    note = (
        f"host {host / steps * 1e3:.2f} ms/step; unprofiled: {plain_host / plain:.1%} of {plain / steps * 1e3:.1f} ms"
    )
    return dict(host_overhead=host / wall, step_ms=wall / steps * 1e3, note=note)


# ---- llama.cpp --------------------------------------------------------------------------------------


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def llama_quantize(llama_cpp, src: Path, dst: Path, ftype: int) -> None:
    """src up-cast (or re-quantized) to ftype by llama.cpp's own quantizer."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = physical_cores()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, ftype {ftype}) failed with {rc}")


@contextlib.contextmanager
def env_var(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs every load to fd 2; this keeps the benchmark's output readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class LlamaCpp:
    """A llama.cpp model and context driven through the low-level bindings: one llama_batch per step,
    one sequence id per stream, greedy argmax over the returned logits (numpy)."""

    def __init__(self, llama_cpp, path: Path, n_seq: int, n_ctx_seq: int, threads: int, repack: bool = True):
        import numpy as np

        self.L, self.np = llama_cpp, np
        L = llama_cpp
        t = time.perf_counter()
        with quiet_stderr():
            mp = L.llama_model_default_params()
            mp.use_extra_bufts = repack
            self.model = L.llama_model_load_from_file(str(path).encode(), mp)
            if not self.model:
                raise RuntimeError(f"llama.cpp could not load {path}")
            cp = L.llama_context_default_params()
            cp.n_seq_max = n_seq
            cp.n_ctx = n_seq * n_ctx_seq
            cp.n_batch = max(512, n_ctx_seq)
            cp.n_ubatch = max(512, n_ctx_seq)
            cp.n_threads = cp.n_threads_batch = threads
            self.ctx = L.llama_init_from_model(self.model, cp)
            if not self.ctx:
                raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.load_s = time.perf_counter() - t
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.model_bytes = int(L.llama_model_size(self.model))
        self.batch = L.llama_batch_init(max(512, n_ctx_seq) * n_seq, 0, n_seq)

    def close(self):
        L = self.L
        with quiet_stderr():
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)

    def set_threads(self, n: int):
        with quiet_stderr():
            self.L.llama_set_n_threads(self.ctx, n, n)

    def clear(self):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def _decode(self, items):
        """items: (token, position, seq_id, wants_logits); returns argmax tokens of the rows with logits."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc}")
        out = []
        for i, (_, _, _, want) in enumerate(items):
            if want:
                ptr = self.L.llama_get_logits_ith(self.ctx, i)
                out.append(int(self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax()))
        return out

    def prefill(self, prompts):
        items = []
        for s, p in enumerate(prompts):
            items += [(t, i, s, i == len(p) - 1) for i, t in enumerate(p)]
        return self._decode(items)

    def decode(self, prompts, n):
        """Output tok/s of the streams after their prefill and first token (n tokens each)."""
        self.clear()
        toks = self.prefill(prompts)
        pos = [len(p) for p in prompts]
        t = time.perf_counter()
        for _ in range(n - 1):
            toks = self._decode([(tok, pos[s], s, True) for s, tok in enumerate(toks)])
            pos = [q + 1 for q in pos]
        wall = time.perf_counter() - t
        return dict(tok_s=len(prompts) * (n - 1) / wall, step_ms=wall / (n - 1) * 1e3, gen_tokens=n)

    def prefill_speed(self, prompt):
        self.clear()
        t = time.perf_counter()
        self.prefill([prompt])
        wall = time.perf_counter() - t
        return dict(tok_s=len(prompt) / wall, wall_s=wall)

    def greedy_tokens(self, prompt, n):
        self.clear()
        toks = [self.prefill([prompt])[0]]
        for i in range(n - 1):
            toks += self._decode([(toks[-1], len(prompt) + i, 0, True)])
        return toks


# ---- HF transformers --------------------------------------------------------------------------------


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
    return dict(ttft_ms=t1 * 1e3, tok_s=(n - 1) / (tn - t1), gen_tokens=n)


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
        tok_s=sum(out_lens) / wall,
        wall_s=wall,
        gen_tokens=sum(out_lens),
        note=f"batches of {batch}; {made} tokens made, {sum(out_lens)} counted",
    )


def ours_throughput(model, tok, prompts, out_lens, device):
    total = sum(len(p) + o for p, o in zip(prompts, out_lens))
    eng = Engine(
        model,
        tokenizer=tok,
        max_num_seqs=len(prompts),
        kv_cache_tokens=total + 16 * len(prompts),
        cuda_graphs=device.startswith("cuda"),
    )
    eng.generate([prompts[0]], greedy(4))  # warm-up
    params = [greedy(o) for o in out_lens]
    t = time.perf_counter()
    outs = eng.generate(prompts, params)
    wall = time.perf_counter() - t
    gen = sum(len(o.token_ids) for o in outs)
    assert gen == sum(out_lens), (gen, sum(out_lens))
    return dict(tok_s=gen / wall, wall_s=wall, gen_tokens=gen, note=f"preemptions={eng.stats()['num_preemptions']}")


# ---- output -----------------------------------------------------------------------------------------


def print_plain_table(rows, columns, title=None, file=None):
    """Fixed-width text: every cell printed whole, whatever the terminal width or a pipe."""
    file = file or sys.stdout
    cells = [[common.fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    if title:
        print(title, file=file)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=file)


def write_csv(path: Path, rows, columns) -> Path:
    """Appends rows; an older file whose header lacks some columns is rewritten with them added."""
    if path.exists() and path.stat().st_size > 0:
        old = common.read_csv(path)
        with path.open(newline="") as f:
            header = next(iter(f), "").strip().split(",")
        missing = [c for c in columns if c not in header]
        if missing:
            merged = header + missing
            tmp = path.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            common.append_csv(tmp, old, merged)
            tmp.replace(path)
    return common.append_csv(path, rows, columns)


def dtypes_arg_check(names: list[str], ours: bool = False) -> list[str]:
    """The names that are not a weight dtype this benchmark runs (ours also take "gguf": the file's
    blocks as stored, fp32 compute)."""
    return [n for n in names if n not in ("float32", "bfloat16", "float16") + (("gguf",) if ours else ())]


def load_ours(load_model, model: str, name: str, dev):
    """Our model at precision `name`: dequantized to that dtype, or "gguf" (the blocks, fp32 compute)."""
    if name == "gguf":
        return load_model(model, dtype=torch.float32, device=dev)
    return load_model(model, dtype=getattr(torch, name), device=dev, dequantize=True)


def median_row(results: list[dict]) -> dict:
    """The median of each numeric field over repeats (other fields from the first)."""
    out = dict(results[0])
    for k, v in results[0].items():
        if isinstance(v, float):
            out[k] = statistics.median(r[k] for r in results)
    out["repeats"] = len(results)
    return out


def goal_lines(rows) -> list[str]:
    """The issue's goals, from this run's rows."""
    lines = []
    for r in rows:
        if r.get("vs_llama_cpp") not in (None, ""):
            ok = r["vs_llama_cpp"] >= 1.0
            lines.append(
                f"{r['case']:<9} {r['precision']:>8} vs llama.cpp {LLAMA_PAIR.get(r['precision'], '?'):>3} "
                f"@{r['threads']} threads: {r['vs_llama_cpp']:.2f}x (goal >= 1.0) {'OK' if ok else 'NOT MET'}"
            )
        if r["case"] == "decode_b1" and r["provider"] == "plm_engine" and r.get("bw_util") not in (None, ""):
            ok = r["bw_util"] >= 0.85
            lines.append(
                f"decode_b1 {r['precision']:>8} weight bandwidth @{r['threads']} threads: {r['weight_gbps']:.1f} GB/s"
                f" = {r['bw_util']:.0%} of read {r['read_gbps']:.1f} GB/s (goal >= 85%) {'OK' if ok else 'NOT MET'}"
            )
        if r["case"] == "overhead" and r.get("host_overhead") is not None:
            ok = r["host_overhead"] <= 0.10
            lines.append(
                f"overhead  {r['precision']:>8} batch-1 step @{r['threads']} threads: host {r['host_overhead']:.1%} of"
                f" {r['step_ms']:.1f} ms (goal <= 10%) {'OK' if ok else 'NOT MET'}"
            )
        if r["case"] == "memory" and r.get("rss_vs_file") is not None:
            ok = r["rss_vs_file"] <= 1.2
            lines.append(
                f"memory    {r['provider']:>10} {r['precision']}: resident {r['rss_mb']:.0f} MB - KV {r['kv_mb']:.0f} MB"
                f" = {r['rss_vs_file']:.2f}x the {r['file_mb']:.0f} MB file (goal <= 1.2x) {'OK' if ok else 'NOT MET'}"
            )
        if r["case"] == "load" and r["provider"] == "plm_engine" and r.get("load_s") is not None:
            ok = r["load_s"] <= 0.5
            lines.append(
                f"load      {r['precision']:>8} load_model warm: {r['load_s']:.2f} s (goal <= 0.5 s) "
                f"{'OK' if ok else 'NOT MET'}"
            )
    return lines


# ---- memory: one provider per fresh process -----------------------------------------------------------


def _status_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def memory_child(spec: dict) -> dict:
    """Runs in its own process: the resident memory one provider adds to load spec["path"] and generate."""
    prompts, n = spec["prompts"], spec["decode_tokens"]
    ctx_tokens = len(prompts) * spec["n_ctx_seq"]
    if spec["provider"] == "llama_cpp":
        llama_cpp = llama_cpp_module()
        with quiet_stderr():
            llama_cpp.llama_backend_init()
        base = _status_mb()
        ll = LlamaCpp(llama_cpp, Path(spec["path"]), len(prompts), spec["n_ctx_seq"], spec["threads"], False)
        ll.decode(prompts, n)
        rss, peak = _status_mb() - base, _status_mb("VmHWM") - base
        # Its KV cache: F16 keys and values for n_ctx tokens in every layer, cleared (resident) at start.
        kv = ctx_tokens * spec["kv_values_per_token"] * 2
        ll.close()
    else:
        from plm_engine.models import load_model, load_tokenizer

        torch.set_num_threads(spec["threads"])
        base = _status_mb()
        tok = load_tokenizer(spec["model"])  # llama.cpp's vocabulary is part of its load too
        model = load_model(spec["model"])
        eng = Engine(model, tokenizer=tok, max_num_seqs=len(prompts), kv_cache_tokens=ctx_tokens, compile=False)
        outs = eng.generate(prompts, greedy(n))
        rss, peak = _status_mb() - base, _status_mb("VmHWM") - base
        # Its KV pages become resident when written (layers/kv_cache.py): at least the bytes of the keys
        # and values of the tokens held, the figure taken (the smallest, so the rest counts as overhead).
        cache = eng.runner.kv_cache
        per_token = sum(t[0, 0].nbytes for t in cache.k + cache.v)
        kv = sum(len(p) + len(o.token_ids) for p, o in zip(prompts, outs)) * per_token
    # VmHWM is the process's high-water mark: an upper bound of the peak, which includes the prefill's
    # activations (the engine returns them to the OS once its prompts are in; rss is taken while decoding).
    return dict(rss_mb=rss, peak_mb=peak, kv_mb=kv / 2**20)


def measure_memory(spec: dict) -> dict:
    """memory_child(spec) in a fresh interpreter (nothing loaded before it but this module's imports)."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps(spec)], capture_output=True, text=True, timeout=600
    )
    if out.returncode != 0:
        return dict(note=f"failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    file_mb = Path(spec["path"]).stat().st_size / 2**20
    return dict(
        rss_mb=round(res["rss_mb"], 1),
        kv_mb=round(res["kv_mb"], 1),
        file_mb=round(file_mb, 1),
        rss_vs_file=round((res["rss_mb"] - res["kv_mb"]) / file_mb, 3),
        note=f"peak <= {res['peak_mb']:.0f} MB",
    )


# ---- driver -----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=common.default_device())
    ap.add_argument(
        "--dtypes",
        default="float32,bfloat16,gguf",
        help="our engine's weight dtypes (comma-separated; gguf: the file's blocks as stored, fp32 compute)",
    )
    ap.add_argument("--providers", default="plm_engine,llama_cpp,hf")
    ap.add_argument(
        "--cases", default="load,decode_b1,streams,prefill,overhead,memory,quality", help="plus throughput (HF mix)"
    )
    ap.add_argument("--threads", default="1,all", help="CPU thread counts (comma-separated; 'all' = physical cores)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--compile",
        choices=["0", "1"],
        default="1",
        help="plm_engine's CPU decode step: 1 compiled per batch bucket (default here), 0 the native C++ step "
        "(the engine's default; eager with PLM_ENGINE_NATIVE_DECODE=0)",
    )
    ap.add_argument("--hf-dtypes", default="float32", help="HF transformers' weight dtypes (comma-separated)")
    ap.add_argument("--skip-static", action="store_true", help="no HF rows with the static KV cache")
    ap.add_argument("--requests", type=int, default=32, help="throughput case")
    ap.add_argument("--hf-batch", type=int, default=8, help="throughput case")
    ap.add_argument("--quick", action="store_true", help="16 decode tokens, 1 repeat (smoke run)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)  # the memory case's own processes
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    if args.quick:
        args.decode_tokens, args.repeats, args.requests = min(args.decode_tokens, 16), 1, min(args.requests, 8)
    if args.prefill_tokens < 1 or args.decode_tokens < 2 or args.streams < 1 or args.repeats < 1:
        ap.error("--prefill-tokens >= 1, --decode-tokens >= 2, --streams >= 1 and --repeats >= 1")
    providers = set(args.providers.split(","))
    hf_dtypes = args.hf_dtypes.split(",")
    for name in dtypes_arg_check(args.dtypes.split(","), ours=True) + dtypes_arg_check(hf_dtypes):
        ap.error(f"unknown dtype {name!r} (float32, bfloat16 or float16; gguf for ours)")
    cases = set(args.cases.split(","))
    dev = args.device
    cpu = dev == "cpu"
    all_threads = physical_cores()
    threads_list = [all_threads if t == "all" else int(t) for t in args.threads.split(",")] if cpu else [0]
    threads_list = list(dict.fromkeys(threads_list))

    from plm_engine.models import load_model, load_tokenizer
    from plm_engine.models.registry import resolve

    env = common.env_info(dev)
    tok = load_tokenizer(args.model)
    dtypes = args.dtypes.split(",")
    models = {}
    for name in dtypes:  # the first load fills the on-disk GGUF cache; the load case times later ones
        models[name] = load_ours(load_model, args.model, name, dev)
    base = models.get("float32") or load_model(args.model, dtype=torch.float32, device=dev, dequantize=True)
    vocab = base.config.vocab_size
    prompt_ids = tok.encode(PROMPT)
    rng = random.Random(0)
    stream_prompts = [prompt_ids] + [
        [rng.randrange(100, vocab) for _ in range(len(prompt_ids))] for _ in range(args.streams - 1)
    ]
    long_prompt = (tok.encode(PROMPT * (1 + args.prefill_tokens // max(len(prompt_ids), 1))))[: args.prefill_tokens]
    if len(long_prompt) < args.prefill_tokens:
        long_prompt += [rng.randrange(100, vocab) for _ in range(args.prefill_tokens - len(long_prompt))]
    notes = []

    # llama.cpp: the same GGUF, up-cast by its own quantizer, loaded once per precision.
    llamas: dict[str, LlamaCpp] = {}
    llama_args: dict[str, tuple] = {}  # precision -> LlamaCpp's arguments, to time fresh loads
    tmp = tempfile.TemporaryDirectory(prefix="bench_generate_")
    llama_cpp = llama_cpp_module() if "llama_cpp" in providers else None
    if "llama_cpp" in providers and not cpu:
        notes.append("llama_cpp: skipped (the comparison runs on the CPU)")
    elif "llama_cpp" in providers and llama_cpp is None:
        notes.append("llama_cpp: skipped, llama_cpp is not installed (pip install 'plm_engine[bench]')")
    elif llama_cpp is not None:
        found = resolve(args.model)
        if found.kind != "gguf":
            notes.append(f"llama_cpp: skipped, {args.model} is not a GGUF model")
        else:
            with quiet_stderr():
                llama_cpp.llama_backend_init()
            wanted = {LLAMA_PAIR[d] for d in dtypes if d in LLAMA_PAIR} | {"Q4_1"}
            ftypes = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16}
            for prec in sorted(wanted):
                path = found.path
                if prec in ftypes:
                    path = Path(tmp.name) / f"model-{prec}.gguf"
                    with quiet_stderr():
                        llama_quantize(llama_cpp, found.path, path, ftypes[prec])
                # Q4_1 without weight repacking: llama.cpp 0.3.36's repacked (AMX) Q4_1 path segfaults on
                # an AVX-512/AMX Xeon; F32/F16 are never repacked.
                llama_args[prec] = (
                    llama_cpp,
                    path,
                    args.streams,
                    args.prefill_tokens + args.decode_tokens + 64,
                    max(threads_list),
                    prec != "Q4_1",
                )
                llamas[prec] = LlamaCpp(*llama_args[prec])
            info = llama_cpp.llama_print_system_info().decode(errors="replace")
            notes.append(f"llama_cpp {getattr(llama_cpp, '__version__', '?')}: {info.strip()}")
            # Same model, same prompt: greedy tokens must agree at F32 (a sanity check of the comparison).
            ours_toks = (
                Engine(base, tokenizer=tok, max_num_seqs=1, kv_cache_tokens=512, compile=False)
                .generate([prompt_ids], greedy(16))[0]
                .token_ids
            )
            if "F32" in llamas:
                theirs = llamas["F32"].greedy_tokens(prompt_ids, 16)
                same = next((i for i, (a, b) in enumerate(zip(ours_toks, theirs)) if a != b), 16)
                notes.append(f"greedy check: plm_engine fp32 and llama.cpp F32 agree on {same}/16 tokens")

    # Read bandwidth: measured in every repeat too (the machine's load changes), median per thread count.
    read_samples: dict[int, list[float]] = {t: [] for t in threads_list}
    membw = {}
    for t in threads_list:
        if cpu:
            torch.set_num_threads(t)
        read_samples[t].append(measure_read_bw(dev))
        membw[t] = measure_membw(dev)
    read_bw = {}

    rows = []

    def row(case, provider, precision, res, threads, batch=1, **extra):
        r = {
            **env,
            "threads": threads if cpu else "",
            "case": case,
            "provider": provider,
            "model": args.model,
            "precision": precision,
            "dtype": precision,
            "batch": batch,
            "requests": batch,
            "read_gbps": round(read_bw[threads], 2) if threads in read_bw else None,
            "membw_gbps": round(membw[threads], 2),
            **res,
            **extra,
        }
        for k, v in list(r.items()):
            if isinstance(v, float):
                r[k] = round(v, 4)
        rows.append(r)
        shown = {k: r.get(k) for k in ("case", "provider", "precision", "threads", "tok_s", "load_s", "host_overhead")}
        print({k: v for k, v in shown.items() if v is not None}, file=sys.stderr, flush=True)
        return r

    engines = {}
    if "plm_engine" in providers:
        for name, m in models.items():
            engines[name] = new_engine(m, tok, args, dev, max(threads_list))
            # Warm-up: compiles (or captures) the buckets the cases use.
            engines[name].generate(stream_prompts[:1], greedy(4))
            engines[name].generate(stream_prompts, greedy(4))

    # Interleaved repeats: per thread count, per precision, ours then theirs, each case.
    samples: dict[tuple, list[dict]] = {}

    def add(key, res):
        samples.setdefault(key, []).append(res)

    pairs = [(d, LLAMA_PAIR.get(d)) for d in dtypes]
    if "Q4_1" in llamas and "gguf" not in dtypes:  # the file as shipped: a reference row of theirs
        pairs.append((None, "Q4_1"))
    top = max(threads_list) if cpu else 0
    for rep in range(args.repeats):
        if "load" in cases:  # warm loads (the GGUF cache filled above), ours then theirs, all threads
            if cpu:
                torch.set_num_threads(top)
            for ours_name, their_name in pairs:
                if ours_name is not None and "plm_engine" in providers:
                    t0 = time.perf_counter()
                    load_ours(load_model, args.model, ours_name, dev)
                    add(("load", "plm_engine", ours_name, top), dict(load_s=time.perf_counter() - t0))
                if their_name in llama_args:
                    fresh = LlamaCpp(*llama_args[their_name])
                    add(("load", "llama_cpp", their_name, top), dict(load_s=fresh.load_s))
                    fresh.close()
        for t in threads_list:
            if cpu:
                torch.set_num_threads(t)
                if rep:
                    read_samples[t].append(measure_read_bw(dev))
            for ll in llamas.values():
                ll.set_threads(t)
            for ours_name, their_name in pairs:
                eng = engines.get(ours_name)
                ll = llamas.get(their_name)
                if "decode_b1" in cases:
                    if eng is not None:
                        add(
                            ("decode_b1", "plm_engine", ours_name, t),
                            ours_decode(eng, stream_prompts[:1], args.decode_tokens, dev),
                        )
                    if ll is not None:
                        add(
                            ("decode_b1", "llama_cpp", their_name, t), ll.decode(stream_prompts[:1], args.decode_tokens)
                        )
                if "streams" in cases:
                    if eng is not None:
                        add(
                            ("streams", "plm_engine", ours_name, t),
                            ours_decode(eng, stream_prompts, args.decode_tokens, dev),
                        )
                    if ll is not None:
                        add(("streams", "llama_cpp", their_name, t), ll.decode(stream_prompts, args.decode_tokens))
                if "prefill" in cases:
                    if eng is not None:
                        add(("prefill", "plm_engine", ours_name, t), ours_prefill(eng, long_prompt, dev))
                    if ll is not None:
                        add(("prefill", "llama_cpp", their_name, t), ll.prefill_speed(long_prompt))
                if "overhead" in cases and eng is not None and cpu:
                    add(("overhead", "plm_engine", ours_name, t), ours_overhead(eng, prompt_ids))

    read_bw = {t: statistics.median(v) for t, v in read_samples.items()}
    for (case, provider, prec, t), res in samples.items():
        batch = args.streams if case == "streams" else 1
        r = row(
            case,
            provider,
            prec,
            median_row(res),
            t,
            batch=batch,
            prompt_tokens=len(long_prompt) if case == "prefill" else len(prompt_ids),
        )
        if provider == "plm_engine" and prec in engines:
            r["decode_path"] = engines[prec].runner.decode_path
        if case == "streams" and provider == "llama_cpp":
            r["note"] = f"one llama_batch of {batch} sequences per step (batched API)"
        if case == "load":
            r["note"] = "load_model, warm (GGUF cache filled)" if provider == "plm_engine" else "model + context"
        if case == "decode_b1":
            wb = weight_bytes(models[prec]) if provider == "plm_engine" else llamas[prec].model_bytes
            r["weight_gbps"] = round(wb * r["tok_s"] / 1e9, 2)
            r["bw_util"] = round(r["weight_gbps"] / r["read_gbps"], 3)
    for r in rows:
        if r["provider"] != "plm_engine" or r["precision"] not in LLAMA_PAIR or r.get("tok_s") is None:
            continue
        other = next(
            (
                o
                for o in rows
                if o["provider"] == "llama_cpp"
                and o["case"] == r["case"]
                and o["threads"] == r["threads"]
                and o["precision"] == LLAMA_PAIR[r["precision"]]
                and o.get("tok_s")
            ),
            None,
        )
        if other is not None:
            # The median of the per-repeat ratios: both sides of a ratio ran back to back, under the same
            # load from whatever else the machine was running.
            ours = samples[(r["case"], "plm_engine", r["precision"], r["threads"])]
            theirs = samples[(r["case"], "llama_cpp", other["precision"], r["threads"])]
            r["vs_llama_cpp"] = round(statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(ours, theirs)), 3)
    for r in rows:
        if r["case"] == "load" and r["provider"] == "plm_engine":
            other = next(
                (
                    o
                    for o in rows
                    if o["case"] == "load"
                    and o["provider"] == "llama_cpp"
                    and o["precision"] == LLAMA_PAIR.get(r["precision"])
                ),
                None,
            )
            if other is not None:
                r["note"] += f"; llama.cpp {other['precision']} {other['load_s']:.2f} s"

    if "memory" in cases and cpu:
        found = resolve(args.model)
        if found.kind != "gguf":
            notes.append(f"memory: skipped, {args.model} is not a GGUF model")
        else:
            c = base.config
            spec = dict(
                model=args.model,
                path=str(found.path),
                prompts=stream_prompts,
                decode_tokens=args.decode_tokens,
                n_ctx_seq=args.prefill_tokens + args.decode_tokens + 64,
                threads=top,
                kv_values_per_token=2 * c.n_layers * c.n_kv_heads * c.head_dim,
            )
            for provider, prec in (("plm_engine", "gguf"), ("llama_cpp", "Q4_1")):
                if provider in providers and (provider == "plm_engine" or llama_cpp is not None):
                    row(
                        "memory",
                        provider,
                        prec,
                        measure_memory(spec | dict(provider=provider)),
                        top,
                        batch=args.streams,
                    )

    if "quality" in cases:
        for name, m in models.items():
            if name == "float32":
                continue
            with env_var("PLM_ENGINE_COMPILE", "0"):  # 16 prompts: eager, no compile of another bucket
                q = compare_greedy(base, m, tok)
            row(
                "quality",
                "plm_engine",
                name,
                {k: q[k] for k in ("n_identical", "mean_abs_logprob_diff", "max_abs_logprob_diff")}
                | dict(note=f"{q['n_prompts']} prompts x {q['n_tokens']} greedy tokens vs float32"),
                max(threads_list) if cpu else 0,
            )

    if "hf" in providers and ("decode_b1" in cases or "throughput" in cases):
        import transformers

        with tempfile.TemporaryDirectory() as d:
            base.save_pretrained(d)
            for name in hf_dtypes:
                hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, name)).to(dev).eval()
                for t in threads_list if "decode_b1" in cases else []:
                    if cpu:
                        torch.set_num_threads(t)
                    row("decode_b1", "hf", name, hf_decode_b1(hf, prompt_ids, args.decode_tokens, dev), t)
                    if not args.skip_static:
                        try:
                            res = hf_decode_b1(hf, prompt_ids, args.decode_tokens, dev, cache_implementation="static")
                        except Exception as e:  # not every transformers/device combination supports it
                            res = dict(note=f"failed: {type(e).__name__}: {e}"[:200])
                        row("decode_b1", "hf_static", name, res, t)
                del hf
    if "throughput" in cases:
        rngt = random.Random(0)
        prompts = [[rngt.randrange(100, vocab) for _ in range(rngt.randint(16, 256))] for _ in range(args.requests)]
        out_lens = [rngt.randint(16, 128) for _ in range(args.requests)]
        t = max(threads_list)
        if cpu:
            torch.set_num_threads(t)
        for name, m in models.items():
            row(
                "throughput",
                "plm_engine",
                name,
                ours_throughput(m, tok, prompts, out_lens, dev),
                t,
                batch=args.requests,
            )
        if "hf" in providers:
            import transformers

            with tempfile.TemporaryDirectory() as d:
                base.save_pretrained(d)
                for name in hf_dtypes:
                    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, name))
                    hf = hf.to(dev).eval()
                    res = hf_throughput(hf, prompts, out_lens, args.hf_batch, dev)
                    row("throughput", "hf", name, res, t, batch=args.hf_batch)
                    del hf
    for r in rows:  # the older columns, for the CSV's earlier rows
        if r["case"] in ("decode_b1", "streams"):
            r["decode_tok_s"] = r.get("tok_s")
        if r["case"] == "throughput":
            r["throughput_tok_s"] = r.get("tok_s")

    for ll in llamas.values():
        ll.close()
    tmp.cleanup()

    if not args.no_csv:
        path = write_csv(Path(args.out_dir) / "generate.csv", rows, COLUMNS)
        print(f"appended {len(rows)} rows to {path}", file=sys.stderr)
    if args.json:
        common.print_json_lines(rows)
        return 0
    print_plain_table(
        rows,
        [
            "case",
            "provider",
            "precision",
            "threads",
            "batch",
            "tok_s",
            "vs_llama_cpp",
            "step_ms",
            "weight_gbps",
            "bw_util",
            "host_overhead",
            "decode_path",
            "load_s",
            "rss_mb",
            "rss_vs_file",
            "n_identical",
            "mean_abs_logprob_diff",
            "note",
        ],
        title=f"generate: {args.model} on {dev}: {env['device_name']}; medians of {args.repeats} interleaved repeats",
    )
    print()
    for line in notes:
        print(line)
    if cpu:
        print(f"read bandwidth (GB/s) by threads: {', '.join(f'{t}: {read_bw[t]:.1f}' for t in threads_list)}")
    print()
    for line in goal_lines(rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
