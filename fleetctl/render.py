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


RENDERERS: dict[str, Callable[[StateDir, int], str]] = {
    "nginx": render_nginx,
}
