"""Serving benchmark in the style of vLLM's benchmark_serving: our OpenAI-compatible server against
HF transformers' own `transformers serve`, same model, same requests, same run.

N requests with random prompt and output lengths (uniform in [len * (1 - range), len * (1 + range)]),
sent at a Poisson rate (or all at once) with at most --max-concurrency in flight, each a streaming
/v1/completions request at temperature 0. Per request the client records the time to the first text
chunk (TTFT), the gaps between text chunks (inter-token latency, ITL) and the output tokens (from the
final usage chunk). Reported per server:

    request throughput   completed requests / wall time of the run
    output throughput    sum of completion tokens / wall time of the run
    TTFT, ITL            p50 / p99 in ms; TPOT = (e2e - TTFT) / (output tokens - 1), mean in ms

Baseline: `transformers serve <folder>` (transformers' own OpenAI-compatible server, one generate per
request, no continuous batching), run offline on an HF folder written from the same weights
(plm_engine.models.save_pretrained + the model's tokenizer). Both servers run as subprocesses, one
after the other, so each has the machine to itself; the client (this process) only reads sockets.

    python benchmarks/bench_serve.py                              # smollm2-135m, 32 requests, 16 clients
    python benchmarks/bench_serve.py --num-prompts 8 --max-concurrency 4 --no-csv --json
    python benchmarks/bench_serve.py --no-baseline                # our server only
Rows are appended to benchmarks/results/serve.csv.

--big-prompt (issue 16 point 3) measures something else, our server only: the inter-token latency of 8
running streams (temperature 0, ignore_eos, --big-prompt-tokens each) without and with a concurrent
client sending 1 MiB prompts back to back (each is tokenized, then refused for its length). The
server tokenizes off the event loop with the GIL released, so the streams should barely notice:
    p99 ratio = p99 ITL with the big prompts / p99 ITL without them      (target <= 2)
The two conditions alternate for --big-prompt-rounds rounds in one server process; gaps are pooled
per condition. Rows go to benchmarks/results/serve_big_prompt.csv.

    python benchmarks/bench_serve.py --big-prompt                  # smollm2-135m
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BASELINE = "transformers serve (HF transformers {version}, generate per request, no continuous batching)"


# ---- servers -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess on 127.0.0.1:port, ready once GET /health answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path, env: dict | None = None):
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env or os.environ.copy(), cwd=common.REPO
        )

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}); log: {self.log_path}\n"
                    + self.log_path.read_text()[-3000:]
                )
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; log: {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_ours(
    args, workdir: Path, extra: tuple[str, ...] = (), name: str = "plm_engine", log_name: str = "plm_engine.log"
) -> tuple[ServerProcess, str]:
    """`plm-engine serve` on a free port with the run's model, concurrency and KV-cache size (+ extra flags)."""
    port = free_port()
    cmd = [sys.executable, "-m", "plm_engine.cli", "serve", "--model", args.model, "--port", str(port)]
    cmd += ["--max-num-seqs", str(max(args.max_concurrency, 1)), "--log-level", "warning"]
    if args.kv_cache_tokens:
        cmd += ["--kv-cache-tokens", str(args.kv_cache_tokens)]
    cmd += list(extra)
    return ServerProcess(name, cmd, port, workdir / log_name), args.model


def write_hf_folder(model_name: str, folder: Path) -> Path:
    """The model as a transformers folder: config + safetensors (our save_pretrained) and the tokenizer."""
    from plm_engine.models import load_model, load_tokenizer, save_pretrained

    tok = load_tokenizer(model_name)
    save_pretrained(load_model(model_name, dequantize=True), folder)
    tok.backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        "chat_template": tok.chat_template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


def start_baseline(args, workdir: Path) -> tuple[ServerProcess, str]:
    folder = write_hf_folder(args.model, workdir / "hf_model")
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    cmd = [
        str(exe) if exe.exists() else "transformers",
        "serve",
        str(folder),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu" if args.device == "cpu" else args.device,
        "--dtype",
        "float32",
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    return ServerProcess("transformers_serve", cmd, port, workdir / "transformers_serve.log", env), str(folder)


# ---- workload and client -------------------------------------------------------------------------------


@dataclass
class Request:
    prompt: str
    max_tokens: int


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


def make_requests(args) -> list[Request]:
    """Random prompts (random token ids decoded to text, as vLLM's random dataset) and output lengths."""
    from plm_engine.models import load_tokenizer

    tok = load_tokenizer(args.model)
    rng = random.Random(args.seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - args.range_ratio)), int(mean * (1 + args.range_ratio))))

    special = {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) if t is not None}
    vocab = [i for i in range(100, tok.vocab_size) if i not in special]  # low ids are special/control tokens
    return [
        Request(tok.decode([rng.choice(vocab) for _ in range(length(args.input_len))]), length(args.output_len))
        for _ in range(args.num_prompts)
    ]


async def send(client, url: str, model: str, req: Request) -> Result:
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res, t0 = Result(), time.perf_counter()
    last, chunks = None, 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                now = time.perf_counter()
                if any(c.get("text") for c in data.get("choices") or []):
                    chunks += 1
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                if data.get("usage"):
                    res.prompt_tokens = data["usage"]["prompt_tokens"]
                    res.output_tokens = data["usage"]["completion_tokens"]
        res.e2e = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks
        res.ok = last is not None
        if not res.ok:
            res.error = "no text streamed"
    except Exception as e:  # a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(url: str, model: str, requests: list[Request], args) -> tuple[list[Result], float]:
    import httpx

    sem = asyncio.Semaphore(args.max_concurrency)
    rng = random.Random(args.seed + 1)
    limits = httpx.Limits(max_connections=args.max_concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:

        async def one(req: Request) -> Result:
            async with sem:
                return await send(client, url, model, req)

        await send(client, url, model, Request(requests[0].prompt, 2))  # warm-up, untimed
        t0 = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(one(req)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    itl = [x for r in ok for x in r.itl]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "req_per_s": len(ok) / duration,
        "output_tok_per_s": out_tokens / duration,
        "total_tok_per_s": (in_tokens + out_tokens) / duration,
        "mean_prompt_tokens": in_tokens / max(len(ok), 1),
        "mean_output_tokens": out_tokens / max(len(ok), 1),
        "ttft_p50_ms": pct([r.ttft for r in ok], 50) * 1e3,
        "ttft_p99_ms": pct([r.ttft for r in ok], 99) * 1e3,
        "itl_p50_ms": pct(itl, 50) * 1e3,
        "itl_p99_ms": pct(itl, 99) * 1e3,
        "tpot_mean_ms": statistics.fmean(tpot) * 1e3 if tpot else float("nan"),
        "first_error": next((r.error for r in results if not r.ok), ""),
    }


# ---- big prompt vs running streams (issue 16 point 3) ----------------------------------------------------

BIG_PROMPT_BYTES = 1 << 20
BIG_PROMPT_STREAMS = 8


def big_prompt_text(n_bytes: int = BIG_PROMPT_BYTES) -> str:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu ".split()
    text = " ".join(words[i % len(words)] + str(i % 97) for i in range(n_bytes // 6))
    return text[:n_bytes]


async def _stream_stamps(client, url: str, model: str, max_tokens: int, i: int) -> list[float]:
    body = {
        "model": model,
        "prompt": f"Stream {i}: tell me a long story about the number {i}.",
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    stamps = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"stream {i}: HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"text":""' not in line:
                stamps.append(time.perf_counter())
    return stamps


async def _big_prompt_phase(url: str, model: str, max_tokens: int, with_big: bool, body: bytes) -> dict:
    """ITLs of BIG_PROMPT_STREAMS streams; with_big: a client sends `body` back to back meanwhile."""
    import httpx

    sent, latencies, statuses = 0, [], set()
    limits = httpx.Limits(max_connections=BIG_PROMPT_STREAMS + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        streams = [
            asyncio.create_task(_stream_stamps(client, url, model, max_tokens, i)) for i in range(BIG_PROMPT_STREAMS)
        ]

        async def big_sender():
            nonlocal sent
            while not all(t.done() for t in streams):
                t0 = time.perf_counter()
                r = await client.post(
                    url + "/v1/completions", content=body, headers={"content-type": "application/json"}
                )
                latencies.append(time.perf_counter() - t0)
                statuses.add(r.status_code)
                sent += 1

        sender = asyncio.create_task(big_sender()) if with_big else None
        stamps = await asyncio.gather(*streams)
        if sender is not None:
            await sender
    itl = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return {"itl": itl, "big_sent": sent, "big_latency": latencies, "big_statuses": sorted(statuses)}


def run_big_prompt(args) -> int:
    env = common.env_info(args.device)
    text = big_prompt_text()
    body = json.dumps({"model": args.model, "prompt": text, "max_tokens": 4}).encode()
    pooled = {False: [], True: []}
    big_sent, big_latency, statuses = 0, [], set()
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        extra = ("--max-body-bytes", str(2 * BIG_PROMPT_BYTES), "--max-num-seqs", str(BIG_PROMPT_STREAMS))
        server, model = start_ours(args, Path(tmp), extra)
        try:
            server.wait_ready(args.startup_timeout)
            load_before = os.getloadavg()[0]
            asyncio.run(_big_prompt_phase(server.url, model, 4, False, body))  # warm-up, untimed
            for r in range(args.big_prompt_rounds):
                for with_big in (False, True):
                    print(
                        f"[big-prompt] round {r + 1}, {'with' if with_big else 'without'} 1 MiB prompts",
                        file=sys.stderr,
                    )
                    res = asyncio.run(_big_prompt_phase(server.url, model, args.big_prompt_tokens, with_big, body))
                    pooled[with_big] += res["itl"]
                    big_sent += res["big_sent"]
                    big_latency += res["big_latency"]
                    statuses.update(res["big_statuses"])
            load_avg = (load_before + os.getloadavg()[0]) / 2
        finally:
            server.stop()
    row = {
        **env,
        "model": args.model,
        "streams": BIG_PROMPT_STREAMS,
        "tokens_per_stream": args.big_prompt_tokens,
        "rounds": args.big_prompt_rounds,
        "big_prompt_bytes": BIG_PROMPT_BYTES,
        "big_prompts_sent": big_sent,
        "big_prompt_status": "/".join(map(str, sorted(statuses))),
        "big_prompt_latency_p50_ms": pct(big_latency, 50) * 1e3,
        "load_avg": load_avg,
        "itl_p50_ms_without": pct(pooled[False], 50) * 1e3,
        "itl_p99_ms_without": pct(pooled[False], 99) * 1e3,
        "itl_p50_ms_with": pct(pooled[True], 50) * 1e3,
        "itl_p99_ms_with": pct(pooled[True], 99) * 1e3,
        "itl_max_ms_with": max(pooled[True]) * 1e3 if pooled[True] else float("nan"),
        "p99_ratio": pct(pooled[True], 99) / pct(pooled[False], 99),
    }
    columns = [
        "big_prompts_sent",
        "big_prompt_latency_p50_ms",
        "itl_p50_ms_without",
        "itl_p99_ms_without",
        "itl_p50_ms_with",
        "itl_p99_ms_with",
        "itl_max_ms_with",
        "p99_ratio",
        "load_avg",
    ]
    title = f"{args.model}: ITL of {BIG_PROMPT_STREAMS} streams without / with 1 MiB prompts"
    common.report_rows(args, [row], columns, title, "serve_big_prompt.csv")
    ok = big_sent > 0 and statuses == {400} and row["p99_ratio"] <= 2.0
    return 0 if ok else 1


# ---- shared-prefix workload: prefix caching on vs off -------------------------------------------------

SHARED_PREFIX_COLUMNS = [
    "server",
    "load_avg",
    "completed",
    "failed",
    "mean_prompt_tokens",
    "prefix_hit_rate",
    "duration_s",
    "output_tok_per_s",
    "total_tok_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_mean_ms",
    "ttft_p50_ratio",
    "speedup_output_tok_s",
]


def make_shared_prefix_requests(args) -> tuple[list[Request], Request]:
    """--num-prompts short questions after one shared system prompt of about --prefix-len tokens (random
    token ids decoded to text), and an unrelated warm-up request that leaves nothing useful cached."""
    from plm_engine.models import load_tokenizer

    tok = load_tokenizer(args.model)
    rng = random.Random(args.seed)
    special = {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) if t is not None}
    vocab = [i for i in range(100, tok.vocab_size) if i not in special]

    def text(n: int) -> str:
        return tok.decode([rng.choice(vocab) for _ in range(n)])

    system = "System: " + text(args.prefix_len) + "\n\n"
    questions = [
        Request(f"{system}Question {i + 1}: {text(rng.randint(8, 24))}\nAnswer:", args.output_len)
        for i in range(args.num_prompts)
    ]
    return questions, Request(text(64), 2)


def _scrape_prefix_hit_rate(url: str) -> float:
    """Tokens reused / tokens looked up, from the server's /metrics counters whose names contain
    prefix_cache_hits and prefix_cache_queries (NaN when it exports none)."""
    import httpx

    sums = {"prefix_cache_hits": 0.0, "prefix_cache_queries": 0.0}
    found = set()
    try:
        body = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return float("nan")
    for line in body.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        for key in sums:
            if key in name.split("{")[0] and not name.split("{")[0].endswith("_created"):
                sums[key] += float(value)
                found.add(key)
    if len(found) < 2 or not sums["prefix_cache_queries"]:
        return float("nan")
    return sums["prefix_cache_hits"] / sums["prefix_cache_queries"]


class _IgnoreEos:
    """An httpx client whose request bodies also carry ignore_eos (vLLM's extra, as its benchmark does
    for random text): every answer has its full length whatever the model makes of the question."""

    def __init__(self, client):
        self.client = client

    def stream(self, method: str, url: str, json: dict, **kw):
        return self.client.stream(method, url, json={**json, "ignore_eos": True}, **kw)


async def _run_shared_prefix_load(url: str, model: str, requests: list[Request], warmup: Request, args):
    import httpx

    sem = asyncio.Semaphore(args.max_concurrency)
    limits = httpx.Limits(max_connections=args.max_concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as http:
        client = _IgnoreEos(http)

        async def one(req: Request) -> Result:
            async with sem:
                return await send(client, url, model, req)

        await send(client, url, model, warmup)  # untimed; shares no prefix with the workload
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(r) for r in requests))
        return results, time.perf_counter() - t0


def run_shared_prefix(args) -> int:
    """Our server twice on the same shared-prefix requests, prefix caching on then off (--no-prefix-caching),
    all requests sent at once with at most --max-concurrency in flight. Rows go to serve_shared_prefix.csv."""
    requests, warmup = make_shared_prefix_requests(args)
    env = common.env_info(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_serve_prefix_") as tmp:
        for caching in (True, False):
            name = "plm_engine prefix-caching" if caching else "plm_engine no-prefix-caching"
            extra = () if caching else ("--no-prefix-caching",)
            server, _ = start_ours(args, Path(tmp), extra, name=name, log_name=f"server_{int(caching)}.log")
            try:
                server.wait_ready(args.startup_timeout)
                print(f"[{name}] {len(requests)} requests, {args.max_concurrency} concurrent ...", file=sys.stderr)
                load_before = os.getloadavg()[0]
                results, duration = asyncio.run(_run_shared_prefix_load(server.url, args.model, requests, warmup, args))
                load_avg = (load_before + os.getloadavg()[0]) / 2
                hit_rate = _scrape_prefix_hit_rate(server.url)
            finally:
                server.stop()
            rows.append(
                {
                    **env,
                    "server": name,
                    "model": args.model,
                    "num_prompts": args.num_prompts,
                    "prefix_len": args.prefix_len,
                    "max_concurrency": args.max_concurrency,
                    "output_len": args.output_len,
                    "load_avg": load_avg,
                    "prefix_hit_rate": hit_rate,
                    **summarize(results, duration),
                }
            )
    on, off = rows
    on["ttft_p50_ratio"] = on["ttft_p50_ms"] / off["ttft_p50_ms"]  # < 1: caching answers sooner
    on["speedup_output_tok_s"] = on["output_tok_per_s"] / off["output_tok_per_s"]
    off["ttft_p50_ratio"] = off["speedup_output_tok_s"] = 1.0
    title = (
        f"shared prefix, {args.model}: a ~{args.prefix_len}-token system prompt + {args.num_prompts} "
        f"questions, {args.max_concurrency} concurrent; ratios are caching on / off"
    )
    columns = list(env) + ["model", "num_prompts", "prefix_len", "max_concurrency", "output_len"]
    columns += [c for c in SHARED_PREFIX_COLUMNS if c not in columns]
    columns += ["mean_output_tokens", "req_per_s", "itl_p50_ms", "itl_p99_ms", "first_error"]
    common.report_rows(args, rows, SHARED_PREFIX_COLUMNS, title, "serve_shared_prefix.csv", columns)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


# ---- main ----------------------------------------------------------------------------------------------

COLUMNS = [
    "server",
    "load_avg",
    "completed",
    "failed",
    "duration_s",
    "req_per_s",
    "output_tok_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "tpot_mean_ms",
    "speedup_output_tok_s",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a named default model or path (plm_engine.load_model)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths uniform in len * [1 - r, 1 + r]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--no-baseline", action="store_true", help="only our server")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--quick", action="store_true", help="smoke run: 4 prompts, 8 output tokens, concurrency 4")
    p.add_argument(
        "--big-prompt",
        action="store_true",
        help="instead: p99 ITL of 8 streams without / with concurrent 1 MiB prompts (our server only)",
    )
    p.add_argument("--big-prompt-tokens", type=int, default=64, help="--big-prompt: tokens per stream")
    p.add_argument("--big-prompt-rounds", type=int, default=2, help="--big-prompt: alternations of the two conditions")
    p.add_argument(
        "--shared-prefix",
        type=int,
        nargs="?",
        const=1000,
        default=None,
        metavar="TOKENS",
        dest="prefix_len",
        help="instead: a ~TOKENS-token (default 1000) system prompt + --num-prompts questions, prefix caching on vs off",
    )
    args = p.parse_args(argv)
    if args.big_prompt:
        if args.big_prompt_tokens < 2 or args.big_prompt_rounds < 1:
            p.error("--big-prompt-tokens must be >= 2 and --big-prompt-rounds >= 1")
        return run_big_prompt(args)
    if args.quick:
        args.num_prompts, args.output_len, args.max_concurrency = 4, 8, 4
    if not 0 <= args.range_ratio < 1:
        p.error(f"--range-ratio must be in [0, 1), got {args.range_ratio}")
    if args.num_prompts < 1 or args.max_concurrency < 1:
        p.error("--num-prompts and --max-concurrency must be >= 1")
    if args.prefix_len is not None:
        return run_shared_prefix(args)

    import transformers

    baseline = BASELINE.format(version=transformers.__version__)
    requests = make_requests(args)
    env = common.env_info(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        starters = [("plm_engine", start_ours)] + ([] if args.no_baseline else [("transformers_serve", start_baseline)])
        for name, start in starters:
            print(f"[{name}] starting ...", file=sys.stderr)
            server, model = start(args, Path(tmp))
            try:
                server.wait_ready(args.startup_timeout)
                print(
                    f"[{name}] running {len(requests)} requests, {args.max_concurrency} concurrent ...", file=sys.stderr
                )
                load_before = os.getloadavg()[0]
                results, duration = asyncio.run(run_load(server.url, model, requests, args))
                # The machine may be shared: its 1-minute load average around the run says how much.
                load_avg = (load_before + os.getloadavg()[0]) / 2
            finally:
                server.stop()
            rows.append(
                {
                    **env,
                    "server": name,
                    "model": args.model,
                    "baseline": baseline,
                    "num_prompts": args.num_prompts,
                    "max_concurrency": args.max_concurrency,
                    "request_rate": "inf" if args.request_rate == float("inf") else args.request_rate,
                    "input_len": args.input_len,
                    "output_len": args.output_len,
                    "range_ratio": args.range_ratio,
                    "load_avg": load_avg,
                    **summarize(results, duration),
                }
            )
    if len(rows) == 2:
        ours, base = rows
        ours["speedup_output_tok_s"] = ours["output_tok_per_s"] / base["output_tok_per_s"]
        ours["ttft_p50_ratio"] = ours["ttft_p50_ms"] / base["ttft_p50_ms"]
        base["speedup_output_tok_s"] = 1.0
    print(f"baseline: {baseline}", file=sys.stderr)
    columns = list(env) + ["server", "model", "baseline", "num_prompts", "max_concurrency", "request_rate"]
    columns += ["input_len", "output_len", "range_ratio"] + [c for c in COLUMNS if c != "server"]
    columns += ["total_tok_per_s", "mean_prompt_tokens", "mean_output_tokens", "ttft_p50_ratio", "first_error"]
    title = (
        f"serving {args.model}: {args.num_prompts} requests, {args.max_concurrency} concurrent, baseline = {baseline}"
    )
    common.report_rows(args, rows, COLUMNS, title, "serve.csv", columns)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
