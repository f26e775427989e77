"""Test helpers: the metric-name contract, and the PromQL inside the Grafana dashboards.

The contract is read from ARCHITECTURE.md's "Metric names" section (the document the metrics
module is written against), so that the dashboards' test follows the document rather than a copy.
`exported_metric_names()` reads `METRIC_NAMES` from replica/server/metrics.py once it exists.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_FILES = sorted((REPO / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_BUILTINS = frozenset({"up"})          # recorded by Prometheus itself for every target
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
             "offset", "bool", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*(\{[^}]*\})?\s*,?")


def architecture_contract() -> dict[str, dict]:
    """Metric name → {"type": gauge|counter|histogram, "labels": [...]} from ARCHITECTURE.md."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    section = text.split("## Metric names", 1)[1].split("\n## ", 1)[0]
    contract = {}
    for kind, body in re.findall(r"(Gauges|Counters|Histograms):(.*?)(?=(?:Gauges|Counters|Histograms):|$)",
                                 section, flags=re.S):
        for name, labels in re.findall(r"`(pagefleet_\w+)(?:\{([^}]*)\})?`", body):
            contract[name] = {"type": kind.lower().rstrip("s"),
                              "labels": ["model_name", *(l.strip() for l in labels.split(",") if l.strip())]}
    return contract


def exported_metric_names() -> frozenset[str] | None:
    """`replica.server.metrics.METRIC_NAMES`, or None while that module does not exist yet."""
    try:
        from replica.server.metrics import METRIC_NAMES
    except ImportError:
        return None
    return frozenset(METRIC_NAMES)


def is_known_metric(name: str, contract_names: frozenset[str] | set[str]) -> bool:
    """A name in the contract, or a histogram's series (`_bucket`/`_sum`/`_count`), or `up`.

    A counter may be listed with or without `_total` (prometheus_client adds it on exposition).
    """
    if name in PROMETHEUS_BUILTINS or name in contract_names:
        return True
    if name.endswith("_total") and name.removesuffix("_total") in contract_names:
        return True
    return any(name.endswith(s) and name.removesuffix(s) in contract_names for s in HISTOGRAM_SUFFIXES)


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (functions, keywords and labels excluded)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)          # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)         # range selectors and subqueries
    text = _GROUPING.sub(" ", text)                 # by (...), on (...), ...
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group(0)
        if name.lower() in _KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def selectors(expr: str, prefix: str = "pagefleet_") -> list[tuple[str, str]]:
    """(metric name, its label matchers) of every selector of a metric starting with `prefix`."""
    return [(m.group(1), m.group(2) or "") for m in re.finditer(rf"\b({prefix}\w*)\s*(\{{[^}}]*\}})?", expr)]


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target of a dashboard (rows' nested panels included)."""
    queries = []

    def walk(panels):
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    queries.append((f"{dashboard['uid']}/{panel['title']}/{target['refId']}", target["expr"]))

    walk(dashboard.get("panels", []))
    return queries


def variable_queries(dashboard: dict) -> list[tuple[str, str, str]]:
    """(variable name, metric, label matchers) of every `label_values(metric{...}, label)` variable."""
    found = []
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else (query or "")
        match = _LABEL_VALUES.search(query)
        if match and match.group(1):
            found.append((variable["name"], match.group(1), match.group(2) or ""))
    return found


def load_dashboards() -> list[dict]:
    return [json.loads(path.read_text()) for path in DASHBOARD_FILES]


def expand_grafana_variables(expr: str, rate_interval: str = "30s") -> str:
    """What Grafana sends for "All" selections: every multi-value variable becomes `.*`."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("${__rate_interval}", rate_interval)
    return re.sub(r"\$\{?(model_name|instance)\}?", ".*", expr)
