"""`fleetctl render WHAT`: print a generated file without starting anything, or (`render compose
--out DIR`) write the whole Compose bundle.

RENDERERS maps a name to a function of (state_dir, replicas_hint) returning the file's text; a
new output (the Compose file, the Prometheus scrape config) is one more entry here.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Callable

from fleetctl import nginx as nginx_mod
from fleetctl.config import FleetConfig
from fleetctl.fleet import Fleet
from fleetctl.state import FleetState, Phase, ReplicaRecord, StateDir

# Inside the Compose stack's NGINX container (the official nginx image).
COMPOSE_TLS_DIR = Path("/etc/pagefleet/tls")
COMPOSE_NGINX_PREFIX = "/var/cache/pagefleet"
COMPOSE_NJS_MODULE = "modules/ngx_http_js_module.so"  # the nginx image ships njs under /etc/nginx
COMPOSE_NJS_SCRIPT = "/etc/pagefleet/pagefleet.js"


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


def _compose_args(config: FleetConfig) -> dict:
    from fleetctl.observability import ComposeGroup

    groups = [ComposeGroup(g.name, g.model, g.served_model_name, max(1, g.num_replicas), tuple(g.engine_args()))
              for g in config.groups] or None
    return {"served_model_name": config.served_model_name, "gpus": config.gpus or None,
            "api_key_env": "PAGEFLEET_API_KEY" if config.api_keys else None,
            "drain_timeout_s": int(config.drain_timeout_s), "groups": groups}


def render_compose(state_dir: StateDir, num_replicas: int) -> str:
    """A Compose file for NGINX + the fleet's replicas + Prometheus + Grafana (observability.py)."""
    from fleetctl.observability import render_compose as compose

    config = preview_state(state_dir, num_replicas).config
    return compose(max(1, config.num_replicas), config.model, config.image, **_compose_args(config))


def compose_nginx_conf(config: FleetConfig, num_replicas: int) -> str:
    """The fleet's NGINX config as the Compose stack's NGINX container runs it: the replicas are
    the services replica-0.. (replica-<group>-0.. for model groups) on the Compose network, the
    listeners 443 and 80 on every address of the container, TLS from the bundle's tls/ (mounted
    at COMPOSE_TLS_DIR)."""
    from fleetctl.observability import compose_replica_targets
    from fleetctl.tls import planned_paths

    compose_groups = _compose_args(config)["groups"]
    config = dataclasses.replace(config, listen="0.0.0.0", https_port=443, http_port=80)
    groups, number = [], 0
    for index, group in enumerate(compose_groups or [None], start=1):
        targets = group.targets() if group else compose_replica_targets(num_replicas)
        upstreams = tuple(nginx_mod.Upstream(f"r{number + i + 1}", t) for i, t in enumerate(targets))
        number += len(targets)
        groups.append(nginx_mod.ModelGroup(index, group.served_model_name if group else config.served_model_name,
                                           upstreams))
    context = nginx_mod.site_context(config, "compose", [], planned_paths(COMPOSE_TLS_DIR),
                                     Path(COMPOSE_NGINX_PREFIX), groups=groups, njs_module=COMPOSE_NJS_MODULE,
                                     njs_script=COMPOSE_NJS_SCRIPT)
    context["worker_user"] = "nginx nginx"  # the image's unprivileged user; its master runs as root
    return nginx_mod.render(context)


def write_compose_bundle(state_dir: StateDir, num_replicas: int, out: Path) -> list[Path]:
    """Writes everything `docker compose up` in `out` needs: docker-compose.yml, nginx.conf,
    pagefleet.js (NGINX's router for prefix routing and model groups),
    tls/ (server certificate and key for the fleet's --tls-name, or the operator's own pair,
    and ca.pem for clients), prometheus.yml, grafana/ (provisioning and dashboards); the local
    CA's key stays in ca/. Returns the paths written."""
    from fleetctl.dashboards import render_dashboards
    from fleetctl.observability import render_compose_bundle, render_grafana_provisioning
    from fleetctl.tls import ensure_tls

    config = preview_state(state_dir, num_replicas).config
    num = max(1, config.num_replicas)
    files = render_compose_bundle(num, config.model, config.image, grafana_dir="./grafana", **_compose_args(config))
    files["nginx.conf"] = compose_nginx_conf(config, num)
    files["pagefleet.js"] = (Path(nginx_mod.DEFAULT_TEMPLATE).parent / "pagefleet.js").read_text()
    files.update({f"grafana/dashboards/{name}": text for name, text in render_dashboards().items()})
    files.update({f"grafana/{name}": text for name, text in render_grafana_provisioning().items()})
    written = []
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    os.chmod(out / "nginx.conf", 0o600)  # it holds the API keys (NGINX rate-limits per key)
    # The CA (with its key) stays in ca/, which no container mounts; NGINX gets only what it
    # serves. Writing the bundle again reuses the CA, so clients keep trusting it.
    tls = ensure_tls(out / "ca", config.tls_names, config.tls_cert, config.tls_key)
    (out / "tls").mkdir(exist_ok=True)
    for source, name in ((tls.cert, "server.pem"), (tls.key, "server.key"), (tls.dhparam, "dhparam.pem"),
                         (tls.ca, "ca.pem")):
        if source is not None:
            shutil.copyfile(source, out / "tls" / name)
            written.append(out / "tls" / name)
    os.chmod(out / "tls" / "server.key", 0o600)
    return written


def render_fleet(state_dir: StateDir, num_replicas: int) -> str:
    """The fleet's settings as a fleet file (YAML) for `fleetctl up -f`."""
    from fleetctl.config import dump_fleet_file

    return dump_fleet_file(preview_state(state_dir, num_replicas).config)


RENDERERS: dict[str, Callable[[StateDir, int], str]] = {
    "nginx": render_nginx,
    "fleet": render_fleet,
    "prometheus": render_prometheus,
    "compose": render_compose,
}
