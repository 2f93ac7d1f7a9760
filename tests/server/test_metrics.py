"""The Prometheus registry: text format, histogram buckets, label handling, engine gauges."""

import math
import re

import pytest

from plm_engine.server.metrics import Counter, Histogram, Registry, ServerMetrics

# One sample line of the text exposition format: name{labels} value.
SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? '
    r"([-+]?[0-9.eE+-]+|[+-]Inf|NaN)$"
)


def parse(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) \w+ ", line), line
            continue
        assert SAMPLE.match(line), f"not a Prometheus sample line: {line!r}"
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def test_histogram_buckets_are_cumulative():
    h = Histogram("lat_seconds", "latency", buckets=(0.1, 0.5, 1.0))
    for v in (0.05, 0.1, 0.3, 0.7, 3.0, 2.0):
        h.observe(v)
    r = Registry()
    r.add(h)
    s = parse(r.render())
    assert s['plm_engine_lat_seconds_bucket{le="0.1"}'] == 2  # le is inclusive
    assert s['plm_engine_lat_seconds_bucket{le="0.5"}'] == 3
    assert s['plm_engine_lat_seconds_bucket{le="1"}'] == 4
    assert s['plm_engine_lat_seconds_bucket{le="+Inf"}'] == 6
    assert s["plm_engine_lat_seconds_count"] == 6 and math.isclose(s["plm_engine_lat_seconds_sum"], 6.15)


def test_counter_labels_and_escaping():
    c = Counter("hits_total", "hits", ("path",))
    c.inc(path='/a"b\\c\nd')
    c.inc(2, path="/x")
    text = "\n".join(c.render())
    assert 'plm_engine_hits_total{path="/a\\"b\\\\c\\nd"} 1' in text
    assert 'plm_engine_hits_total{path="/x"} 2' in text
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(-1, path="/x")
    with pytest.raises(ValueError, match="labels"):
        c.inc(other="y")


def test_bad_definitions():
    with pytest.raises(ValueError, match="increasing"):
        Histogram("h", "h", buckets=(1.0, 0.5))
    with pytest.raises(ValueError, match="name"):
        Counter("bad-name", "x")
    r = Registry()
    r.add(Counter("twice", "x"))
    with pytest.raises(ValueError, match="twice"):
        r.add(Counter("twice", "x"))


def test_server_metrics_read_engine_stats_per_scrape():
    state = dict(
        num_waiting=3,
        num_running=5,
        kv_blocks_total=40,
        kv_blocks_used=10,
        num_preemptions=1,
        requests_aborted=2,
        requests_finished=7,
    )
    m = ServerMetrics(lambda: dict(state))
    m.requests.inc(endpoint="/v1/completions", status="200")
    m.ttft.observe(0.02)
    s = parse(m.render())
    assert s["plm_engine_num_requests_waiting"] == 3 and s["plm_engine_num_requests_running"] == 5
    assert s["plm_engine_kv_cache_usage_ratio"] == 0.25
    assert s['plm_engine_requests_total{endpoint="/v1/completions",status="200"}'] == 1
    assert s["plm_engine_time_to_first_token_seconds_count"] == 1
    state["kv_blocks_used"] = 0
    assert parse(m.render())["plm_engine_kv_cache_usage_ratio"] == 0
