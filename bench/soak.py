"""Soak a running fleet: mixed streaming and non-streaming completions through its HTTPS URL at
a fixed concurrency for a fixed time, sampling every replica's RSS (and GPU memory), running
requests and KV-cache use. Passes when no request failed, each replica's RSS after warm-up
drifts by at most 2%, and every replica ends with 0 requests running and its KV cache free.

    PAGEFLEET_HOME=DIR python3 bench/soak.py [--duration-s 600] [--concurrency 64] \
        [--prompt-len 64:1024] [--output-len 16:512] [--out bench/results/soak-....json]

The fleet comes from its state directory (URL, CA, API key, replicas, internal port); replica
pids from the local backend's registry (DIR/local/rN.json). A replica is a process tree (the
server and its engine core child, which holds the weights and the KV cache): RSS and GPU memory
are summed over the tree. GPU memory per process from `nvidia-smi --query-compute-apps`; where
that lists no pid of the tree (some container runtimes hide pids), the GPU's own used memory
when the replica is the only one on its GPU (`Target.gpu_index`). Used by tests/fleet/test_soak.py on the CPU
fleet; the GPU command is in bench/NOTES.md (issue 18).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from fleetctl.loadgen import BenchConfig, RequestSpec, send_request  # noqa: E402
from fleetctl.state import StateDir  # noqa: E402

MAX_RSS_DRIFT = 0.02
WARMUP_FRACTION = 0.25  # samples before this share of the run are warm-up


@dataclass
class Sample:
    t_s: float
    rss_bytes: dict[str, int]
    gpu_bytes: dict[str, int]
    num_running: dict[str, float]
    kv_usage: dict[str, float]


@dataclass
class SoakReport:
    duration_s: float
    concurrency: int
    num_ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    num_unsent_retries: int = 0
    samples: list[Sample] = field(default_factory=list)
    end_running: dict[str, float] = field(default_factory=dict)
    end_kv_usage: dict[str, float] = field(default_factory=dict)

    def rss_drift(self) -> dict[str, float]:
        return self._drift("rss_bytes")

    def gpu_drift(self) -> dict[str, float]:
        """As rss_drift, for the GPU memory of replicas that hold any."""
        return {rid: d for rid, d in self._drift("gpu_bytes").items() if d == d}

    def _drift(self, what: str) -> dict[str, float]:
        """Per replica: (median of the last 3 samples) / (median of the first 3 after warm-up) - 1
        (NaN where the first is 0: nothing to compare)."""
        warm = [s for s in self.samples if s.t_s >= WARMUP_FRACTION * self.duration_s]
        drift = {}
        for rid in getattr(warm[0], what) if len(warm) >= 6 else []:
            first = sorted(getattr(s, what).get(rid, 0) for s in warm[:3])[1]
            last = sorted(getattr(s, what).get(rid, 0) for s in warm[-3:])[1]
            drift[rid] = last / first - 1 if first else float("nan")
        return drift

    def problems(self) -> list[str]:
        found = []
        if self.errors:
            found.append(f"{sum(self.errors.values())} requests failed: {self.errors}")
        drift = self.rss_drift()
        if not drift:
            found.append("too few samples after warm-up to judge RSS")
        found += [f"{rid}: RSS drifted {d:+.1%}" for rid, d in drift.items() if not abs(d) <= MAX_RSS_DRIFT]
        found += [f"{rid}: GPU memory drifted {d:+.1%}" for rid, d in self.gpu_drift().items()
                  if abs(d) > MAX_RSS_DRIFT]
        found += [f"{rid}: {n:g} requests still running" for rid, n in self.end_running.items() if n]
        found += [f"{rid}: KV cache {u:.1%} used at the end" for rid, u in self.end_kv_usage.items() if u]
        return found

    def to_json(self) -> dict:
        return {"duration_s": self.duration_s, "concurrency": self.concurrency, "num_ok": self.num_ok,
                "errors": self.errors, "num_unsent_retries": self.num_unsent_retries,
                "rss_drift": self.rss_drift(), "gpu_drift": self.gpu_drift(), "end_running": self.end_running, "end_kv_usage": self.end_kv_usage,
                "problems": self.problems(), "samples": [s.__dict__ for s in self.samples]}


@dataclass
class Target:
    """What the soak sends to and samples: the fleet's HTTPS URL and, per replica, its process
    and its /metrics URL."""

    url: str
    ca_file: str
    api_key: str | None
    model: str
    metrics_urls: dict[str, str]  # replica id → /metrics (through NGINX's internal listener)
    pids: dict[str, int]          # replica id → process (the server; its children are counted too)
    gpu_index: dict[str, int] = field(default_factory=dict)  # replica id → GPU it holds alone

    @classmethod
    def from_fleet(cls, home: Path) -> "Target":
        """A fleetctl fleet from its state directory; pids from the local backend's registry."""
        state = StateDir(home).load()
        internal = f"http://127.0.0.1:{state.config.internal_port}"
        ids = [r.id for r in state.serving()]
        pids = {}
        for rid in ids:
            try:
                pids[rid] = json.loads((Path(home) / "local" / f"{rid}.json").read_text())["pid"]
            except (OSError, ValueError, KeyError):
                pass
        return cls(f"https://127.0.0.1:{state.config.https_port}", str(Path(home) / "tls" / "ca.pem"),
                   state.config.client_api_key or None, state.config.served_model_name,
                   {rid: f"{internal}/replicas/{rid}/metrics" for rid in ids}, pids)

    @property
    def replica_ids(self) -> list[str]:
        return list(self.metrics_urls)

    def gauges(self, rid: str) -> tuple[float, float]:
        """(requests running, KV-cache use 0..1) from the replica's /metrics."""
        with urllib.request.urlopen(self.metrics_urls[rid], timeout=10) as response:
            text = response.read().decode()

        def gauge(name: str) -> float:
            match = re.search(rf"^{name}\{{[^}}]*\}} (\S+)", text, re.MULTILINE)
            return float(match.group(1)) if match else float("nan")
        return gauge("pagefleet_num_requests_running"), gauge("pagefleet_kv_cache_usage_perc")

    def sample(self, t_s: float) -> Sample:
        rss, gpu, running, kv = {}, {}, {}, {}
        per_pid, per_gpu = gpu_memory_bytes(), gpu_used_bytes() if self.gpu_index else {}
        for rid in self.replica_ids:
            tree = process_tree(self.pids[rid]) if rid in self.pids else []
            rss[rid] = sum(rss_bytes(pid) for pid in tree)
            gpu[rid] = sum(per_pid.get(pid, 0) for pid in tree) or per_gpu.get(self.gpu_index.get(rid), 0)
            running[rid], kv[rid] = self.gauges(rid)
        return Sample(t_s, rss, gpu, running, kv)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (from /proc's parent links), `pid` first; [] once it is gone."""
    if not Path(f"/proc/{pid}").exists():
        return []
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ...
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gpu_used_bytes() -> dict[int, int]:
    """Used memory per GPU index (all processes on it); empty without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return {}
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    return {int(i): int(m) * 2**20 for i, m in (line.split(", ") for line in out.splitlines() if ", " in line)}


def gpu_memory_bytes() -> dict[int, int]:
    """GPU memory per process (pid → bytes); empty without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return {}
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    return {int(p): int(m) * 2**20 for p, m in (line.split(", ") for line in out.splitlines() if ", " in line)}


async def drive(fleet: Target, report: SoakReport, prompt_len: tuple[int, int], output_len: tuple[int, int],
                vocab_size: int) -> None:
    """`concurrency` workers, each sending one request after another until the time is up;
    even workers stream, odd ones do not."""
    configs = [BenchConfig(fleet.url, fleet.model, concurrency=report.concurrency, is_streaming=streaming,
                           api_key=fleet.api_key, ca_file=fleet.ca_file, timeout_s=120) for streaming in (True, False)]
    headers = {"Authorization": f"Bearer {fleet.api_key}"} if fleet.api_key else {}
    ctx = ssl.create_default_context(cafile=fleet.ca_file)
    started = time.perf_counter()
    deadline = started + report.duration_s

    async def worker(index: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(index)
        while time.perf_counter() < deadline:
            spec = RequestSpec(tuple(rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_len))),
                               rng.randint(*output_len))
            result = await send_request(session, configs[index % 2], index, spec, headers, started)
            report.num_unsent_retries += result.num_unsent_retries
            if result.is_ok:
                report.num_ok += 1
            else:
                key = f"{result.status}: {result.error[:80]}"
                report.errors[key] = report.errors.get(key, 0) + 1

    connector = aiohttp.TCPConnector(limit=report.concurrency, ssl=ctx)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(i, session) for i in range(report.concurrency)))


def soak(target: Target | Path, duration_s: float = 600, concurrency: int = 64, prompt_len=(64, 1024), output_len=(16, 512),
         vocab_size: int = 32000, sample_every_s: float = 10.0, settle_s: float = 30.0) -> SoakReport:
    fleet = target if isinstance(target, Target) else Target.from_fleet(target)
    report = SoakReport(duration_s, concurrency)
    stop = threading.Event()
    started = time.monotonic()

    def sampler() -> None:
        while not stop.wait(sample_every_s):
            try:
                report.samples.append(fleet.sample(time.monotonic() - started))
            except OSError:  # a replica busy past the timeout: skip this sample
                pass

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    try:
        asyncio.run(drive(fleet, report, prompt_len, output_len, vocab_size))
    finally:
        stop.set()
        thread.join(30)
    deadline = time.monotonic() + settle_s  # the last streams' blocks return as their requests end
    while True:
        end = {rid: fleet.gauges(rid) for rid in fleet.replica_ids}
        if all(r == 0 and kv == 0 for r, kv in end.values()) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    report.end_running = {rid: r for rid, (r, _) in end.items()}
    report.end_kv_usage = {rid: kv for rid, (_, kv) in end.items()}
    return report


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=None, help="the fleet's state dir (default: $PAGEFLEET_HOME)")
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt-len", type=_range, default=(64, 1024))
    parser.add_argument("--output-len", type=_range, default=(16, 512))
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--sample-every-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    home = args.home or StateDir().root
    report = soak(Target.from_fleet(home), args.duration_s, args.concurrency, args.prompt_len, args.output_len, args.vocab_size,
                  args.sample_every_s)
    document = report.to_json()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(document, indent=1))
    print(json.dumps({k: v for k, v in document.items() if k != "samples"}, indent=1))
    return 1 if report.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
