"""Every PromQL expression of the dashboards, executed by a real Prometheus (Debian's binary)
that scrapes a real target, returns success; the core panels return data.

Two targets:
- `contract_exporter`: every metric of ARCHITECTURE.md's list, with its type and labels, served
  by prometheus_client. It checks the dashboards against the contract alone, in about 5 s.
- `tiny_replica`: a real `replica serve` on a tiny model with a few requests sent through it
  (skipped until replica/server/app.py exists). It also checks that the replica exposes every
  metric the dashboards read.
"""
import asyncio
import math
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from fleetctl.loadgen import BenchConfig, make_requests, run_benchmark
from fleetctl.observability import render_prometheus_config
from tests.ops.conftest import free_port, http_get_json, wait_until
from tests.ops.promql import (architecture_contract, dashboard_queries, expand_grafana_variables,
                              load_dashboards, metric_names)

SCRAPE_INTERVAL_S = 1
RATE_WINDOW = "30s"
# Panel title → the fleet dashboard's query that must return a sample after some load.
CORE_PANELS = ("Requests/s", "Output tokens/s", "Running requests", "KV-cache use by replica", "TTFT p99")


def query(prometheus_url: str, expr: str) -> dict:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": f"{time.time():.3f}"})
    try:
        return http_get_json(url)
    except urllib.error.HTTPError as exc:   # a 400 carries Prometheus' parse error
        return {"status": "error", "error": exc.read().decode()}


def all_queries() -> list[tuple[str, str]]:
    return [(where, expand_grafana_variables(expr, RATE_WINDOW))
            for dashboard in load_dashboards() for where, expr in dashboard_queries(dashboard)]


def core_queries() -> dict[str, str]:
    fleet = next(d for d in load_dashboards() if d["uid"] == "pagefleet-fleet")
    by_title = {p["title"]: p["targets"][0]["expr"] for p in fleet["panels"] if p.get("targets")}
    return {title: expand_grafana_variables(by_title[title], RATE_WINDOW) for title in CORE_PANELS}


def assert_dashboards_work(prometheus_url: str) -> dict[str, list]:
    """Run every query; return the core panels' result vectors once each has data (or fail)."""
    failures = [(where, r.get("error")) for where, expr in all_queries()
                if (r := query(prometheus_url, expr))["status"] != "success"]
    assert not failures, f"queries Prometheus refused: {failures}"

    def core_results():
        results = {title: query(prometheus_url, expr)["data"]["result"] for title, expr in core_queries().items()}
        return results if all(results.values()) else None

    return wait_until(core_results, 20, f"data in the core panels {CORE_PANELS}", interval_s=0.5)


@pytest.fixture
def contract_exporter():
    """A /metrics endpoint with every contract metric, moving like a replica under load."""
    registry = CollectorRegistry()
    metrics = {}
    for name, spec in architecture_contract().items():
        kind = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}[spec["type"]]
        metrics[name] = kind(name, name, spec["labels"], registry=registry)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)

    def tick(step: int) -> None:
        model = {"model_name": "tiny"}
        metrics["pagefleet_num_requests_running"].labels(**model).set(3)
        metrics["pagefleet_num_requests_waiting"].labels(**model).set(1)
        metrics["pagefleet_kv_cache_usage_perc"].labels(**model).set(0.25)
        for name in ("pagefleet_prompt_tokens_total", "pagefleet_generation_tokens_total",
                     "pagefleet_prefix_cache_queries_total", "pagefleet_prefix_cache_hits_total",
                     "pagefleet_num_preemptions_total"):
            metrics[name].labels(**model).inc(10 + step)
        metrics["pagefleet_request_success_total"].labels(finished_reason="length", **model).inc()
        metrics["pagefleet_http_requests_total"].labels(route="/v1/completions", status="200", **model).inc()
        metrics["pagefleet_http_requests_total"].labels(route="/v1/completions", status="503", **model).inc()
        for name in ("pagefleet_time_to_first_token_seconds", "pagefleet_inter_token_latency_seconds",
                     "pagefleet_e2e_request_latency_seconds", "pagefleet_request_queue_time_seconds"):
            metrics[name].labels(**model).observe(0.05 * (1 + step % 3))

    yield f"127.0.0.1:{port}", tick
    server.shutdown()


def test_every_dashboard_query_runs_against_the_metric_contract(start_prometheus, contract_exporter):
    target, tick = contract_exporter
    prometheus = start_prometheus(render_prometheus_config([target], scrape_interval_s=SCRAPE_INTERVAL_S))
    wait_until(lambda: query(prometheus, 'up{job="pagefleet-replicas"}')["data"]["result"], 15, "a first scrape")
    step = 0

    def moving_core_results():
        nonlocal step
        tick(step)
        step += 1
        results = {title: query(prometheus, expr)["data"]["result"] for title, expr in core_queries().items()}
        return results if all(r and float(r[0]["value"][1]) > 0 for r in results.values()) else None

    results = wait_until(moving_core_results, 20, "non-zero core panels", interval_s=0.5)
    assert_dashboards_work(prometheus)
    # The largest observation, 0.15 s, lies in the default bucket (0.1, 0.25]; p99 interpolates inside it.
    assert 0.1 < float(results["TTFT p99"][0]["value"][1]) <= 0.25
    assert float(results["KV-cache use by replica"][0]["value"][1]) == 0.25
    assert results["KV-cache use by replica"][0]["metric"]["instance"] == target


def test_every_dashboard_query_runs_against_a_real_replica(start_prometheus, tiny_replica):
    base_url = tiny_replica["base_url"]
    target = base_url.removeprefix("http://")
    prometheus = start_prometheus(render_prometheus_config([target], scrape_interval_s=SCRAPE_INTERVAL_S))
    wait_until(lambda: query(prometheus, 'up{job="pagefleet-replicas"}')["data"]["result"], 15, "a first scrape")
    up = query(prometheus, 'up{job="pagefleet-replicas"}')["data"]["result"]
    assert up[0]["value"][1] == "1", "Prometheus cannot scrape the replica's /metrics"

    # Traffic is all this test needs; exact lengths (ignore_eos) are test_loadgen's concern.
    config = BenchConfig(base_url, tiny_replica["model"], concurrency=2, ignore_eos=False)
    requests = make_requests(5, (8, 16), (4, 8), vocab_size=tiny_replica["vocab_size"])
    # A labelled counter (finish reason, HTTP status) is born at its first increment, and rate()
    # cannot see the step into a series' first sample: let Prometheus scrape the series once
    # before the load that the panels must show.
    run = asyncio.run(run_benchmark(config, requests[:1]))
    wait_until(lambda: query(prometheus, "pagefleet_request_success_total")["data"]["result"], 15,
               "the first scrape of pagefleet_request_success_total")
    run.results += asyncio.run(run_benchmark(config, requests[1:])).results
    assert all(r.is_ok for r in run.results), [(r.status, r.error) for r in run.results]

    # Labelled series appear once they have a value: look at the exposition after the traffic.
    exposition = urllib.request.urlopen(f"{base_url}/metrics", timeout=5).read().decode()
    exposed = {s.name for f in text_string_to_metric_families(exposition) for s in f.samples}
    dashboard_metrics = {n for _, e in all_queries() for n in metric_names(e)} - {"up"}
    assert not dashboard_metrics - exposed, \
        f"the dashboards read metrics the replica does not expose: {sorted(dashboard_metrics - exposed)}"

    results = assert_dashboards_work(prometheus)
    assert float(results["Requests/s"][0]["value"][1]) > 0
    assert float(results["Output tokens/s"][0]["value"][1]) > 0
    assert math.isfinite(float(results["TTFT p99"][0]["value"][1]))
