"""Real `replica serve` processes for the server tests.

One tiny random Llama (SmolLM2 tokenizer) server is shared by the whole session; tests that
must kill or starve a server start their own. Server output goes to a log file (a pipe nobody
reads would fill up and stall the server) whose tail is shown when a server fails to start.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.tiny_models import make_tiny_model

API_KEY = "test-key-1"
TINY_NAME = "tiny-llama"
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m replica.cli serve ...` on a free port; `stop()` sends SIGTERM."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None,
                 new_session: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "replica.cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", "--log-level", "warning", *args]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=new_session)

    def wait_ready(self, timeout_s: float = 180.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, num_chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def ollama_store(tmp_path_factory) -> Path:
    """The test store of tests/models/ollama_store_builder.py (the bundled model's blob under
    `smollm2:135m` and `myorg/assistant:v1`), one for the modules that serve from it (the blob
    is a copy of the bundled file, so its tokenizer comes from the same cache entry: the
    cache is keyed on the file's fields, not its path)."""
    from tests.models.ollama_store_builder import build_test_store

    return build_test_store(tmp_path_factory.mktemp("ollama") / "models")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def tiny_server_args(model: Path, *extra: str) -> list[str]:
    # A small KV pool keeps memory low; 256 tokens of context keep generations short.
    # float32: some tests compare tokens across batch compositions, exact only in float32.
    return ["--model", str(model), "--served-model-name", TINY_NAME, "--max-model-len", "256",
            "--num-kv-blocks", "256", "--dtype", "float32", *extra]


@pytest.fixture(scope="session")
def tiny_server(tiny_model, tmp_path_factory):
    """The shared server: tiny model, one API key (so every test also exercises auth)."""
    server = ServerProcess(tiny_server_args(tiny_model, "--api-key", API_KEY, "--max-n", "8"),
                           tmp_path_factory.mktemp("logs") / "tiny.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def auth() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def http(tiny_server, auth):
    with httpx.Client(base_url=tiny_server.url, headers=auth, timeout=60.0) as client:
        yield client


def engine_idle(url: str, timeout_s: float = 10.0) -> dict:
    """Waits until the engine runs nothing and holds no KV blocks; returns the gauges."""
    deadline = time.monotonic() + timeout_s
    while True:
        gauges = scrape(url)
        idle = (gauges["pagefleet_num_requests_running"] == 0
                and gauges["pagefleet_num_requests_waiting"] == 0
                and gauges["pagefleet_kv_cache_usage_perc"] == 0)
        if idle or time.monotonic() > deadline:
            return gauges
        time.sleep(0.05)


def scrape(url: str) -> dict[str, float]:
    """/metrics as {name{labels} or bare name: value}; bare names hold the first sample."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    text = httpx.get(url + "/metrics", timeout=10.0).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items())
                              if k != "model_name")
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
            values.setdefault(sample.name, sample.value)
    return values
