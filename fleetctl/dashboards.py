"""Grafana dashboards for a pagefleet fleet, generated from code.

Two dashboards, both over the metric names of ARCHITECTURE.md (the contract with
`replica/server/metrics.py`) and Prometheus' own `up`:

- `pagefleet-fleet` (fleet overview): fleet totals, plus a per-replica breakdown where one
  replica misbehaving is what an operator looks for (requests/s, KV use, replica state), and a
  row per model group (repeated over `$model_name`) for fleets that serve several models.
- `pagefleet-replica` (per replica): the same panels split by `instance`, filtered by an
  `$instance` variable.

Every query filters on `model_name=~"$model_name"`; rates use Grafana's `$__rate_interval`.
Replica/upstream state comes from `up{job="pagefleet-replicas"}` (NGINX's stub_status would
need an exporter the fleet does not ship; Prometheus' scrape result per target is the same
signal: a replica that does not answer is DOWN).

The JSON under `grafana/dashboards/` is this module's output, committed so that Grafana's
file provisioning reads it as is. Regenerate after a change, and check in CI:

    python -m fleetctl.dashboards            # rewrite grafana/dashboards/*.json
    python -m fleetctl.dashboards --check    # exit 1 if the committed JSON is stale
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

DATASOURCE_UID = "pagefleet-prometheus"   # grafana/provisioning/datasources/prometheus.yaml
REPLICA_JOB = "pagefleet-replicas"        # fleetctl.observability's scrape job name
DASHBOARDS_DIR = Path(__file__).resolve().parent.parent / "grafana" / "dashboards"

_DS = {"type": "prometheus", "uid": DATASOURCE_UID}
_RATE = "[$__rate_interval]"
# Prometheus' scrapes and the health checks are HTTP requests too; the traffic panels leave them out.
_API = 'route!~"/metrics|/health|/ready"'
_NON_2XX = f'{_API}, status!~"2.."'
_PANEL_WIDTH = 24                         # Grafana's grid is 24 columns wide


class _Scope:
    """What one dashboard aggregates over: the whole fleet, or each selected replica."""

    def __init__(self, per_replica: bool):
        self.per_replica = per_replica
        self.selector = 'model_name=~"$model_name"' + (', instance=~"$instance"' if per_replica else "")
        self.up_selector = f'job="{REPLICA_JOB}"' + (', instance=~"$instance"' if per_replica else "")
        self.by = "instance" if per_replica else ""
        self.legend = "{{instance}}" if per_replica else ""

    def sum(self, inner: str, extra_by: str = "") -> str:
        labels = ", ".join(label for label in (self.by, extra_by) if label)
        return f"sum by ({labels}) ({inner})" if labels else f"sum({inner})"

    def rate(self, metric: str, extra_matchers: str = "") -> str:
        matchers = self.selector + (f", {extra_matchers}" if extra_matchers else "")
        return f"rate({metric}{{{matchers}}}{_RATE})"

    def quantile(self, q: float, histogram: str, split: bool = True) -> str:
        by = ", ".join(label for label in ("le", self.by if split else "") if label)
        return f"histogram_quantile({q}, sum by ({by}) ({self.rate(histogram + '_bucket')}))"

    def label(self, text: str) -> str:
        return f"{text} {self.legend}".strip()


def _target(expr: str, legend: str = "", ref: int = 0) -> dict:
    return {"datasource": _DS, "expr": expr, "legendFormat": legend or "__auto",
            "range": True, "refId": chr(ord("A") + ref)}


def _panel(kind: str, title: str, targets: list[tuple[str, str]], *, unit: str = "short",
           description: str = "", width: int = 12, height: int = 8, **extra) -> dict:
    defaults = {"unit": unit, "min": 0}
    if unit == "percentunit":
        defaults["max"] = 1
    panel = {
        "type": kind, "title": title, "description": description, "datasource": _DS,
        "gridPos": {"w": width, "h": height},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [_target(expr, legend, i) for i, (expr, legend) in enumerate(targets)],
    }
    panel.update(extra)
    return panel


def _timeseries(title, targets, **kw) -> dict:
    options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
               "tooltip": {"mode": "multi", "sort": "desc"}}
    return _panel("timeseries", title, targets, options=options, **kw)


def _stat(title, expr, **kw) -> dict:
    options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
               "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    return _panel("stat", title, [(expr, "")], width=4, height=4, options=options, **kw)


def _row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"w": _PANEL_WIDTH, "h": 1}}


def _replica_state(scope: _Scope) -> dict:
    """One lane per scraped replica: UP (green) or DOWN (red), from Prometheus' scrape result."""
    panel = _panel("state-timeline", "Replica / upstream state (Prometheus scrape)",
                   [(f"up{{{scope.up_selector}}}", "{{instance}}")], width=24, height=6,
                   description="1 when Prometheus' last scrape of the replica's /metrics succeeded. "
                               "NGINX sends traffic to the same addresses.",
                   options={"showValue": "auto", "mergeValues": True, "rowHeight": 0.8})
    panel["fieldConfig"]["defaults"]["mappings"] = [{"type": "value", "options": {
        "0": {"text": "DOWN", "color": "red", "index": 0},
        "1": {"text": "UP", "color": "green", "index": 1}}}]
    panel["fieldConfig"]["defaults"]["color"] = {"mode": "thresholds"}
    panel["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": [
        {"color": "red", "value": None}, {"color": "green", "value": 1}]}
    return panel


def _headline_stats(s: _Scope) -> list[dict]:
    return [
        _stat("Replicas up", f"sum(up{{{s.up_selector}}})",
              description="Replicas whose /metrics answered Prometheus' last scrape."),
        _stat("Requests/s", f"sum({s.rate('pagefleet_request_success_total')})", unit="reqps"),
        _stat("Output tokens/s", f"sum({s.rate('pagefleet_generation_tokens_total')})"),
        _stat("TTFT p99", s.quantile(0.99, "pagefleet_time_to_first_token_seconds", split=False), unit="s"),
        _stat("Running requests", f"sum(pagefleet_num_requests_running{{{s.selector}}})"),
        _stat("Non-2xx responses/s",
              f"sum({s.rate('pagefleet_http_requests_total', _NON_2XX)}) or vector(0)",
              unit="reqps"),
    ]


def _panels(s: _Scope) -> list[dict]:
    def quantiles(histogram: str) -> list[tuple[str, str]]:
        return [(s.quantile(q, histogram), s.label(f"p{int(q * 100)}")) for q in (0.5, 0.99)]

    fleet_only = [] if s.per_replica else [
        _timeseries("Requests/s by replica",
                    [(f"sum by (instance) ({s.rate('pagefleet_request_success_total')})", "{{instance}}")],
                    unit="reqps"),
        _timeseries("KV-cache use by replica",
                    [(f"max by (instance) (pagefleet_kv_cache_usage_perc{{{s.selector}}})", "{{instance}}")],
                    unit="percentunit"),
    ]
    return [
        _row("Fleet" if not s.per_replica else "Replica"), *_headline_stats(s),
        _replica_state(s), *fleet_only,
        _row("Traffic"),
        _timeseries("Finished requests/s by finish reason",
                    [(s.sum(s.rate("pagefleet_request_success_total"), "finished_reason"),
                      s.label("{{finished_reason}}"))], unit="reqps"),
        _timeseries("HTTP responses/s by status (API routes)",
                    [(s.sum(s.rate("pagefleet_http_requests_total", _API), "status"), s.label("{{status}}"))],
                    unit="reqps"),
        _timeseries("Errors/s by route and status (non-2xx)",
                    [(s.sum(s.rate("pagefleet_http_requests_total", _NON_2XX), "route, status"),
                      s.label("{{route}} {{status}}"))], unit="reqps", width=24),
        _row("Latency"),
        _timeseries("Time to first token p50 / p99",
                    quantiles("pagefleet_time_to_first_token_seconds"), unit="s"),
        _timeseries("Inter-token latency p50 / p99",
                    quantiles("pagefleet_inter_token_latency_seconds"), unit="s"),
        _timeseries("End-to-end request latency p50 / p99",
                    quantiles("pagefleet_e2e_request_latency_seconds"), unit="s"),
        _timeseries("Queue time p50 / p99", quantiles("pagefleet_request_queue_time_seconds"), unit="s"),
        _row("Tokens"),
        _timeseries("Prompt and generation tokens/s", [
            (s.sum(s.rate("pagefleet_prompt_tokens_total")), s.label("prompt")),
            (s.sum(s.rate("pagefleet_generation_tokens_total")), s.label("generation"))]),
        _timeseries("Prefix-cache hit rate (tokens)", [
            (f"{s.sum(s.rate('pagefleet_prefix_cache_hits_total'))} / "
             f"{s.sum(s.rate('pagefleet_prefix_cache_queries_total'))}", s.label("hit rate"))],
            unit="percentunit", description="Prompt tokens found in the prefix cache / prompt tokens looked up."),
        _row("Scheduler and KV cache"),
        _timeseries("Running and waiting requests", [
            (s.sum(f"pagefleet_num_requests_running{{{s.selector}}}"), s.label("running")),
            (s.sum(f"pagefleet_num_requests_waiting{{{s.selector}}}"), s.label("waiting"))]),
        _timeseries("KV-cache use", [
            (f"max by (instance) (pagefleet_kv_cache_usage_perc{{{s.selector}}})", "{{instance}}")]
            if s.per_replica else [
            (f"max(pagefleet_kv_cache_usage_perc{{{s.selector}}})", "max over replicas"),
            (f"avg(pagefleet_kv_cache_usage_perc{{{s.selector}}})", "mean over replicas")], unit="percentunit"),
        _timeseries("Preemptions/s", [(s.sum(s.rate("pagefleet_num_preemptions_total")), s.label("preemptions"))],
                    width=24, description="Sequences evicted from the KV cache to make room; "
                                          "sustained preemption means the KV pool is too small for the load."),
    ]


def _model_groups(s: _Scope) -> list[dict]:
    """A row per model group (Grafana repeats it for each value of $model_name): the group's
    traffic, latency, KV-cache use and prefix-cache hit rate side by side."""
    row = {**_row("Model group $model_name"), "repeat": "model_name"}
    return [
        row,
        _timeseries("Requests/s", [(f"sum({s.rate('pagefleet_request_success_total')})", "$model_name")],
                    unit="reqps", width=6),
        _timeseries("Time to first token p50 / p99",
                    [(s.quantile(q, "pagefleet_time_to_first_token_seconds", split=False), f"p{int(q * 100)}")
                     for q in (0.5, 0.99)], unit="s", width=6),
        _timeseries("KV-cache use", [(f"max(pagefleet_kv_cache_usage_perc{{{s.selector}}})", "max over replicas")],
                    unit="percentunit", width=6),
        _timeseries("Prefix-cache hit rate", [
            (f"sum({s.rate('pagefleet_prefix_cache_hits_total')}) / "
             f"sum({s.rate('pagefleet_prefix_cache_queries_total')})", "hit rate")], unit="percentunit", width=6),
    ]


def _layout(panels: list[dict]) -> list[dict]:
    """Give each panel an id and a grid position, filling rows left to right."""
    x = y = row_height = 0
    for panel_id, panel in enumerate(panels, start=1):
        pos = panel["gridPos"]
        if panel["type"] == "row" or x + pos["w"] > _PANEL_WIDTH:
            x, y, row_height = 0, y + row_height, 0
        pos["x"], pos["y"] = x, y
        panel["id"] = panel_id
        x, row_height = x + pos["w"], max(row_height, pos["h"])
        if panel["type"] == "row":
            x, y, row_height = 0, y + pos["h"], 0
    return panels


def _variable(name: str, label: str, query: str) -> dict:
    return {"type": "query", "name": name, "label": label, "datasource": _DS,
            "definition": query, "query": {"query": query, "refId": f"{name}-values"},
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def _dashboard(uid: str, title: str, per_replica: bool) -> dict:
    variables = [_variable("model_name", "Model", "label_values(pagefleet_num_requests_running, model_name)")]
    if per_replica:
        variables.append(_variable("instance", "Replica", f'label_values(up{{job="{REPLICA_JOB}"}}, instance)'))
    other = ("pagefleet-fleet", "Fleet overview") if per_replica else ("pagefleet-replica", "Per replica")
    return {
        "uid": uid, "title": title, "tags": ["pagefleet"], "editable": True, "graphTooltip": 1,
        "schemaVersion": 39, "version": 1, "refresh": "10s", "timezone": "browser",
        "time": {"from": "now-30m", "to": "now"},
        "links": [{"type": "link", "title": other[1], "url": f"/d/{other[0]}", "keepTime": True,
                   "includeVars": True}],
        "templating": {"list": variables},
        "panels": _layout(_panels(_Scope(per_replica)) + ([] if per_replica else _model_groups(_Scope(False)))),
    }


def fleet_overview() -> dict:
    return _dashboard("pagefleet-fleet", "pagefleet / Fleet overview", per_replica=False)


def per_replica() -> dict:
    return _dashboard("pagefleet-replica", "pagefleet / Per replica", per_replica=True)


DASHBOARDS: dict[str, Callable[[], dict]] = {
    "pagefleet-fleet.json": fleet_overview,
    "pagefleet-replica.json": per_replica,
}


def render_dashboards() -> dict[str, str]:
    """File name → JSON text of every dashboard (stable: sorted keys, trailing newline)."""
    return {name: json.dumps(build(), indent=2, sort_keys=True) + "\n" for name, build in DASHBOARDS.items()}


def expand_variables(expr: str, rate_interval: str = "1m") -> str:
    """A panel's PromQL as Grafana sends it with every variable on "All" (for tools and tests)."""
    expr = expr.replace("$__rate_interval", rate_interval)
    for name in ("model_name", "instance"):
        expr = expr.replace(f"${name}", ".*")
    return expr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetctl.dashboards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DASHBOARDS_DIR, help="folder for the JSON files")
    parser.add_argument("--check", action="store_true", help="exit 1 if the files there differ from the code")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render_dashboards().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale dashboards: {', '.join(stale)}; run: python -m fleetctl.dashboards", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
