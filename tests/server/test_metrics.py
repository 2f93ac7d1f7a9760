"""/metrics through prometheus_client: our plm_engine_* metrics and vLLM's names (model_name label) for
the same quantities, engine gauges read per scrape, exposition parseable by Prometheus' own parser."""

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from plm_engine.server.metrics import ServerMetrics  # noqa: E402

STATE = dict(
    num_waiting=3,
    num_running=5,
    kv_blocks_total=40,
    kv_blocks_used=10,
    num_preemptions=1,
    requests_aborted=2,
    requests_finished=7,
    prefix_cache_queries=96,
    prefix_cache_hits=64,
    prefix_cache_blocks=4,
)


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} through prometheus_client's parser (fails on bad syntax)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_engine_state_read_per_scrape_under_both_names():
    state = dict(STATE)
    m = ServerMetrics(lambda: dict(state), model_name="tiny")
    s = samples(m.render().decode())
    model = (("model_name", "tiny"),)
    assert s[("plm_engine_num_requests_waiting", ())] == 3 == s[("vllm:num_requests_waiting", model)]
    assert s[("plm_engine_num_requests_running", ())] == 5 == s[("vllm:num_requests_running", model)]
    assert s[("plm_engine_kv_cache_usage_ratio", ())] == 0.25 == s[("vllm:kv_cache_usage_perc", model)]
    assert s[("vllm:gpu_cache_usage_perc", model)] == 0.25
    assert s[("vllm:num_preemptions_total", model)] == 1 == s[("plm_engine_num_preemptions", ())]
    assert s[("vllm:prefix_cache_queries_total", model)] == 96 and s[("vllm:prefix_cache_hits_total", model)] == 64
    assert s[("plm_engine_prefix_cache_blocks", ())] == 4
    state.update(kv_blocks_used=0, num_running=0)
    s = samples(m.render().decode())
    assert s[("vllm:kv_cache_usage_perc", model)] == 0 and s[("vllm:num_requests_running", model)] == 0


def test_request_events_count_in_both_families():
    m = ServerMetrics(lambda: dict(STATE), model_name="tiny", max_model_len=256)
    m.request("/v1/completions", 200)
    m.first_token(0.02)
    for dt in (0.01, 0.03):
        m.inter_token(dt)
    m.finished(prompt_tokens=7, generated_tokens=3, reason="stop", e2e=0.06)
    m.finished(prompt_tokens=4, generated_tokens=1, reason="abort", e2e=None)
    s = samples(m.render().decode())
    model = ("model_name", "tiny")
    assert s[("plm_engine_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 1
    assert s[("plm_engine_prompt_tokens_total", ())] == 11 == s[("vllm:prompt_tokens_total", (model,))]
    assert s[("plm_engine_generation_tokens_total", ())] == 4 == s[("vllm:generation_tokens_total", (model,))]
    assert s[("vllm:request_success_total", (("finished_reason", "stop"), model))] == 1
    assert s[("vllm:request_success_total", (("finished_reason", "abort"), model))] == 1
    assert s[("plm_engine_request_finished_total", (("finish_reason", "abort"),))] == 1
    assert s[("plm_engine_time_to_first_token_seconds_count", ())] == 1
    assert s[("vllm:time_to_first_token_seconds_count", (model,))] == 1
    assert s[("vllm:time_per_output_token_seconds_count", (model,))] == 2
    assert s[("vllm:inter_token_latency_seconds_count", (model,))] == 2
    assert s[("plm_engine_inter_token_latency_seconds_count", ())] == 2
    assert abs(s[("vllm:inter_token_latency_seconds_sum", (model,))] - 0.04) < 1e-9
    # Only completed requests have an end-to-end latency.
    assert s[("vllm:e2e_request_latency_seconds_count", (model,))] == 1
    assert s[("plm_engine_e2e_request_latency_seconds_count", ())] == 1
    # Request-size histograms: buckets up to the context length, cumulative.
    assert s[("vllm:request_prompt_tokens_count", (model,))] == 2
    assert s[("vllm:request_prompt_tokens_bucket", (("le", "5.0"), model))] == 1
    assert s[("vllm:request_prompt_tokens_bucket", (("le", "10.0"), model))] == 2
    assert ("vllm:request_prompt_tokens_bucket", (("le", "500.0"), model)) not in s  # > max_model_len


def test_servers_have_separate_registries():
    a, b = ServerMetrics(lambda: dict(STATE), "a"), ServerMetrics(lambda: dict(STATE), "b")
    a.request("/health", 200)
    assert ("plm_engine_requests_total", (("endpoint", "/health"), ("status", "200"))) not in samples(
        b.render().decode()
    )
