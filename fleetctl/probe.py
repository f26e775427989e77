"""HTTP to one replica: /health, /ready, the gauges of /metrics, and a POST of JSON (the update's
test generation); plain HTTP, loopback or the swarm's nodes, never through NGINX."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

PROBE_TIMEOUT_S = 2.0


@dataclass
class Probe:
    is_healthy: bool  # GET /health answered 200
    is_ready: bool  # GET /ready answered 200
    reason: str  # why not, in a few words ("connection refused", "/ready 503")


@dataclass
class Load:
    num_running: float | None = None
    num_waiting: float | None = None
    kv_cache_usage: float | None = None  # 0..1

    @property
    def num_in_flight(self) -> float | None:
        if self.num_running is None:
            return None
        return self.num_running + (self.num_waiting or 0)


def get(url: str, api_key: str = "", timeout_s: float = PROBE_TIMEOUT_S) -> tuple[int, str]:
    """(status, body) of a GET; status 0 and the error's words when nothing answered."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return 0, str(getattr(reason, "strerror", None) or reason).lower()


def probe(base_url: str, api_key: str = "") -> Probe:
    status, body = get(f"{base_url}/health", api_key)
    if status != 200:
        return Probe(False, False, f"/health {status}" if status else body)
    status, body = get(f"{base_url}/ready", api_key)
    if status != 200:
        return Probe(True, False, f"/ready {status}" if status else body)
    return Probe(True, True, "")


def load(base_url: str, api_key: str = "") -> Load:
    """The replica's load gauges (summed over model_name labels); None where missing."""
    status, text = get(f"{base_url}/metrics", api_key)
    result = Load()
    if status != 200:
        return result
    from prometheus_client.parser import text_string_to_metric_families

    fields = {"pagefleet_num_requests_running": "num_running", "pagefleet_num_requests_waiting": "num_waiting",
              "pagefleet_kv_cache_usage_perc": "kv_cache_usage"}
    try:
        for family in text_string_to_metric_families(text):
            if family.name in fields:
                setattr(result, fields[family.name], sum(s.value for s in family.samples))
    except ValueError:
        pass
    return result


def post_json(url: str, body: dict, api_key: str, timeout_s: float) -> tuple[int, dict | str]:
    """(status, parsed JSON or text) of a POST; status 0 and the error's words when nothing answered."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, text = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(getattr(exc, "reason", exc))
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def error_text(answer: dict | str) -> str:
    """The words of an OpenAI-shaped error answer (or of whatever came back), on one line."""
    if isinstance(answer, dict):
        error = answer.get("error")
        text = error.get("message") if isinstance(error, dict) else error or "no tokens generated"
    else:
        text = answer or "no body"
    return " ".join(str(text).split())[:300]


class ReplicaHttp:
    """How the fleet talks to its replicas: these three calls and nothing else. `Fleet` holds one
    (this one speaks HTTP); the orchestration tests give it an in-memory stand-in instead."""

    def probe(self, base_url: str, api_key: str = "") -> Probe:
        return probe(base_url, api_key)

    def load(self, base_url: str, api_key: str = "") -> Load:
        return load(base_url, api_key)

    def post_json(self, url: str, body: dict, api_key: str, timeout_s: float) -> tuple[int, dict | str]:
        return post_json(url, body, api_key, timeout_s)
