"""Prometheus metrics for the server: a small registry that renders the text exposition format 0.0.4.

Our own ~100 lines instead of `prometheus_client`: the server needs counters, gauges read from the
engine at scrape time and histograms, nothing else, and one less runtime dependency. Every metric is
process-local to one server (one engine), so there is no multiprocess mode to worry about.

Format reference: https://prometheus.io/docs/instrumenting/exposition_formats/ (HELP/TYPE lines,
`name{label="value"} number`, histograms as cumulative `_bucket{le=...}` plus `_sum` and `_count`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

PREFIX = "plm_engine_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    x = float(x)
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return str(int(x)) if x.is_integer() and abs(x) < 2**53 else repr(x)


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        if not name.replace("_", "").isalnum():
            raise ValueError(f"metric name {name!r} must be [a-zA-Z0-9_]")
        self.name, self.help, self.labelnames = PREFIX + name, help, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict) -> tuple:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != declared {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing count, optionally per label set."""

    kind = "counter"

    def __init__(self, name, help, labelnames=()):
        super().__init__(name, help, labelnames)
        self._values: dict[tuple, float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease (amount={amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A value read from a callback at scrape time (queue depth, KV-cache use...)."""

    kind = "gauge"

    def __init__(self, name, help, read: Callable[[], float]):
        super().__init__(name, help)
        self._read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(float(self._read()))}"]


class Histogram(_Metric):
    """Observations counted into fixed cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name, help, buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(name, help)
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError(f"{self.name}: buckets must be a non-empty increasing sequence, got {buckets}")
        self.buckets = tuple(float(b) for b in buckets) + (math.inf,)
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            for i, upper in enumerate(self.buckets):
                if value <= upper:
                    self._counts[i] += 1
                    break

    @property
    def count(self) -> int:
        return sum(self._counts)

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, cumulative = self.header(), 0
        for upper, c in zip(self.buckets, counts):
            cumulative += c
            lines.append(f'{self.name}_bucket{{le="{_num(upper)}"}} {cumulative}')
        lines += [f"{self.name}_sum {_num(total)}", f"{self.name}_count {cumulative}"]
        return lines


class Registry:
    """The metrics of one server, rendered in registration order."""

    def __init__(self):
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines += m.render()
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """Everything /metrics exposes: request and token counters kept by the server, engine state read
    through `stats()` at scrape time, and latency histograms observed per streamed token."""

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats
        self._cache: dict = {}
        r = self.registry = Registry()
        self.requests = r.add(
            Counter("requests_total", "HTTP requests by endpoint and status code", ("endpoint", "status"))
        )
        self.prompt_tokens = r.add(Counter("prompt_tokens_total", "Prompt tokens of finished generation requests"))
        self.generation_tokens = r.add(
            Counter("generation_tokens_total", "Tokens generated for finished or aborted requests")
        )
        self.finished = r.add(
            Counter("request_finished_total", "Generation requests by finish reason", ("finish_reason",))
        )
        self.ttft = r.add(Histogram("time_to_first_token_seconds", "Time from request arrival to its first token"))
        self.itl = r.add(Histogram("inter_token_latency_seconds", "Time between consecutive streamed tokens"))
        self.e2e = r.add(Histogram("e2e_request_latency_seconds", "Time from request arrival to its last token"))
        for key, name, help in (
            ("num_waiting", "num_requests_waiting", "Requests queued in the engine, not yet scheduled"),
            ("num_running", "num_requests_running", "Sequences in the running batch"),
            ("kv_blocks_total", "kv_cache_blocks_total", "KV-cache blocks in the pool"),
            ("kv_blocks_used", "kv_cache_blocks_used", "KV-cache blocks held by sequences"),
            ("num_preemptions", "num_preemptions", "Sequences preempted for KV-cache space since start"),
            ("requests_aborted", "num_requests_aborted", "Requests aborted in the engine since start"),
            ("requests_finished", "num_requests_finished", "Requests finished in the engine since start"),
        ):
            r.add(Gauge(name, help, self._stat(key)))
        r.add(Gauge("kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1)", self._kv_usage))

    def _stat(self, key: str) -> Callable[[], float]:
        return lambda: float(self._cache.get(key, 0))

    def _kv_usage(self) -> float:
        total = self._cache.get("kv_blocks_total", 0)
        return self._cache.get("kv_blocks_used", 0) / total if total else 0.0

    def render(self) -> str:
        # One engine snapshot per scrape so the gauges agree with each other.
        self._cache = dict(self._stats())
        return self.registry.render()
