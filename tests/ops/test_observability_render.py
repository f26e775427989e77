"""Rendered Prometheus and Compose files: checked by the tools that will read them."""
import os
import shutil
import subprocess

import pytest
import yaml

from fleetctl.observability import (ComposePorts, compose_replica_targets, render_compose,
                                    render_compose_bundle, render_file_sd, render_prometheus_config)
from tests.ops.promql import REPO


def promtool_check(path) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("no promtool (Debian package `prometheus`)")
    return subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)


def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin) or `docker-compose` (Debian's v1 package), whichever runs."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for command in candidates:
        if shutil.which(command[0]) and subprocess.run([*command, "version"], capture_output=True).returncode == 0:
            return command
    return None


def test_prometheus_config_with_static_targets_passes_promtool(tmp_path):
    path = tmp_path / "prometheus.yml"
    path.write_text(render_prometheus_config(["127.0.0.1:8001", "127.0.0.1:8002"]))
    check = promtool_check(path)
    assert check.returncode == 0, check.stdout + check.stderr
    jobs = {job["job_name"]: job for job in yaml.safe_load(path.read_text())["scrape_configs"]}
    assert jobs["pagefleet-replicas"]["static_configs"] == [{"targets": ["127.0.0.1:8001", "127.0.0.1:8002"]}]
    assert "nginx" not in jobs


def test_prometheus_config_with_a_targets_file_and_an_nginx_exporter_passes_promtool(tmp_path):
    (tmp_path / "replicas.json").write_text(render_file_sd(["127.0.0.1:8001"], {"fleet": "test"}))
    path = tmp_path / "prometheus.yml"
    path.write_text(render_prometheus_config([], "127.0.0.1:9113", targets_file="replicas.json",
                                             scrape_interval_s=2))
    check = promtool_check(path)
    assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load(path.read_text())
    assert config["global"]["scrape_interval"] == "2s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["pagefleet-replicas"]["file_sd_configs"][0]["files"] == ["replicas.json"]
    assert jobs["nginx"]["static_configs"] == [{"targets": ["127.0.0.1:9113"]}]


def test_bad_settings_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="host:port"):
        render_prometheus_config(["http://127.0.0.1:8001/metrics"])
    with pytest.raises(ValueError, match="scrape_interval_s"):
        render_prometheus_config([], scrape_interval_s=0)
    with pytest.raises(ValueError, match="num_replicas"):
        render_compose(0, "smollm2", "pagefleet/replica")


def test_compose_has_nginx_replicas_prometheus_and_grafana():
    text = render_compose(3, "/srv/models/llama-8b/", "pagefleet/replica:dev", ComposePorts(https=8443),
                          served_model_name="llama", gpus=["0", "1"])
    services = yaml.safe_load(text)["services"]
    assert sorted(services) == ["grafana", "nginx", "prometheus", "replica-0", "replica-1", "replica-2"]
    replica = services["replica-2"]
    assert replica["volumes"] == ["/srv/models/llama-8b/:/models/llama-8b:ro"]
    assert replica["command"][replica["command"].index("--model") + 1] == "/models/llama-8b"
    assert "--served-model-name" in replica["command"] and "0.0.0.0" in replica["command"]
    # GPUs round-robin, one per replica
    gpu_of = {name: services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
              for name in ("replica-0", "replica-1", "replica-2")}
    assert gpu_of == {"replica-0": ["0"], "replica-1": ["1"], "replica-2": ["0"]}
    assert services["nginx"]["ports"] == ["8443:443", "80:80"]
    assert set(services["nginx"]["depends_on"]) == {"replica-0", "replica-1", "replica-2"}
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]   # internal tools on loopback only
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    assert "ports" not in replica   # replicas are reached through NGINX only


def test_compose_without_gpus_runs_cpu_replicas_of_the_bundled_model():
    services = yaml.safe_load(render_compose(1, "smollm2", "pagefleet/replica"))["services"]
    assert "deploy" not in services["replica-0"] and "volumes" not in services["replica-0"]
    assert services["replica-0"]["command"][-2:] == ["--model", "smollm2"]


def test_compose_bundle_passes_docker_compose_config_and_promtool(tmp_path):
    folder = tmp_path / "compose"
    folder.mkdir()
    shutil.copytree(REPO / "grafana", tmp_path / "grafana")
    bundle = render_compose_bundle(2, "smollm2", "pagefleet/replica:test", api_key_env="PAGEFLEET_API_KEY")
    for name, text in bundle.items():
        (folder / name).write_text(text)
    (folder / "nginx.conf").write_text("events {}\n")   # rendered by fleetctl.nginx in real use
    (folder / "tls").mkdir()
    prometheus = yaml.safe_load(bundle["prometheus.yml"])
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == compose_replica_targets(2)
    check = promtool_check(folder / "prometheus.yml")
    assert check.returncode == 0, check.stdout + check.stderr

    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)")
    env = {**os.environ, "PAGEFLEET_API_KEY": "test-key"}
    result = subprocess.run([*command, "-p", "pagefleet", "config"], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    assert resolved["replica-1"]["command"][resolved["replica-1"]["command"].index("--api-key") + 1] == "test-key"
    missing_key = {k: v for k, v in os.environ.items() if k != "PAGEFLEET_API_KEY"}
    refused = subprocess.run([*command, "config", "-q"], cwd=folder, env=missing_key, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and "PAGEFLEET_API_KEY" in refused.stderr
