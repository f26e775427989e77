"""Fixtures for the fleet tests: real `fleetctl` processes on a temp state dir, real NGINX (from
the template, or in front of one replica), real `replica serve` processes of a tiny model (and a
second checkpoint of it for updates), one private Docker engine for the Docker and Swarm tests,
and the clean-up that leaves no process behind even when a test fails half-way. The load
generators are in `load.py`.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny_models import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "fleet-test-key-1"
SERVED_NAME = "tiny-llama"


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("fleet-models") / SERVED_NAME)


@pytest.fixture(scope="session")
def tiny_model_v2(tmp_path_factory) -> Path:
    """The same architecture and tokenizer with other weights (another seed), in a folder of
    another name: what a rolling update moves the fleet to. Served, it still answers to
    SERVED_NAME (the fleet's name); only its metadata (`root`) says tiny-llama-v2."""
    return make_tiny_model(tmp_path_factory.mktemp("fleet-models-v2") / f"{SERVED_NAME}-v2", seed=1)


class FleetCtl:
    """`python -m fleetctl ...` with PAGEFLEET_HOME set to one temp state dir."""

    def __init__(self, home: Path, env: dict | None = None) -> None:
        self.home = home
        ports = free_ports(3)
        self.https_port, self.http_port, self.internal_port = ports
        self.env = {**os.environ, "PAGEFLEET_HOME": str(home), "PYTHONPATH": str(REPO_ROOT),
                    # two cores for everything: one torch thread per replica
                    "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
        self.children: list[subprocess.Popen] = []

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "fleetctl", *args], env=self.env, cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"fleetctl {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def json(self, *args: str, check: bool = True) -> dict:
        return json.loads(self(*args, "--json", check=check).stdout)

    def status(self) -> dict:
        return self.json("status", check=False)

    def popen(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "fleetctl", *args], env=self.env, cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.children.append(proc)
        return proc

    def up_args(self, model: Path, num_replicas: int, backend: str, *extra: str) -> list[str]:
        return ["up", "--replicas", str(num_replicas), "--backend", backend, "--model", str(model),
                "--port", str(self.https_port), "--http-port", str(self.http_port),
                "--internal-port", str(self.internal_port), "--api-key", API_KEY,
                "--max-model-len", "256", "--num-kv-blocks", "64", "--rate-limit", "1000", "--burst", "1000",
                "--drain-timeout", "10", "--ready-timeout", "180", *extra]

    @property
    def ca(self) -> Path:
        return self.home / "tls" / "ca.pem"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def wait_status(self, predicate, timeout_s: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            report = self.status()
            if predicate(report) or time.monotonic() > deadline:
                return report
            time.sleep(0.5)

    def local_pids(self) -> list[int]:
        pids = []
        for path in (self.home / "local").glob("*.json") if (self.home / "local").exists() else []:
            try:
                pids.append(json.loads(path.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                pass
        return pids

    def nginx_pid(self) -> int | None:
        try:
            return int((self.home / "nginx" / "nginx.pid").read_text())
        except (OSError, ValueError):
            return None

    def cleanup(self) -> None:
        """`fleetctl down`, then make sure: the watchers, replicas and NGINX this test started."""
        for proc in self.children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        pids = self.local_pids()
        nginx_pid = self.nginx_pid()
        if (self.home / "fleet.json").exists():
            self("down", check=False, timeout=120)
        for pid in pids + ([nginx_pid] if nginx_pid else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def fast_polls(monkeypatch):
    """For the tests on tests/fleet/fakes.py: the fakes answer at once, so the fleet's polling
    intervals need not wait for real replicas."""
    from fleetctl import backend_update, fleet as fleet_mod

    monkeypatch.setattr(fleet_mod, "POLL_S", 0.001)
    monkeypatch.setattr(backend_update, "POLL_S", 0.001)


@pytest.fixture
def models(tmp_path) -> tuple[str, str]:
    """Two checkpoint folders (weights M1 and M2) as `--model` paths; the fakes never read them."""
    paths = []
    for name in ("m1", "m2"):
        (tmp_path / name).mkdir()
        paths.append(str(tmp_path / name))
    return paths[0], paths[1]


@pytest.fixture
def fleetctl(tmp_path):
    ctl = FleetCtl(tmp_path / "home")
    yield ctl
    ctl.cleanup()


@pytest.fixture
def running(tmp_path):
    """NGINX started from the default template (upstreams where nothing listens); yields
    (nginx, config)."""
    from fleetctl.nginx import Nginx
    from tests.fleet.front import make_config, rendered

    config = make_config()
    nginx = Nginx(tmp_path / "nginx")
    assert nginx.apply(rendered(tmp_path, config)) == "started"
    yield nginx, config
    nginx.stop(timeout_s=5)


@pytest.fixture(scope="module")
def replica(tiny_model, tmp_path_factory):
    """One `replica serve` of the tiny model, for `front`."""
    from tests.fleet.front import API_KEY as FRONT_API_KEY
    from tests.server.conftest import ServerProcess

    server = ServerProcess(["--model", str(tiny_model), "--served-model-name", SERVED_NAME,
                            "--api-key", FRONT_API_KEY, "--max-model-len", "256", "--num-kv-blocks", "64"],
                           tmp_path_factory.mktemp("front") / "replica.log", env={"OMP_NUM_THREADS": "1"})
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def front(tmp_path, replica):
    """`replica` behind NGINX from the template, without fleetctl (tests/fleet/front.py)."""
    from tests.fleet.front import Front

    front = Front(tmp_path, replica)
    yield front
    front.nginx.stop(timeout_s=5)


@pytest.fixture(scope="session")
def docker_engine():
    """One private Docker engine (tests/fleet/dockerd.py) for the whole run, a single-node swarm
    with the replica image: (Dockerd, docker.DockerClient). The tests that use it skip first
    where `dockerd.available()` says it cannot run; each removes its own fleet."""
    import docker

    from tests.fleet import dockerd

    daemon = dockerd.Dockerd()
    try:
        daemon.start()
        daemon.build_dev_image()
        daemon.init_swarm()
        client = docker.DockerClient(base_url=daemon.host)
        yield daemon, client
        client.close()
    finally:
        daemon.stop()


@pytest.fixture
def docker_ctl(docker_engine, tmp_path):
    """fleetctl on a temp state dir, talking to `docker_engine`."""
    daemon, _ = docker_engine
    ctl = FleetCtl(tmp_path / "home", env={"DOCKER_HOST": daemon.host})
    yield ctl
    ctl.cleanup()


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
