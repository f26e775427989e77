"""`fleetctl render WHAT`: print a generated file without starting anything.

RENDERERS maps a name to a function of (state_dir, replicas_hint) returning the file's text; a
new output (the Compose file, the Prometheus scrape config) is one more entry here.
"""
from __future__ import annotations

from typing import Callable

from fleetctl.config import FleetConfig
from fleetctl.fleet import Fleet
from fleetctl.state import FleetState, Phase, ReplicaRecord, StateDir


def preview_state(state_dir: StateDir, num_replicas: int) -> FleetState:
    """The saved fleet, or (no fleet yet) a default one with placeholder replica addresses."""
    if state_dir.has_fleet():
        return state_dir.load()
    state = FleetState(FleetConfig(num_replicas=num_replicas), fleet_id="preview")
    for index in range(1, num_replicas + 1):
        rid = f"r{index}"
        state.replicas[rid] = ReplicaRecord(rid, "127.0.0.1", 9100 + index, phase=Phase.SERVING)
    return state


def render_nginx(state_dir: StateDir, num_replicas: int) -> str:
    return Fleet(state_dir).render_nginx(preview_state(state_dir, num_replicas))


def render_prometheus(state_dir: StateDir, num_replicas: int) -> str:
    """Prometheus scrape config (fleetctl/observability.py). For a running fleet it reads the
    replicas from the file_sd file that fleetctl rewrites whenever the replica set changes, so
    Prometheus follows scale, update and the watcher without a reload; without a fleet, the
    placeholder replicas are written in."""
    from fleetctl.observability import render_prometheus_config

    if state_dir.has_fleet():
        return render_prometheus_config([], targets_file=str(state_dir.scrape_targets_file))
    state = preview_state(state_dir, num_replicas)
    return render_prometheus_config([r.address for r in state.active()])


def render_compose(state_dir: StateDir, num_replicas: int) -> str:
    """A Compose file for NGINX + the fleet's replicas + Prometheus + Grafana (observability.py)."""
    from fleetctl.observability import render_compose as compose

    config = preview_state(state_dir, num_replicas).config
    return compose(max(1, config.num_replicas), config.model, config.image,
                   served_model_name=config.served_model_name, gpus=config.gpus or None,
                   api_key_env="PAGEFLEET_API_KEY" if config.api_keys else None,
                   drain_timeout_s=int(config.drain_timeout_s))


RENDERERS: dict[str, Callable[[StateDir, int], str]] = {
    "nginx": render_nginx,
    "prometheus": render_prometheus,
    "compose": render_compose,
}
