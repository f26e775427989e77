"""/metrics: every documented name is exported and values move as requests run."""
import httpx

from replica.server.metrics import METRIC_NAMES
from tests.server.conftest import TINY_NAME, engine_idle


def test_every_documented_metric_is_exported(tiny_server):
    text = httpx.get(tiny_server.url + "/metrics").text
    for name in METRIC_NAMES:
        assert f"\n{name}" in text or f"# TYPE {name.removesuffix('_total')} " in text, name
    assert f'model_name="{TINY_NAME}"' in text
    assert "_created" not in text                  # no per-series creation-time noise


def test_metrics_move_with_a_request(tiny_server, http):
    prompt_ids = [5, 6, 7, 8, 9, 10, 11]
    before = engine_idle(tiny_server.url)
    r = http.post("/v1/completions", json={"model": TINY_NAME, "prompt": prompt_ids,
                                           "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200
    http.post("/v1/completions", json={"model": TINY_NAME, "prompt": "x", "max_tokens": 0})
    after = engine_idle(tiny_server.url)

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta("pagefleet_prompt_tokens_total") == len(prompt_ids)
    assert delta("pagefleet_generation_tokens_total") == 5
    assert delta("pagefleet_prefix_cache_queries_total") >= len(prompt_ids)
    assert delta('pagefleet_request_success_total{finished_reason="length"}') == 1
    assert delta("pagefleet_time_to_first_token_seconds_count") == 1
    assert delta("pagefleet_inter_token_latency_seconds_count") == 4
    assert delta("pagefleet_e2e_request_latency_seconds_count") == 1
    assert delta("pagefleet_request_queue_time_seconds_count") == 1
    assert delta("pagefleet_e2e_request_latency_seconds_sum") > 0
    assert delta('pagefleet_http_requests_total{route="/v1/completions",status="200"}') == 1
    assert delta('pagefleet_http_requests_total{route="/v1/completions",status="400"}') == 1
    assert after["pagefleet_num_requests_running"] == 0
    assert after["pagefleet_kv_cache_usage_perc"] == 0


def test_prefix_cache_hits_are_counted(tiny_server, http):
    prompt_ids = list(range(100, 148))            # three full blocks of 16 tokens
    body = {"model": TINY_NAME, "prompt": prompt_ids, "max_tokens": 1}
    http.post("/v1/completions", json=body)
    before = engine_idle(tiny_server.url)
    http.post("/v1/completions", json=body)
    after = engine_idle(tiny_server.url)
    assert after["pagefleet_prefix_cache_hits_total"] - before["pagefleet_prefix_cache_hits_total"] >= 32


# The Gateway API Inference Extension's model-server protocol (docs/proposals/003-model-server-protocol)
# and llm-d's endpoint picker read these vLLM names: queue depth, running requests, KV-cache use;
# the latency histograms and the prefix-cache counters are vLLM's own, which KEDA scalers and
# vLLM dashboards read. name → Prometheus type; every one carries `model_name`.
GATEWAY_PROTOCOL_METRICS = {
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
}


def test_vllm_names_that_the_inference_gateway_reads_are_exported_and_move_with_pagefleets(tiny_server, http):
    from prometheus_client.parser import text_string_to_metric_families

    body = {"model": TINY_NAME, "prompt": list(range(200, 240)), "max_tokens": 3, "temperature": 0}
    assert http.post("/v1/completions", json=body).status_code == 200
    engine_idle(tiny_server.url)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(tiny_server.url + "/metrics").text)}
    for name, kind in GATEWAY_PROTOCOL_METRICS.items():
        assert name in families and families[name].type == kind, (name, families.get(name))
        assert all(s.labels.get("model_name") == TINY_NAME for s in families[name].samples), name
        ours = families[name.replace("vllm:", "pagefleet_")]
        assert [(s.name.replace("pagefleet_", "vllm:"), s.labels, s.value) for s in ours.samples] == \
            [(s.name, s.labels, s.value) for s in families[name].samples], name
    assert families["vllm:num_requests_waiting"].samples[0].value == 0
    assert families["vllm:prefix_cache_queries"].samples[0].value >= 40
