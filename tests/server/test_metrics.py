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
