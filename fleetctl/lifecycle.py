"""`up`, `scale` and `down` as functions of a Fleet: converge to N replicas, or tear down.

Converging never touches a healthy replica: it restarts only replicas whose process is gone
(on backends that do not restart them themselves), starts the missing ones, removes the surplus
(not-ready ones first, then the newest), and waits for every replica not yet in NGINX.
"""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from fleetctl.config import FleetConfig
from fleetctl.errors import ConfigError, FleetError
from fleetctl.fleet import Fleet
from fleetctl.groups import DEFAULT_GROUP, ModelGroup
from fleetctl.state import FleetState, Phase, StateDir
from fleetctl.tls import ensure_tls

# Changing these needs new replicas: `fleetctl down` then `up` (or `fleetctl update` for the model).
REPLICA_FIELDS = ("backend", "model", "served_model_name", "api_keys", "device", "gpus", "max_model_len",
                  "num_kv_blocks", "image", "replica_command", "mounts", "env", "constraints", "docker_host", "groups")


def preflight(config: FleetConfig) -> None:
    """What a new fleet needs, checked before anything is saved or started: nginx, the model's
    weights, and for docker/swarm an engine that answers (a swarm manager for swarm)."""
    from fleetctl.backends import preflight as backend_preflight
    from fleetctl.models import resolve_model_path
    from fleetctl.nginx import Nginx

    Nginx(Path(".")).require_binary()
    for group in config.model_groups():
        resolve_model_path(group.model)
    backend_preflight(config)


def open_or_create(state_dir: StateDir, given: dict) -> FleetState:
    """The saved fleet with the options given on this command line applied, or a new one.
    `given` holds the config fields the operator set explicitly; the rest keep their saved
    values (or the defaults, for a new fleet)."""
    state_dir.ensure()
    with state_dir.locked():
        if not state_dir.has_fleet():
            state = FleetState(FleetConfig(**given))
        else:
            state = state_dir.load()
            saved = state.config.to_dict()
            for name, value in sorted(given.items()):
                if name in REPLICA_FIELDS and _replica_shape(name, value) != _replica_shape(name, saved[name]):
                    raise ConfigError(f"the fleet runs with {name}={saved[name]!r}; changing it needs new replicas: "
                                      f"run `fleetctl down` first (or `fleetctl update` for the model)")
            state.config = FleetConfig.from_dict({**saved, **given})
        state_dir.save(state)
    return state


def _replica_shape(name: str, value):
    """What of a REPLICA_FIELDS value its replicas are made of: for groups, everything but the
    replica count, which `up` converges to like --replicas (as `scale --group` does)."""
    if name != "groups":
        return value
    groups = [g if isinstance(g, ModelGroup) else ModelGroup.from_dict(g) for g in value]
    return [{k: v for k, v in g.to_dict().items() if k != "num_replicas"} for g in groups]


def up(fleet: Fleet, progress: Callable[[int, int], None]) -> FleetState:
    state = fleet.state_dir.load()
    config = state.config
    ensure_tls(fleet.state_dir.tls_dir, config.tls_names, config.tls_cert, config.tls_key)
    fleet.sync_nginx()  # NGINX up first (with whatever is ready), so the endpoint exists at once
    return converge(fleet, None, progress)


def converge(fleet: Fleet, num_replicas: int | None, progress: Callable[[int, int], None],
             group: str | None = None) -> FleetState:
    """Brings every model group to its number of ready replicas in NGINX, after setting that
    number to num_replicas (for `group`, or for a fleet of one group; None: keep the saved
    numbers). progress(num_ready, num_wanted) counts all groups together."""
    with fleet.state_dir.transaction() as state:
        if num_replicas is not None:
            if state.config.groups:
                if group is None:
                    names = ", ".join(g.name for g in state.config.groups)
                    raise ConfigError(f"this fleet has model groups ({names}); name one: --group NAME")
                state.config.group(group).num_replicas = num_replicas
            else:
                state.config.group(group or DEFAULT_GROUP)  # ConfigError for a group that is not there
                state.config.num_replicas = num_replicas
    seen = fleet.refresh()
    state = fleet.state_dir.load()

    # Replicas in NGINX that stopped answering: out, and restarted if their process is gone.
    probes = fleet.probe_active(state)
    for rec in state.active():
        if fleet.backend.needs_restart(seen.get(rec.id)):
            fleet.restart_replica(rec.id, "its process is gone")
        elif rec.phase is Phase.SERVING and not probes[rec.id].is_ready:
            fleet.take_out(rec.id, Phase.STARTING, probes[rec.id].reason or "not ready")

    wanted = {g.name: g.num_replicas for g in state.config.model_groups()}
    for name, num in wanted.items():
        fleet.remove_surplus(num, f"scale to {num}" if len(wanted) == 1 else f"scale {name} to {num}", name)
        fleet.start_missing(num, name)

    state = fleet.state_dir.load()
    num_wanted = sum(wanted.values())
    waiting = [r.id for r in state.active() if r.phase is not Phase.SERVING]
    num_ready = len(state.active()) - len(waiting)
    progress(num_ready, num_wanted)

    def on_ready(replica_id: str) -> None:
        nonlocal num_ready
        num_ready += 1
        progress(num_ready, num_wanted)

    fleet.wait_ready(waiting, state.config.ready_timeout_s, on_ready)
    return fleet.sync_nginx()


def down(fleet: Fleet, purge: bool = False) -> list[str]:
    """NGINX stops taking requests (finishing those in flight), then every replica drains and
    stops, then the backend's own objects go. All under the state lock, so a running watcher
    cannot restart anything meanwhile (it finds no fleet afterwards and stops). The CA is kept,
    so clients keep trusting it, unless purge."""
    state_dir = fleet.state_dir
    stopped: list[str] = []
    with state_dir.locked():
        if state_dir.has_fleet():
            state = state_dir.load()
            if fleet.nginx().stop(timeout_s=state.config.drain_timeout_s):
                fleet.event("nginx", "stopped", "fleetctl down")
            stopped = list(state.replicas) + [rid for rid in fleet.backend.list() if rid not in state.replicas]
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda rid: fleet.backend.stop(rid, state.config.drain_timeout_s), stopped))
            for rid in stopped:
                fleet.event(rid, "stopped", "fleetctl down")
            fleet.backend.teardown()
            fleet.backend.close()
            state_dir.remove_fleet()
        elif fleet.nginx().stop(timeout_s=5):
            fleet.event("nginx", "stopped", "fleetctl down (no fleet)")
    if purge and state_dir.root.exists():
        shutil.rmtree(state_dir.root)
    return stopped


def fail_up(fleet: Fleet, is_new_fleet: bool, exc: BaseException) -> FleetError:
    """What a failed `up` leaves: a new fleet is torn down (NGINX, replicas, backend objects:
    nothing keeps running, the logs stay); an existing one stays as far as it got, and the
    error names the one command that stops it. Returns the error to raise (same exit code)."""
    reason = str(exc) or type(exc).__name__
    code = getattr(exc, "exit_code", FleetError.exit_code)
    if is_new_fleet:
        try:
            down(fleet)
            error = FleetError(f"{reason}; fleetctl stopped everything this `up` had started "
                               f"(the replicas' logs stay in {fleet.state_dir.root})")
        except Exception as cleanup_exc:
            error = FleetError(f"{reason}; stopping what was started failed too ({cleanup_exc}): "
                               "run `fleetctl down`")
    else:
        error = FleetError(f"{reason}; the fleet stays as far as it got (`fleetctl status`); "
                           "`fleetctl down` stops all of it")
    error.exit_code = code
    return error
