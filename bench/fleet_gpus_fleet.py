"""What bench/fleet_gpus.py drives: a real fleet through the `fleetctl` command line (local backend:
replicas as processes, NGINX with TLS in front), and a closed-loop load through its HTTPS URL.

`Fleet` runs `python -m fleetctl ...` with PAGEFLEET_HOME set to its own state directory and
free ports, so it never touches an operator's fleet; every fleetctl it starts in the background
(the watcher) is ended by `close()`, which also runs `fleetctl down` and kills what is left.
The model is one fleetctl model group ("bench", served as "bench"), so that engine settings
(`--set load_format=dummy`, any of fleetctl.groups.ENGINE_OPTIONS) reach every replica,
restarted and updated ones too.

`ClosedLoop`: workers that each send one W4-length request after another until told to stop,
every request with a deadline (a request past it counts as "hung", never waited for).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.soak import process_tree
from fleetctl.loadgen import BenchConfig, RequestResult, RequestSpec, send_request

ROOT = Path(__file__).resolve().parents[1]
GROUP = "bench"  # the model group, and the name clients send in `model`


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Fleet:
    home: Path                      # the state directory (PAGEFLEET_HOME)
    model: str
    device: str                     # cpu | cuda
    gpus: list[str]                 # every GPU the fleet may use; [] on the CPU
    settings: list[str] = field(default_factory=list)   # KEY=VALUE engine settings of the group
    ready_timeout_s: float = 900.0
    env: dict = field(default_factory=dict)
    children: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.https_port, self.http_port, self.internal_port = free_ports(3)
        self.env = {**os.environ, "PAGEFLEET_HOME": str(self.home), **self.env,
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}

    def run(self, *args: str, timeout_s: float = 3600) -> subprocess.CompletedProcess:
        """`fleetctl ARGS`; raises with its output when it fails."""
        result = subprocess.run([sys.executable, "-m", "fleetctl", *args], env=self.env, cwd=ROOT,
                                capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise RuntimeError(f"fleetctl {' '.join(args)} exited {result.returncode}:\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def popen(self, *args: str, log: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "fleetctl", *args], env=self.env, cwd=ROOT,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.children.append(proc)
        return proc

    def up_args(self, num_replicas: int) -> list[str]:
        group = ",".join([f"{GROUP}={self.model}", f"replicas={num_replicas}", f"served={GROUP}", *self.settings])
        return ["up", "--backend", "local", "--group", group, "--device", self.device,
                *(["--gpus", ",".join(self.gpus)] if self.gpus else []),
                "--port", str(self.https_port), "--http-port", str(self.http_port),
                "--internal-port", str(self.internal_port),
                # the load is the point: no rate limit in its way
                "--rate-limit", "1000000", "--burst", "1000000",
                "--ready-timeout", f"{self.ready_timeout_s:g}", "--drain-timeout", "60"]

    def up(self, num_replicas: int) -> float:
        """N replicas ready in NGINX: `fleetctl up` for a new fleet, `fleetctl scale N --group`
        for a running one (whose weights an update may have changed, which `up` would refuse);
        returns the command's seconds."""
        started = time.monotonic()
        if (self.home / "fleet.json").exists():
            self.run("scale", str(num_replicas), "--group", GROUP)
        else:
            self.run(*self.up_args(num_replicas))
        return time.monotonic() - started

    def status(self) -> dict:
        """`fleetctl status --json` (exit 7, degraded, still prints the report)."""
        result = subprocess.run([sys.executable, "-m", "fleetctl", "status", "--json"], env=self.env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        return json.loads(result.stdout)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def ca_file(self) -> str:
        return str(self.home / "tls" / "ca.pem")

    @property
    def access_log(self) -> Path:
        return self.home / "nginx" / "logs" / "access.log"

    def replica_pid(self, replica_id: str) -> int:
        return json.loads((self.home / "local" / f"{replica_id}.json").read_text())["pid"]

    def replica_processes(self, replica_id: str) -> list[int]:
        """Every process of the replica: the server and its engine core child (from /proc)."""
        return process_tree(self.replica_pid(replica_id))

    @staticmethod
    def kill(pids: list[int]) -> None:
        """SIGKILL each; the tree was listed before the first signal, so no child escapes as an orphan."""
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """End the background fleetctl processes, `fleetctl down`, then kill what is left."""
        for proc in self.children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        registry = self.home / "local"
        pids = [json.loads(p.read_text()).get("pid") for p in registry.glob("*.json")] if registry.exists() else []
        if (self.home / "fleet.json").exists():
            subprocess.run([sys.executable, "-m", "fleetctl", "down"], env=self.env, cwd=ROOT,
                           capture_output=True, timeout=300)
        for pid in [p for p in pids if p]:
            for child in process_tree(pid)[::-1]:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def random_spec(rng: random.Random, prompt_len: tuple[int, int], output_len: tuple[int, int],
                vocab_size: int) -> RequestSpec:
    return RequestSpec(tuple(rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_len))),
                       rng.randint(*output_len))


@dataclass
class ClosedLoop:
    """`num_workers` workers through the fleet's HTTPS URL, each sending one request after
    another until `stop` is set; the requests in flight then finish (or reach their deadline).
    Times (`RequestResult.start_s`) count from `origin` (time.perf_counter()), so callers can
    place events such as a kill among them."""

    config: BenchConfig
    num_workers: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    vocab_size: int
    deadline_s: float
    origin: float = field(default_factory=time.perf_counter)
    results: list[RequestResult] = field(default_factory=list)
    num_in_flight: int = 0

    def now_s(self) -> float:
        return time.perf_counter() - self.origin

    async def run(self, stop: asyncio.Event) -> None:
        ctx = ssl.create_default_context(cafile=self.config.ca_file)
        connector = aiohttp.TCPConnector(limit=self.num_workers, ssl=ctx)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.deadline_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._worker(index, session, stop) for index in range(self.num_workers)))

    async def _worker(self, index: int, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        rng = random.Random(index)
        while not stop.is_set():
            spec = random_spec(rng, self.prompt_len, self.output_len, self.vocab_size)
            start_s = self.now_s()
            self.num_in_flight += 1
            try:
                result = await asyncio.wait_for(
                    send_request(session, self.config, len(self.results), spec, {}, self.origin), self.deadline_s)
            except asyncio.TimeoutError:
                result = RequestResult(len(self.results), len(spec.prompt_token_ids), spec.num_output_tokens,
                                       "hung", f"no end within {self.deadline_s:g} s", start_s,
                                       e2e_s=self.now_s() - start_s)
            finally:
                self.num_in_flight -= 1
            self.results.append(result)


def tally(results: list[RequestResult]) -> dict:
    """ok; failed after NGINX accepted them (any answer or a broken stream), by status; re-sent
    because a send never reached NGINX (the load generator's `is_unsent`); unsent (all sends lost)."""
    failed: dict[str, int] = {}
    for r in results:
        if not r.is_ok and r.status != "unsent":
            failed[str(r.status)] = failed.get(str(r.status), 0) + 1
    return {"num_requests": len(results), "num_ok": sum(r.is_ok for r in results),
            "num_failed": sum(failed.values()), "failed_by_status": failed,
            "num_resent_unsent": sum(r.num_unsent_retries for r in results),
            "num_unsent": sum(r.status == "unsent" for r in results),
            "examples": sorted({f"{r.status}: {r.error[:120]}" for r in results if not r.is_ok})[:5]}
