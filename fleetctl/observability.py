"""Prometheus scrape configuration and the Compose stack (NGINX + N replicas + Prometheus + Grafana).

Pure functions from settings to file text; nothing here starts a process or touches the disk, so
`fleetctl render ...` can print them and the tests can check them (`promtool check config`,
`docker compose config`).

Prometheus finds the replicas in one of two ways:
- `render_prometheus_config(targets)`: the targets written into the file (re-render and reload
  Prometheus when the fleet changes), or
- `render_prometheus_config([], targets_file="replicas.json")` plus `render_file_sd(targets)`
  written to that file: Prometheus re-reads it on change, no reload needed. fleetctl rewrites
  it (atomically: write a temp file, rename) whenever it adds or removes a replica.

Every replica is scraped under the job `pagefleet-replicas` (the dashboards' `up{job=...}`
replica/upstream state depends on that name).
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import yaml

from fleetctl.dashboards import DATASOURCE_UID, REPLICA_JOB

COMPOSE_REPLICA_PORT = 8000   # every replica container listens here; only NGINX and Prometheus reach it


def render_prometheus_config(targets: list[str], nginx_status_target: str | None = None, *,
                             scrape_interval_s: int = 5, targets_file: str | None = None,
                             metrics_path: str = "/metrics") -> str:
    """Prometheus YAML that scrapes every replica (`host:port`) under the job `pagefleet-replicas`.

    `nginx_status_target`: `host:port` of an exporter that turns NGINX's stub_status into
    Prometheus metrics (nginx-prometheus-exporter); scraped under the job `nginx`. stub_status
    itself is not in Prometheus' format, so do not point this at NGINX directly.
    `targets_file`: also read replica targets from this file_sd JSON (see `render_file_sd`).
    """
    if scrape_interval_s < 1:
        raise ValueError(f"scrape_interval_s must be >= 1, got {scrape_interval_s}")
    for target in [*targets, *([nginx_status_target] if nginx_status_target else [])]:
        _check_target(target)
    replicas: dict = {"job_name": REPLICA_JOB, "metrics_path": metrics_path,
                      "static_configs": [{"targets": list(targets)}]}
    if targets_file:
        replicas["file_sd_configs"] = [{"files": [targets_file], "refresh_interval": "30s"}]
    scrape_configs = [replicas]
    if nginx_status_target:
        scrape_configs.append({"job_name": "nginx", "static_configs": [{"targets": [nginx_status_target]}]})
    scrape_configs.append({"job_name": "prometheus", "static_configs": [{"targets": ["localhost:9090"]}]})
    config = {
        "global": {"scrape_interval": f"{scrape_interval_s}s", "evaluation_interval": f"{scrape_interval_s}s",
                   "scrape_timeout": f"{min(scrape_interval_s, 10)}s"},
        "scrape_configs": scrape_configs,
    }
    return "# Rendered by fleetctl (fleetctl/observability.py); edits are overwritten.\n" + _yaml(config)


def render_file_sd(targets: list[str], labels: dict[str, str] | None = None) -> str:
    """A Prometheus file_sd JSON document listing the replica targets."""
    for target in targets:
        _check_target(target)
    return json.dumps([{"targets": list(targets), "labels": dict(labels or {})}], indent=2) + "\n"


@dataclass(frozen=True)
class ComposeGroup:
    """One model group of a Compose stack: services replica-<name>-0, replica-<name>-1, ..."""
    name: str
    model: str
    served_model_name: str
    num_replicas: int
    engine_args: tuple[str, ...] = ()  # more `replica serve` options

    def targets(self, port: int = COMPOSE_REPLICA_PORT) -> list[str]:
        return [f"replica-{self.name}-{i}:{port}" for i in range(self.num_replicas)]


@dataclass(frozen=True)
class ComposePorts:
    """Host ports the stack publishes. Prometheus and Grafana bind to loopback only."""
    https: int = 443
    http: int = 80
    prometheus: int = 9090
    grafana: int = 3000


def compose_replica_targets(num_replicas: int, port: int = COMPOSE_REPLICA_PORT) -> list[str]:
    """The replicas' addresses inside the Compose network: NGINX upstreams and Prometheus targets."""
    return [f"replica-{i}:{port}" for i in range(num_replicas)]


def render_compose(num_replicas: int, model: str, image: str, ports: ComposePorts | None = None, *,
                   served_model_name: str | None = None, gpus: list[str] | None = None,
                   api_key_env: str | None = None, drain_timeout_s: int = 30,
                   grafana_dir: str = "../grafana", nginx_image: str = "nginx:1.27",
                   prometheus_image: str = "prom/prometheus:v2.53.2",
                   grafana_image: str = "grafana/grafana:11.2.0", groups: list[ComposeGroup] | None = None) -> str:
    """A Compose file for NGINX + `num_replicas` replicas + Prometheus + Grafana.

    `model`: a name the replica image resolves itself (`smollm2`), or a host path (anything with
    a `/`), mounted read-only at `/models/<basename>`. `gpus`: device ids handed out round-robin,
    one per replica (`None`: CPU replicas). `api_key_env`: the name of an environment variable
    holding the API key, passed to each replica as `--api-key`.

    Files expected beside the Compose file (fleetctl writes them with it): `nginx.conf` (rendered
    by fleetctl.nginx with upstreams `compose_replica_targets(n)`, listening on 443 and 80),
    `tls/` (certificate and key it names), and `prometheus.yml`
    (`render_prometheus_config(compose_replica_targets(n))`). `grafana_dir` is this repository's
    `grafana/` folder relative to the Compose file.

    `groups`: several model groups instead of `num_replicas` of `model` (services
    replica-<group>-<i>, GPUs handed out round-robin over all of them).
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if drain_timeout_s < 0:
        raise ValueError(f"drain_timeout_s must be >= 0, got {drain_timeout_s}")
    ports = ports or ComposePorts()
    if groups:
        members = [(f"replica-{g.name}-{i}", g) for g in groups for i in range(g.num_replicas)]
        replicas = {name: _replica_service(index, g.model, image, g.served_model_name, gpus, api_key_env,
                                           drain_timeout_s, g.engine_args)
                    for index, (name, g) in enumerate(members)}
    else:
        replicas = {f"replica-{i}": _replica_service(i, model, image, served_model_name, gpus, api_key_env,
                                                     drain_timeout_s) for i in range(num_replicas)}
    services = {
        **replicas,
        "nginx": {
            "image": nginx_image, "restart": "unless-stopped",
            "ports": [f"{ports.https}:443", f"{ports.http}:80"],
            "volumes": ["./nginx.conf:/etc/nginx/nginx.conf:ro", "./tls:/etc/pagefleet/tls:ro",
                        "./pagefleet.js:/etc/pagefleet/pagefleet.js:ro"],  # njs router (lb/pagefleet.js)
            # fleetctl's NGINX config keeps its pid, logs and temp files under one prefix.
            "command": ["/bin/sh", "-c", "mkdir -p /var/cache/pagefleet/logs /var/cache/pagefleet/tmp "
                        "&& chown nginx /var/cache/pagefleet/tmp && exec nginx -g 'daemon off;'"],
            "depends_on": {name: {"condition": "service_healthy"} for name in replicas},
        },
        "prometheus": {
            "image": prometheus_image, "restart": "unless-stopped",
            "command": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus",
                        "--storage.tsdb.retention.time=15d", "--web.enable-lifecycle"],
            "ports": [f"127.0.0.1:{ports.prometheus}:9090"],
            "volumes": ["./prometheus.yml:/etc/prometheus/prometheus.yml:ro", "prometheus-data:/prometheus"],
        },
        "grafana": {
            "image": grafana_image, "restart": "unless-stopped",
            "ports": [f"127.0.0.1:{ports.grafana}:3000"],
            "environment": {
                "PAGEFLEET_PROMETHEUS_URL": "http://prometheus:9090",
                "GF_SECURITY_ADMIN_PASSWORD": "${GRAFANA_ADMIN_PASSWORD:-admin}",
                "GF_AUTH_ANONYMOUS_ENABLED": "true",
                "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
                "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": "/var/lib/grafana/dashboards/pagefleet-fleet.json",
            },
            "volumes": [f"{grafana_dir}/provisioning:/etc/grafana/provisioning:ro",
                        f"{grafana_dir}/dashboards:/var/lib/grafana/dashboards:ro", "grafana-data:/var/lib/grafana"],
            "depends_on": ["prometheus"],
        },
    }
    compose = {"services": services, "volumes": {"prometheus-data": {}, "grafana-data": {}}}
    return "# Rendered by fleetctl (fleetctl/observability.py); edits are overwritten.\n" + _yaml(compose)


def render_compose_bundle(num_replicas: int, model: str, image: str, **compose_kwargs) -> dict[str, str]:
    """File name → text for the files fleetctl owns in the Compose folder (NGINX's config aside)."""
    groups = compose_kwargs.get("groups")
    targets = [t for g in groups for t in g.targets()] if groups else compose_replica_targets(num_replicas)
    return {
        "docker-compose.yml": render_compose(num_replicas, model, image, **compose_kwargs),
        "prometheus.yml": render_prometheus_config(targets),
    }


def render_grafana_provisioning(dashboards_path: str = "/var/lib/grafana/dashboards") -> dict[str, str]:
    """Path under the Grafana folder → text of its provisioning files: the Prometheus data source
    (uid fixed: the dashboards refer to it; URL from $PAGEFLEET_PROMETHEUS_URL, which Grafana
    expands) and the provider that loads the dashboards from `dashboards_path`."""
    datasources = {"apiVersion": 1, "datasources": [{
        "name": "pagefleet Prometheus", "uid": DATASOURCE_UID, "type": "prometheus", "access": "proxy",
        "url": "${PAGEFLEET_PROMETHEUS_URL}", "isDefault": True, "editable": False,
        "jsonData": {"timeInterval": "5s"}}]}
    providers = {"apiVersion": 1, "providers": [{
        "name": "pagefleet", "folder": "pagefleet", "type": "file", "disableDeletion": True,
        "allowUiUpdates": False, "updateIntervalSeconds": 30,
        "options": {"path": dashboards_path, "foldersFromFilesStructure": False}}]}
    header = "# Rendered by fleetctl (fleetctl/observability.py); edits are overwritten.\n"
    return {"provisioning/datasources/prometheus.yaml": header + _yaml(datasources),
            "provisioning/dashboards/pagefleet.yaml": header + _yaml(providers)}


def _replica_service(index: int, model: str, image: str, served_model_name: str | None,
                     gpus: list[str] | None, api_key_env: str | None, drain_timeout_s: int,
                     engine_args: tuple[str, ...] = ()) -> dict:
    command = ["replica", "serve", "--host", "0.0.0.0", "--port", str(COMPOSE_REPLICA_PORT),
               "--drain-timeout", str(drain_timeout_s)]
    service: dict = {"image": image, "restart": "unless-stopped", "expose": [str(COMPOSE_REPLICA_PORT)],
                     # the image's HEALTHCHECK asks this port (compose/Dockerfile)
                     "environment": {"PAGEFLEET_PORT": str(COMPOSE_REPLICA_PORT)},
                     # SIGTERM drains in-flight requests; give it that long before SIGKILL.
                     "stop_grace_period": f"{drain_timeout_s + 5}s",
                     "labels": {"pagefleet.replica": str(index)}}
    if "/" in model:
        in_container = posixpath.join("/models", posixpath.basename(model.rstrip("/")))
        service["volumes"] = [f"{model}:{in_container}:ro"]
        model = in_container
    command += ["--model", model]
    if served_model_name:
        command += ["--served-model-name", served_model_name]
    if api_key_env:
        command += ["--api-key", f"${{{api_key_env}:?set {api_key_env} to the fleet's API key}}"]
    command += list(engine_args)
    if gpus:
        command += ["--device", "cuda"]
        service["deploy"] = {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "device_ids": [gpus[index % len(gpus)]], "capabilities": ["gpu"]}]}}}
    service["command"] = command
    ready_probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{COMPOSE_REPLICA_PORT}/ready')"
    service["healthcheck"] = {"test": ["CMD", "python", "-c", ready_probe], "interval": "5s",
                              "timeout": "3s", "retries": 3, "start_period": "120s"}
    return service


def _check_target(target: str) -> None:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"a scrape target must be host:port, got {target!r}")


def _yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=120)
