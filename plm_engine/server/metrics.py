"""Prometheus metrics for the server, through prometheus_client.

Two families side by side:
- ours (`plm_engine_*`): HTTP requests by endpoint and status, token counters, latency histograms and the
  engine's state (queues, KV-cache blocks, preemptions), as before;
- vLLM's names (`vllm:*`, with a `model_name` label) for the same quantities, so dashboards and
  autoscalers written for vLLM work unchanged: vllm:num_requests_running / _waiting,
  vllm:kv_cache_usage_perc (and its older name vllm:gpu_cache_usage_perc), vllm:num_preemptions_total,
  vllm:prompt_tokens_total, vllm:generation_tokens_total, vllm:request_success_total,
  vllm:time_to_first_token_seconds, vllm:time_per_output_token_seconds (and its newer name
  vllm:inter_token_latency_seconds), vllm:e2e_request_latency_seconds, vllm:request_prompt_tokens,
  vllm:request_generation_tokens, vllm:prefix_cache_queries / vllm:prefix_cache_hits (tokens).

Each server has its own CollectorRegistry (tests run several in one process). The engine's state is read
once per scrape by a custom collector, so the gauges of one scrape agree with each other.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets in seconds: from one fast decode step on a GPU to a long CPU prefill.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


def _token_buckets(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to the context length (as vLLM's request-size histograms)."""
    out, k = [], 1
    while k <= max_model_len:
        out += [b for b in (k, 2 * k, 5 * k) if b <= max_model_len]
        k *= 10
    return out or [1]


class ServerMetrics:
    """Everything /metrics exposes. The app reports events through the methods below; engine state comes
    from `stats()` (AsyncEngine.stats: num_waiting, num_running, kv_blocks_total, kv_blocks_used,
    num_preemptions, requests_aborted, requests_finished) at scrape time."""

    def __init__(self, stats: Callable[[], dict], model_name: str = "model", max_model_len: int = 2048):
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        m = [model_name]
        lat = LATENCY_BUCKETS

        # ours
        self._requests = Counter(
            "plm_engine_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self._rejected = Counter(
            "plm_engine_requests_rejected",
            "Generation requests refused before running, by reason (queue_full, engine_dead)",
            ["reason"],
            registry=r,
        )
        self._prompt = Counter("plm_engine_prompt_tokens", "Prompt tokens of finished generation requests", registry=r)
        self._generated = Counter(
            "plm_engine_generation_tokens", "Tokens generated for finished or aborted requests", registry=r
        )
        self._finished = Counter(
            "plm_engine_request_finished", "Generation requests by finish reason", ["finish_reason"], registry=r
        )
        self._ttft = Histogram(
            "plm_engine_time_to_first_token_seconds",
            "Time from request arrival to its first token",
            buckets=lat,
            registry=r,
        )
        self._itl = Histogram(
            "plm_engine_inter_token_latency_seconds",
            "Time between consecutive streamed tokens",
            buckets=lat,
            registry=r,
        )
        self._e2e = Histogram(
            "plm_engine_e2e_request_latency_seconds",
            "Time from request arrival to its last token",
            buckets=lat,
            registry=r,
        )

        # vLLM's names
        def counter(name, help, extra=()):
            c = Counter(name, help, ["model_name", *extra], registry=r)
            return c if extra else c.labels(*m)

        def histogram(name, help, buckets=lat):
            return Histogram(name, help, ["model_name"], buckets=buckets, registry=r).labels(*m)

        self._v_prompt = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self._v_generated = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self._v_success = counter("vllm:request_success", "Count of finished requests.", ("finished_reason",))
        self._v_ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.")
        self._v_tpot = histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.")
        self._v_itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.")
        self._v_e2e = histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds."
        )
        tokens = _token_buckets(max_model_len)
        self._v_req_prompt = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed per request.", tokens
        )
        self._v_req_generated = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed per request.", tokens
        )
        r.register(_EngineCollector(stats, model_name))

    # ---- events -----------------------------------------------------------------------------------

    def request(self, endpoint: str, status: int) -> None:
        self._requests.labels(endpoint, str(status)).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason).inc()

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)
        self._v_ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)
        self._v_tpot.observe(seconds)
        self._v_itl.observe(seconds)

    def finished(self, prompt_tokens: int, generated_tokens: int, reason: str, e2e: float | None) -> None:
        """One engine request ended (reason: stop, length or abort); e2e is None when it did not complete."""
        self._prompt.inc(prompt_tokens)
        self._generated.inc(generated_tokens)
        self._finished.labels(reason).inc()
        self._v_prompt.inc(prompt_tokens)
        self._v_generated.inc(generated_tokens)
        self._v_success.labels(self.model_name, reason).inc()
        self._v_req_prompt.observe(prompt_tokens)
        self._v_req_generated.observe(generated_tokens)
        if e2e is not None:
            self._e2e.observe(e2e)
            self._v_e2e.observe(e2e)

    def embedded(self, prompt_tokens: int) -> None:
        self._prompt.inc(prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's state, read once per scrape."""

    _OURS = (
        ("num_waiting", "num_requests_waiting", "Requests queued in the engine, not yet scheduled"),
        ("num_running", "num_requests_running", "Sequences in the running batch"),
        ("kv_blocks_total", "kv_cache_blocks_total", "KV-cache blocks in the pool"),
        ("kv_blocks_used", "kv_cache_blocks_used", "KV-cache blocks held by sequences"),
        ("num_preemptions", "num_preemptions", "Sequences preempted for KV-cache space since start"),
        ("requests_aborted", "num_requests_aborted", "Requests aborted in the engine since start"),
        ("requests_finished", "num_requests_finished", "Requests finished in the engine since start"),
    )

    def __init__(self, stats: Callable[[], dict], model_name: str):
        self.stats, self.model_name = stats, model_name

    def describe(self):
        return []  # no scrape of the engine at registration time

    def collect(self):
        s = dict(self.stats())
        total = s.get("kv_blocks_total", 0)
        usage = s.get("kv_blocks_used", 0) / total if total else 0.0
        for key, name, help in self._OURS:
            yield GaugeMetricFamily(f"plm_engine_{name}", help, value=float(s.get(key, 0)))
        yield GaugeMetricFamily(
            "plm_engine_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1)", value=usage
        )

        def gauge(name, help, value):
            g = GaugeMetricFamily(name, help, labels=["model_name"])
            g.add_metric([self.model_name], float(value))
            return g

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", s.get("num_running", 0)
        )
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.get("num_waiting", 0))
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
        yield gauge("vllm:gpu_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage (older name).", usage)
        c = CounterMetricFamily(
            "vllm:num_preemptions", "Cumulative number of preemptions from the engine.", labels=["model_name"]
        )
        c.add_metric([self.model_name], float(s.get("num_preemptions", 0)))
        yield c
        # Prefix caching, in tokens as vLLM counts them (misses = queries - hits).
        for key, help in (
            ("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
            ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
        ):
            c = CounterMetricFamily(f"vllm:{key}", help, labels=["model_name"])
            c.add_metric([self.model_name], float(s.get(key, 0)))
            yield c
        yield GaugeMetricFamily(
            "plm_engine_prefix_cache_blocks",
            "KV blocks held by the prefix cache",
            value=float(s.get("prefix_cache_blocks", 0)),
        )
