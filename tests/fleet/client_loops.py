"""Real clients in loops against the fleet's public URL (127.0.0.1 only): each kind sends one
small completion after another on its own pooled connection(s), as an application would, and
records what it saw. Used by the reload-race and abuse tests.

Kinds (KINDS): the openai client as shipped (2 retries) and with retries off, the ollama
client, httpx, aiohttp, curl (one process sending many requests, so it can reuse its
connection), and pagefleet's own load generator.
"""
from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import ollama
import openai

from tests.fleet.load import ClientThreads

KINDS = ("openai", "openai-no-retries", "ollama", "httpx", "aiohttp", "curl-http1.1", "curl-http2", "loadgen")
NUM_CURL_REQUESTS_PER_PROCESS = 20


@dataclass
class Tally:
    num_ok: int = 0
    errors: list[str] = field(default_factory=list)
    num_unsent_retries: int = 0  # the load generator's re-sends (fleetctl.loadgen.is_unsent)


class ClientLoops(ClientThreads):
    """`with ClientLoops(url, ca, model, api_key, kinds): ...` runs one thread per kind until
    the block ends; `tallies[kind]` says how many succeeded and what failed."""

    def __init__(self, url: str, ca_file: Path, model: str, api_key: str, kinds=KINDS, body_dir: Path | None = None):
        self.url, self.ca_file, self.model, self.api_key = url, Path(ca_file), model, api_key
        self.kinds = tuple(kinds)
        self.tallies = {kind: Tally() for kind in self.kinds}
        self.body = {"model": model, "prompt": "hi", "max_tokens": 1, "temperature": 0}
        self.body_file = (body_dir or self.ca_file.parent) / "client-loop-body.json"
        self._lock = threading.Lock()
        super().__init__()

    def _targets(self) -> list[tuple]:
        return [(self._guarded, (kind,)) for kind in self.kinds]

    def __enter__(self) -> "ClientLoops":
        self.body_file.write_text(json.dumps(self.body))
        return super().__enter__()

    def num_failed(self) -> int:
        return sum(len(t.errors) for t in self.tallies.values())

    def report(self) -> dict[str, str]:
        return {k: f"{t.num_ok} ok, {len(t.errors)} failed {t.errors[:3]}" for k, t in self.tallies.items()}

    def _record(self, kind: str, ok: bool, error: str = "") -> None:
        with self._lock:
            if ok:
                self.tallies[kind].num_ok += 1
            else:
                self.tallies[kind].errors.append(error[:300])

    def _guarded(self, kind: str) -> None:
        try:
            getattr(self, "_loop_" + kind.replace("-", "_").replace(".", "_"))(kind)
        except Exception as exc:  # a loop that dies must show as a failure, not as silence
            self._record(kind, False, f"client loop died: {type(exc).__name__}: {exc}")

    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _loop_openai(self, kind: str, max_retries: int = 2) -> None:
        with httpx.Client(verify=self._ssl()) as http:
            client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, http_client=http,
                                   max_retries=max_retries)
            while not self._stop.is_set():
                try:
                    answer = client.completions.create(model=self.model, prompt="hi", max_tokens=1, temperature=0)
                    self._record(kind, bool(answer.choices), "no choices")
                except openai.APIError as exc:
                    self._record(kind, False, f"{type(exc).__name__}: {exc} (cause: {exc.__cause__!r})")

    def _loop_openai_no_retries(self, kind: str) -> None:
        self._loop_openai(kind, max_retries=0)

    def _loop_ollama(self, kind: str) -> None:
        client = ollama.Client(host=self.url, verify=self._ssl(), headers={"Authorization": f"Bearer {self.api_key}"})
        while not self._stop.is_set():
            try:
                answer = client.generate(model=self.model, prompt="hi", options={"num_predict": 1, "temperature": 0})
                self._record(kind, bool(answer.done), "not done")
            except Exception as exc:  # ollama.ResponseError, httpx errors
                self._record(kind, False, repr(exc))

    def _loop_httpx(self, kind: str) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        with httpx.Client(base_url=self.url, verify=self._ssl(), headers=headers, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    response = client.post("/v1/completions", json=self.body)
                    self._record(kind, response.status_code == 200, f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    self._record(kind, False, repr(exc))

    def _loop_aiohttp(self, kind: str) -> None:
        async def loop() -> None:
            headers = {"Authorization": f"Bearer {self.api_key}"}
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl()), headers=headers) as s:
                while not self._stop.is_set():
                    try:
                        async with s.post(f"{self.url}/v1/completions", json=self.body) as response:
                            text = await response.text()
                            self._record(kind, response.status == 200, f"{response.status} {text[:200]}")
                    except aiohttp.ClientError as exc:
                        self._record(kind, False, repr(exc))
        asyncio.run(loop())

    def _curl(self, kind: str, version_flag: str) -> None:
        # Options apply per URL after --next, so every request repeats them all.
        one = ["--cacert", str(self.ca_file), version_flag, "-o", "/dev/null", "-w", "%{http_code}\n",
               "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {self.api_key}",
               "--data-binary", f"@{self.body_file}", f"{self.url}/v1/completions"]
        args = ["curl", "-sS"] + one
        for _ in range(NUM_CURL_REQUESTS_PER_PROCESS - 1):
            args += ["--next", *one]
        while not self._stop.is_set():
            result = subprocess.run(args, capture_output=True, text=True, timeout=120)
            codes = result.stdout.split()
            for code in codes:
                self._record(kind, code == "200", f"HTTP {code}: {result.stderr.strip()[-200:]}")
            if len(codes) < NUM_CURL_REQUESTS_PER_PROCESS:
                self._record(kind, False, f"curl exited {result.returncode}: {result.stderr.strip()[-200:]}")

    def _loop_curl_http1_1(self, kind: str) -> None:
        self._curl(kind, "--http1.1")

    def _loop_curl_http2(self, kind: str) -> None:
        self._curl(kind, "--http2")

    def _loop_loadgen(self, kind: str) -> None:
        from fleetctl.loadgen import BenchConfig, make_requests, run_benchmark

        config = BenchConfig(self.url, self.model, concurrency=2, is_streaming=True, api_key=self.api_key,
                             ca_file=str(self.ca_file), timeout_s=60)
        while not self._stop.is_set():
            requests = make_requests(8, (4, 16), (1, 2), vocab_size=400)
            for result in asyncio.run(run_benchmark(config, requests)).results:
                self._record(kind, result.is_ok, f"{result.status}: {result.error}")
                with self._lock:
                    self.tallies[kind].num_unsent_retries += result.num_unsent_retries
