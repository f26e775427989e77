"""Fixtures for the operations tests: free ports, a real Prometheus, a real replica (once it exists)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get_json(url: str, timeout_s: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def start_prometheus(tmp_path):
    """Start Debian's Prometheus on a free loopback port with `config_text`; returns its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary (Debian package `prometheus`; scripts/setup.sh installs it)")
    procs = []

    def start(config_text: str) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(config_text)
        port = free_port()
        log = open(tmp_path / "prometheus.log", "w")
        procs.append(subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200, 30,
                   "Prometheus /-/ready")
        return url

    yield start
    for proc in procs:
        _stop(proc)


def _tiny_model_factory():
    """tests/tiny_models.make_tiny_model, or a reason why the real-replica tests cannot run yet."""
    if not (REPO / "replica" / "server" / "app.py").exists():
        return None, "replica/server/app.py does not exist yet (issue 4)"
    try:
        from tests.tiny_models import make_tiny_model
    except ImportError:
        return None, "tests/tiny_models.py: make_tiny_model does not exist yet"
    return make_tiny_model, ""


@pytest.fixture(scope="session")
def tiny_replica(tmp_path_factory):
    """A real `replica serve` process on a tiny model, on loopback: yields a dict with
    base_url, model (served name), vocab_size."""
    make_tiny_model, reason = _tiny_model_factory()
    if make_tiny_model is None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("tiny-replica")
    model_dir = root / "model"
    made = make_tiny_model(model_dir)
    model_path = Path(made) if isinstance(made, (str, os.PathLike)) else model_dir
    config_file = model_path / "config.json" if model_path.is_dir() else None
    vocab_size = json.loads(config_file.read_text()).get("vocab_size", 256) if config_file and config_file.exists() else 256
    port = free_port()
    log = open(root / "replica.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "replica.cli", "serve", "--model", str(model_path), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or urllib.request.urlopen(f"{base_url}/ready", timeout=2).status == 200,
                   120, "the replica's /ready")
        if proc.poll() is not None:
            pytest.fail(f"replica exited with {proc.returncode}:\n{(root / 'replica.log').read_text()[-3000:]}")
        model = http_get_json(f"{base_url}/v1/models")["data"][0]["id"]
        yield {"base_url": base_url, "model": model, "vocab_size": int(vocab_size), "log": root / "replica.log"}
    finally:
        _stop(proc, grace_s=30)
