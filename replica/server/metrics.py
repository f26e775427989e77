"""Prometheus metrics of one replica, with vLLM's meanings under the `pagefleet_` prefix.

Two sources feed them:
- the engine's own state and cumulative counters (`engine.stats()`), read at scrape time by a
  custom collector, so gauges are never stale and counters never drift from the engine;
- per-request observations made by the server as outputs arrive (latency histograms,
  successes by finish reason) and per-response HTTP counts.

Dashboards query only the names listed in `METRIC_NAMES` (a test checks them). The same values
are also exported under vLLM's own names (`VLLM_METRIC_NAMES`): the Gateway API Inference
Extension's model-server protocol, llm-d's endpoint picker and KEDA scalers read those.
"""
from prometheus_client import (CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from replica.outputs import RequestMetrics

METRIC_NAMES = (
    "pagefleet_num_requests_running", "pagefleet_num_requests_waiting",
    "pagefleet_kv_cache_usage_perc", "pagefleet_prefix_cache_queries_total",
    "pagefleet_prefix_cache_hits_total", "pagefleet_prompt_tokens_total",
    "pagefleet_generation_tokens_total", "pagefleet_request_success_total",
    "pagefleet_num_preemptions_total", "pagefleet_http_requests_total",
    "pagefleet_time_to_first_token_seconds", "pagefleet_inter_token_latency_seconds",
    "pagefleet_e2e_request_latency_seconds", "pagefleet_request_queue_time_seconds",
)

# vLLM's names for what the gateway protocol and llm-d read: name → pagefleet's name for the same value.
VLLM_METRIC_NAMES = {
    "vllm:num_requests_running": "pagefleet_num_requests_running",
    "vllm:num_requests_waiting": "pagefleet_num_requests_waiting",
    "vllm:kv_cache_usage_perc": "pagefleet_kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total": "pagefleet_prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total": "pagefleet_prefix_cache_hits_total",
    "vllm:prompt_tokens_total": "pagefleet_prompt_tokens_total",
    "vllm:generation_tokens_total": "pagefleet_generation_tokens_total",
    "vllm:num_preemptions_total": "pagefleet_num_preemptions_total",
    "vllm:request_success_total": "pagefleet_request_success_total",
    "vllm:time_to_first_token_seconds": "pagefleet_time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds": "pagefleet_inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds": "pagefleet_e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds": "pagefleet_request_queue_time_seconds",
}
_VLLM_NAME = {ours: theirs for theirs, ours in VLLM_METRIC_NAMES.items()}

# vLLM's bucket edges, so that dashboards built for vLLM read the same.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector:
    """Reads `engine.stats()` at scrape time; stats are cumulative in the engine."""

    def __init__(self, engine, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def describe(self):
        return []          # values come from the engine; nothing to pre-register

    def collect(self):
        stats = self._engine.stats()
        labels = ["model_name"]
        values = [self._model_name]

        def gauge(name, doc, value):
            for exported in (name, _VLLM_NAME[name]):
                family = GaugeMetricFamily(exported, doc, labels=labels)
                family.add_metric(values, value)
                yield family

        def counter(name, doc, value):
            for exported in (name, _VLLM_NAME[name]):
                family = CounterMetricFamily(exported.removesuffix("_total"), doc, labels=labels)
                family.add_metric(values, value)
                yield family

        yield from gauge("pagefleet_num_requests_running", "Requests in the running batch.",
                    stats.num_running)
        yield from gauge("pagefleet_num_requests_waiting", "Requests waiting to be scheduled.",
                    stats.num_waiting)
        yield from gauge("pagefleet_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
                    stats.kv_cache_usage)
        yield from counter("pagefleet_prefix_cache_queries_total",
                      "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries)
        yield from counter("pagefleet_prefix_cache_hits_total",
                      "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits)
        yield from counter("pagefleet_prompt_tokens_total", "Prefill tokens processed.",
                      stats.num_prompt_tokens)
        yield from counter("pagefleet_generation_tokens_total", "Generation tokens produced.",
                      stats.num_generation_tokens)
        yield from counter("pagefleet_num_preemptions_total", "Cumulative preemptions.",
                      stats.num_preemptions)


class _Both:
    """One observation into pagefleet's histogram and vLLM's of the same meaning."""

    def __init__(self, histograms) -> None:
        self._histograms = histograms

    def observe(self, value: float) -> None:
        for histogram in self._histograms:
            histogram.observe(value)


class ServerMetrics:
    """One registry per app, so that tests can build several apps in one process."""

    def __init__(self, engine, model_name: str) -> None:
        disable_created_metrics()      # the *_created series only double the scrape size
        self.registry = CollectorRegistry(auto_describe=False)
        self.model_name = model_name
        self.registry.register(_EngineCollector(engine, model_name))
        self.request_success = Counter(
            "pagefleet_request_success", "Finished requests by finish reason.",
            ["model_name", "finished_reason"], registry=self.registry)
        self.vllm_request_success = Counter(
            "vllm:request_success", "Finished requests by finish reason.",
            ["model_name", "finished_reason"], registry=self.registry)
        for reason in ("stop", "length", "abort"):      # exported at 0 before the first request
            self.request_success.labels(model_name, reason)
            self.vllm_request_success.labels(model_name, reason)
        self.http_requests = Counter(
            "pagefleet_http_requests", "HTTP responses by route and status.",
            ["model_name", "route", "status"], registry=self.registry)
        def histogram(name, doc, buckets):
            return _Both([Histogram(exported, doc, ["model_name"], buckets=buckets,
                                    registry=self.registry).labels(model_name)
                          for exported in (name, _VLLM_NAME[name])])

        self.ttft = histogram("pagefleet_time_to_first_token_seconds",
                              "Arrival to first output token.", _TTFT_BUCKETS)
        self.itl = histogram("pagefleet_inter_token_latency_seconds",
                             "Time between consecutive output tokens.", _ITL_BUCKETS)
        self.e2e = histogram("pagefleet_e2e_request_latency_seconds",
                             "Arrival to the last output.", _REQUEST_BUCKETS)
        self.queue_time = histogram("pagefleet_request_queue_time_seconds",
                                    "Arrival to first scheduled.", _TTFT_BUCKETS)

    def observe_tokens(self, prev_token_s: float | None, metrics: RequestMetrics,
                       num_new_tokens: int) -> None:
        """One engine step brought `num_new_tokens` for a sample: the first or the next ones."""
        if num_new_tokens <= 0 or metrics.last_token_s is None:
            return
        if prev_token_s is None:
            if metrics.first_token_s is not None:
                self.ttft.observe(max(0.0, metrics.first_token_s - metrics.arrival_s))
            return
        gap_s = max(0.0, metrics.last_token_s - prev_token_s) / num_new_tokens
        for _ in range(num_new_tokens):
            self.itl.observe(gap_s)

    def observe_finished(self, metrics: RequestMetrics, finish_reasons: list[str]) -> None:
        end_s = metrics.finished_s or metrics.last_token_s
        if end_s is not None:
            self.e2e.observe(max(0.0, end_s - metrics.arrival_s))
        if metrics.first_scheduled_s is not None:
            self.queue_time.observe(max(0.0, metrics.first_scheduled_s - metrics.arrival_s))
        for reason in finish_reasons:
            self.request_success.labels(self.model_name, reason).inc()
            self.vllm_request_success.labels(self.model_name, reason).inc()

    def count_http(self, route: str, status: int) -> None:
        self.http_requests.labels(self.model_name, route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
