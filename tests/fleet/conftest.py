"""Fixtures for the fleet tests: real `fleetctl` processes on a temp state dir, real NGINX,
real `replica serve` processes of a tiny model, a bounded load generator, and the clean-up that
leaves no process behind even when a test fails half-way.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
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
def fleetctl(tmp_path):
    ctl = FleetCtl(tmp_path / "home")
    yield ctl
    ctl.cleanup()


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@dataclass
class Result:
    t_start: float
    t_end: float
    status: int  # 0: no HTTP answer
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


class Load:
    """A steady load of small completions through NGINX from `num_clients` threads, one request
    in flight each, against 127.0.0.1 only; bounded by max_s and max_requests."""

    def __init__(self, url: str, ctx: ssl.SSLContext, num_clients: int = 4, max_s: float = 180.0,
                 max_requests: int = 20000) -> None:
        self.url, self.ctx = url, ctx
        self.num_clients, self.max_s, self.max_requests = num_clients, max_s, max_requests
        self.results: list[Result] = []
        self.num_stale_connection_retries = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "Load":
        self._deadline = time.monotonic() + self.max_s
        for index in range(self.num_clients):
            thread = threading.Thread(target=self._client, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _client(self, index: int) -> None:
        body = {"model": SERVED_NAME, "prompt": f"client {index} says", "max_tokens": 4, "temperature": 0}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=self.url, verify=self.ctx, headers=headers, timeout=60.0) as client:
            while not self._stop.is_set() and time.monotonic() < self._deadline \
                    and len(self.results) < self.max_requests:
                t_start = time.monotonic()
                try:
                    response = self._post(client, body)
                    result = Result(t_start, time.monotonic(), response.status_code,
                                    "" if response.status_code == 200 else response.text[:200])
                except httpx.HTTPError as exc:
                    result = Result(t_start, time.monotonic(), 0, f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.results.append(result)

    def _post(self, client: httpx.Client, body: dict) -> httpx.Response:
        """One request, sent again once if the server closed the kept-alive connection before
        answering a single byte: an NGINX reload closes its old workers' idle connections, and a
        request racing that close was never read. curl, browsers and the openai client retry
        this case too (RFC 9112 9.3.1); a request that got any answer is never re-sent."""
        try:
            return client.post("/v1/completions", json=body)
        except httpx.RemoteProtocolError as exc:
            if "without sending a response" not in str(exc):
                raise
            with self._lock:
                self.num_stale_connection_retries += 1
            return client.post("/v1/completions", json=body)

    def wait_for_ok(self, num_ok: int, since: float = 0.0, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.ok(since)) < num_ok:
            assert time.monotonic() < deadline, f"only {len(self.ok(since))} of {num_ok} requests succeeded"
            time.sleep(0.05)

    def ok(self, since: float = 0.0) -> list[Result]:
        with self._lock:
            return [r for r in self.results if r.ok and r.t_start >= since]

    def failures(self) -> list[Result]:
        with self._lock:
            return [r for r in self.results if not r.ok]
