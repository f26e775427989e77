"""`fleetctl render compose --out DIR` writes a bundle that `docker compose up` can run as is:
every file the Compose file mounts exists, Compose accepts it, and NGINX accepts its config."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fleetctl.cli import cli


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.fixture
def bundle(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PAGEFLEET_HOME", str(tmp_path / "home"))
    out = tmp_path / "stack"
    result = CliRunner().invoke(cli, ["render", "compose", "--replicas", "3", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert str(out / "docker-compose.yml") in result.output.splitlines()
    return out


def bind_sources(compose: dict, folder: Path) -> list[Path]:
    """The host side of every bind mount (volumes that start with . or /) in the Compose file."""
    sources = []
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                sources.append((folder / source).resolve())
    return sources


def test_every_file_the_compose_file_mounts_is_in_the_bundle(bundle):
    compose = yaml.safe_load((bundle / "docker-compose.yml").read_text())
    sources = bind_sources(compose, bundle)
    assert {p.relative_to(bundle).as_posix() for p in sources} == \
        {"nginx.conf", "pagefleet.js", "tls", "prometheus.yml", "grafana/provisioning", "grafana/dashboards"}
    assert all(p.exists() for p in sources), [p for p in sources if not p.exists()]
    assert sorted(p.name for p in (bundle / "tls").iterdir()) == ["ca.pem", "dhparam.pem", "server.key", "server.pem"]
    assert oct((bundle / "tls" / "server.key").stat().st_mode & 0o777) == "0o600"
    assert not list((bundle / "tls").glob("ca.key"))  # the CA's key is not mounted into NGINX
    assert sorted(p.name for p in (bundle / "grafana" / "dashboards").iterdir()) == \
        ["pagefleet-fleet.json", "pagefleet-replica.json"]
    nginx_conf = (bundle / "nginx.conf").read_text()
    assert re.findall(r"server (\S+) max_fails", nginx_conf) == ["replica-0:8000", "replica-1:8000", "replica-2:8000"]


def test_writing_the_bundle_again_keeps_the_ca(bundle, tmp_path):
    ca = (bundle / "tls" / "ca.pem").read_bytes()
    result = CliRunner().invoke(cli, ["render", "compose", "--out", str(bundle)], catch_exceptions=False)
    assert result.exit_code == 0 and (bundle / "tls" / "ca.pem").read_bytes() == ca


def nginx_t_on_this_host(bundle: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """`nginx -t` on the bundle's config with the container's user, names and paths pointed at this host."""
    from fleetctl.nginx import NJS_MODULE

    prefix = tmp_path / "nginx-prefix"
    (prefix / "logs").mkdir(parents=True)
    (prefix / "tmp").mkdir()
    text = (bundle / "nginx.conf").read_text()
    text = re.sub(r"^user .*;\n", "", text, flags=re.M)
    text = re.sub(r"replica-[a-z0-9-]*\d+:8000", "127.0.0.1:9", text)
    text = text.replace("/etc/pagefleet/tls", str(bundle / "tls")).replace("/var/cache/pagefleet", str(prefix))
    text = text.replace("/etc/pagefleet/pagefleet.js", str(bundle / "pagefleet.js"))
    text = text.replace("load_module modules/ngx_http_js_module.so;", f"load_module {NJS_MODULE};")
    (tmp_path / "host.conf").write_text(text)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return subprocess.run([nginx, "-t", "-p", str(prefix), "-e", "stderr", "-c", str(tmp_path / "host.conf")],
                          capture_output=True, text=True, timeout=60)


def test_the_bundled_nginx_config_passes_nginx_t_with_the_containers_paths_on_this_host(bundle, tmp_path):
    result = nginx_t_on_this_host(bundle, tmp_path)
    assert result.returncode == 0, result.stderr


def test_docker_compose_accepts_the_bundle(bundle):
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = subprocess.run([*command, "-p", "pagefleet", "config"], cwd=bundle, capture_output=True, text=True,
                            timeout=60, env={**os.environ})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert sorted(services) == ["grafana", "nginx", "prometheus", "replica-0", "replica-1", "replica-2"]


def test_out_is_only_for_compose(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEFLEET_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli, ["render", "nginx", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "render compose" in result.output


def test_dockerignore_keeps_environments_keys_and_caches_out_of_the_build_context(tmp_path):
    """Docker's own matching rules (the docker SDK's exclude_paths) over a small tree."""
    from docker.utils.build import exclude_paths

    repo = Path(__file__).resolve().parents[2]
    files = [".venv/bin/python", "tls/server.key", "tls/ca.pem", "fleetctl/__pycache__/cli.cpython-311.pyc",
             ".pytest_cache/v/x", ".git/HEAD", "bench/results/w4.json", "pyproject.toml", "README.md",
             "replica/server/app.py", "fleetctl/cli.py", "lb/nginx.conf.j2", "compose/Dockerfile"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    patterns = [line.strip() for line in (repo / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    kept = set(exclude_paths(str(tmp_path), patterns, dockerfile="compose/Dockerfile"))
    assert kept >= {"pyproject.toml", "README.md", "replica/server/app.py", "fleetctl/cli.py", "lb/nginx.conf.j2"}
    assert not kept & {".venv/bin/python", "tls/server.key", "tls/ca.pem", ".git/HEAD", ".pytest_cache/v/x",
                       "fleetctl/__pycache__/cli.cpython-311.pyc", "bench/results/w4.json"}, kept


def test_a_fleet_of_model_groups_becomes_a_bundle_with_a_service_per_replica_of_each(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEFLEET_HOME", str(tmp_path / "home"))
    (tmp_path / "coder").mkdir()
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump({"groups": [
        {"name": "chat", "model": "smollm2", "served_model_name": "chat", "num_replicas": 2,
         "engine": {"max_num_seqs": 32}},
        {"name": "code", "model": str(tmp_path / "coder"), "num_replicas": 1}]}))
    from fleetctl.config import FleetConfig, load_fleet_file
    from fleetctl.state import FleetState, StateDir

    StateDir(tmp_path / "home").ensure().save(FleetState(FleetConfig(**load_fleet_file(fleet_file))))
    out = tmp_path / "stack"
    assert CliRunner().invoke(cli, ["render", "compose", "--out", str(out)], catch_exceptions=False).exit_code == 0
    services = yaml.safe_load((out / "docker-compose.yml").read_text())["services"]
    assert sorted(s for s in services if s.startswith("replica-")) == \
        ["replica-chat-0", "replica-chat-1", "replica-code-0"]
    assert services["replica-chat-0"]["command"][-2:] == ["--max-num-seqs", "32"]
    assert services["replica-code-0"]["volumes"] == [f"{tmp_path / 'coder'}:/models/coder:ro"]
    nginx_conf = (out / "nginx.conf").read_text()
    assert "load_module modules/ngx_http_js_module.so;" in nginx_conf
    assert '"models":{"chat":1,"coder":2}' in nginx_conf
    assert re.findall(r"server (\S+) max_fails", nginx_conf.split("upstream pf_g2 {")[1].split("}")[0]) == \
        ["replica-code-0:8000"]
    prometheus = yaml.safe_load((out / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == \
        ["replica-chat-0:8000", "replica-chat-1:8000", "replica-code-0:8000"]
    assert all(p.exists() for p in bind_sources(yaml.safe_load((out / "docker-compose.yml").read_text()), out))
    result = nginx_t_on_this_host(out, tmp_path)
    assert result.returncode == 0, result.stderr
