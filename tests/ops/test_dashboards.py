"""The Grafana dashboards and their provisioning: generated from code, and querying only the
metric names of the contract (ARCHITECTURE.md, and replica/server/metrics.py once it exists)."""
import json

import pytest
import yaml

from fleetctl import dashboards
from fleetctl.observability import render_compose
from tests.ops.promql import (DASHBOARD_FILES, REPO, architecture_contract, dashboard_queries,
                              exported_metric_names, is_known_metric, load_dashboards, metric_names,
                              selectors, variable_queries)

DASHBOARDS = load_dashboards()
IDS = [d["uid"] for d in DASHBOARDS]


def all_metric_names(dashboard: dict) -> set[str]:
    names = {name for _, expr in dashboard_queries(dashboard) for name in metric_names(expr)}
    return names | {metric for _, metric, _ in variable_queries(dashboard)}


def test_committed_json_is_what_the_generator_writes():
    assert sorted(p.name for p in DASHBOARD_FILES) == sorted(dashboards.DASHBOARDS)
    for name, text in dashboards.render_dashboards().items():
        assert (REPO / "grafana" / "dashboards" / name).read_text() == text, \
            f"{name} is stale: run python -m fleetctl.dashboards"


def test_metric_name_extraction_skips_functions_keywords_and_labels():
    expr = ('histogram_quantile(0.99, sum by (le, instance) (rate(a_bucket{model_name=~"$m", x="y z"}[5m])))'
            ' / on (instance) group_left (route) b offset 1m > 1e-9 and c or vector(0)')
    assert metric_names(expr) == {"a_bucket", "b", "c"}


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=IDS)
def test_every_metric_is_in_the_architecture_contract(dashboard):
    contract = set(architecture_contract())
    assert len(contract) == 14   # the list in ARCHITECTURE.md; a change there should be seen here
    unknown = {name for name in all_metric_names(dashboard) if not is_known_metric(name, contract)}
    assert not unknown, f"not in ARCHITECTURE.md's metric names: {sorted(unknown)}"


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=IDS)
def test_every_metric_is_exported_by_replica_server_metrics(dashboard):
    exported = exported_metric_names()
    if exported is None:
        pytest.skip("replica/server/metrics.py with METRIC_NAMES does not exist yet (issue 4)")
    unknown = {name for name in all_metric_names(dashboard) if not is_known_metric(name, exported)}
    assert not unknown, f"not in replica.server.metrics.METRIC_NAMES: {sorted(unknown)}"


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=IDS)
def test_every_pagefleet_query_filters_on_the_model_name(dashboard):
    for where, expr in dashboard_queries(dashboard):
        for name, matchers in selectors(expr):
            assert 'model_name=~"$model_name"' in matchers, f"{where}: {name} without the model_name filter"
        if "up" in metric_names(expr):
            assert 'job="pagefleet-replicas"' in expr, f"{where}: up of a job other than the replicas"
    if dashboard["uid"] == "pagefleet-replica":
        for where, expr in dashboard_queries(dashboard):
            assert 'instance=~"$instance"' in expr, f"{where}: not filtered on the selected replicas"


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=IDS)
def test_the_panels_the_issue_asks_for_are_there(dashboard):
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for wanted in ("Requests/s", "Time to first token p50 / p99", "Inter-token latency p50 / p99",
                   "Prompt and generation tokens/s", "Running and waiting requests", "KV-cache use",
                   "Prefix-cache hit rate", "Preemptions/s", "by finish reason", "HTTP responses/s by status",
                   "Errors/s by route and status", "Replica / upstream state"):
        assert wanted in titles, f"{dashboard['uid']} lacks a {wanted!r} panel"
    quantiles = [e for _, e in dashboard_queries(dashboard) if e.startswith("histogram_quantile")]
    assert quantiles and all("_bucket{" in e and "sum by (le" in e for e in quantiles)


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=IDS)
def test_layout_ids_and_data_source(dashboard):
    panels = dashboard["panels"]
    assert [p["id"] for p in panels] == list(range(1, len(panels) + 1))
    cells = set()
    for p in panels:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, p["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"]["uid"] == dashboards.DATASOURCE_UID
            assert all(t["datasource"]["uid"] == dashboards.DATASOURCE_UID for t in p["targets"])


def test_provisioning_matches_the_dashboards_and_the_compose_mounts():
    provisioning = REPO / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert (datasource["uid"], datasource["type"]) == (dashboards.DATASOURCE_UID, "prometheus")
    provider = yaml.safe_load((provisioning / "dashboards" / "pagefleet.yaml").read_text())["providers"][0]
    grafana = yaml.safe_load(render_compose(1, "smollm2", "pagefleet/replica"))["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts[provider["options"]["path"]] == "../grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "../grafana/provisioning"
    assert grafana["environment"]["PAGEFLEET_PROMETHEUS_URL"] == "http://prometheus:9090"
    assert len({d["uid"] for d in DASHBOARDS}) == len(DASHBOARDS)
    for d in DASHBOARDS:
        assert json.loads(json.dumps(d))["schemaVersion"] >= 36   # Grafana 9+ panel types
