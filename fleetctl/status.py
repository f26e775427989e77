"""What `fleetctl status` shows: one row per replica (with the weights it serves), the rolling
update's progress, and the NGINX state. Read-only: it probes the replicas and NGINX but changes
nothing (the watcher and `up` act on what they find)."""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

from fleetctl.fleet import Fleet
from fleetctl.probe import get
from fleetctl.state import Phase


def collect(fleet: Fleet) -> dict:
    state = fleet.state_dir.load()
    config = state.config
    key = config.client_api_key
    seen = fleet.backend.list()
    records = state.sorted_replicas()

    def row(rec) -> dict:
        result, gauges = fleet.http.probe(rec.url, key), fleet.http.load(rec.url, key)
        replica = seen.get(rec.id)
        return {
            "id": rec.id,
            "group": rec.group,
            "backend": fleet.backend.name,
            "address": rec.address,
            "handle": rec.handle,
            "model": rec.served_model_name,
            "weights": rec.model,
            "gpu": rec.gpu,
            "phase": rec.phase.value,
            "in_nginx": rec.phase is Phase.SERVING,
            "is_alive": bool(replica and replica.is_alive),
            "is_ready": result.is_ready,
            "reason": result.reason or rec.reason,
            "num_requests_running": gauges.num_running,
            "num_requests_waiting": gauges.num_waiting,
            "kv_cache_usage": gauges.kv_cache_usage,
            "uptime_s": round(time.time() - rec.started_at_s, 1),
            "num_restarts": rec.num_restarts,
        }

    with ThreadPoolExecutor(max_workers=8) as pool:
        rows = list(pool.map(row, records))
    groups = config.model_groups()
    order = {g.name: index for index, g in enumerate(groups)}
    rows.sort(key=lambda r: order.get(r["group"], len(order)))  # grouped, in the fleet's group order (stable)
    nginx = fleet.nginx()
    pid = nginx.pid()
    num_ready = sum(1 for r in rows if r["is_ready"] and r["in_nginx"])
    num_wanted = sum(g.num_replicas for g in groups)
    return {
        "fleet_id": state.fleet_id,
        "backend": config.backend,
        "model": ", ".join(g.served_model_name for g in groups),
        "weights": config.model,  # what new replicas start with; each row says what it serves
        "groups": [{"name": g.name, "model": g.served_model_name, "weights": g.model,
                    "num_replicas_wanted": g.num_replicas,
                    "num_replicas_ready": sum(1 for r in rows if r["group"] == g.name and r["is_ready"]
                                              and r["in_nginx"])} for g in groups],
        "num_replicas_wanted": num_wanted,
        "num_replicas_ready": num_ready,
        "is_degraded": num_ready < num_wanted or not pid,
        "url": config.public_url,
        "replicas": rows,
        "update": state.describe_update(),  # the last rolling update: target, done/total, phase, step
        "nginx": {
            "is_running": bool(pid),
            "pid": pid,
            "config": str(nginx.conf),
            "internal_url": f"http://127.0.0.1:{config.internal_port}",
            "num_upstreams": len(state.serving()),
            **(_stub_status(config.internal_port) if pid else {}),
        },
        "state_dir": str(fleet.state_dir.root),
    }


def _stub_status(internal_port: int) -> dict:
    """NGINX's stub_status, e.g. {"num_active_connections": 3, "num_requests": 120}."""
    status, text = get(f"http://127.0.0.1:{internal_port}/stub_status", timeout_s=1.0)
    if status != 200:
        return {}
    active = re.search(r"Active connections:\s*(\d+)", text)
    totals = re.search(r"\n\s*(\d+)\s+(\d+)\s+(\d+)", text)
    return {"num_active_connections": int(active.group(1)) if active else None,
            "num_requests": int(totals.group(3)) if totals else None}

