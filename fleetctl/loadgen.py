"""Load generator for any OpenAI-compatible `/v1/completions` endpoint: a replica or the fleet.

Requests are the workloads of WORKLOADS.md: random token-id prompts (sent as `prompt: [ids]`, so
no tokenizer is involved) and exact output lengths (`max_tokens: n` with `ignore_eos: true`, the
vLLM extension that pagefleet's server accepts too). Arrivals are open loop (Poisson at
`request_rate` requests/s; `inf`: all at once) and optionally capped at `concurrency` requests in
flight; a cap with `inf` rate is the fixed-concurrency mode of W4. Timing starts when a request is sent (after waiting for the cap).

What is measured, per request: TTFT (send → first token chunk), the gaps between token chunks
(inter-token latency; one chunk normally carries one token), e2e, output tokens (the server's
`usage` when it reports one, else the number of token chunks). The report (fleetctl.loadgen_report)
turns these into requests/s, output tokens/s, percentiles, errors by status and a timeline.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np


@dataclass(frozen=True)
class Workload:
    num_requests: int
    prompt_len: tuple[int, int]    # inclusive range, drawn uniformly
    output_len: tuple[int, int]
    concurrency: int | None        # None: no cap


# WORKLOADS.md. W3 is "all at once"; over HTTP that is every request in flight together.
WORKLOADS = {
    "W3": Workload(num_requests=1000, prompt_len=(64, 1024), output_len=(16, 512), concurrency=None),
    "W4": Workload(num_requests=1000, prompt_len=(64, 1024), output_len=(16, 512), concurrency=128),
}


@dataclass(frozen=True)
class RequestSpec:
    prompt_token_ids: tuple[int, ...]
    num_output_tokens: int


def make_requests(num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int], *,
                  vocab_size: int, seed: int = 0) -> list[RequestSpec]:
    """Seeded random prompts and exact output lengths, both uniform over inclusive ranges."""
    for name, (low, high) in (("prompt_len", prompt_len), ("output_len", output_len)):
        if not 1 <= low <= high:
            raise ValueError(f"{name} must be a range 1 <= low <= high, got {low}:{high}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(prompt_len[0], prompt_len[1], size=num_requests, endpoint=True)
    output_lens = rng.integers(output_len[0], output_len[1], size=num_requests, endpoint=True)
    return [RequestSpec(tuple(rng.integers(0, vocab_size, size=int(p)).tolist()), int(o))
            for p, o in zip(prompt_lens, output_lens)]


@dataclass
class BenchConfig:
    base_url: str                       # http(s)://host:port, with or without a trailing /v1
    model: str
    concurrency: int | None = 128       # None: no cap (pure open loop)
    request_rate: float = math.inf      # requests/s, Poisson arrivals; inf: all at once
    is_streaming: bool = True
    ignore_eos: bool = True             # False for servers without the extension: outputs may end early
    api_key: str | None = None
    ca_file: str | None = None          # CA bundle for the fleet's TLS (fleetctl's tls/ca.pem)
    timeout_s: float = 600.0            # longest wait for any single read
    seed: int = 0                       # seeds the arrival times

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 (or None for no cap), got {self.concurrency}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 requests/s (inf: all at once), got {self.request_rate}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")

    @property
    def completions_url(self) -> str:
        return self.base_url.rstrip("/").removesuffix("/v1") + "/v1/completions"


@dataclass
class RequestResult:
    index: int
    num_prompt_tokens: int
    num_output_tokens_expected: int
    status: int | str = 0               # HTTP status, or the name of what went wrong before one
    error: str = ""
    start_s: float = 0.0                # send time, relative to the start of the run
    ttft_s: float | None = None
    e2e_s: float | None = None
    num_output_tokens: int = 0
    chunk_times_s: list[float] = field(default_factory=list)   # token chunk arrivals, since send
    # Sends lost before NGINX answered a byte (the connection was closed or reset under the
    # request, as at an NGINX reload), each re-sent as the openai client does (`is_unsent`).
    num_unsent_retries: int = 0

    @property
    def is_ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times_s, self.chunk_times_s[1:])]


@dataclass
class BenchRun:
    config: BenchConfig
    results: list[RequestResult]
    duration_s: float                   # first send → last response end


def request_body(config: BenchConfig, spec: RequestSpec) -> dict:
    body = {"model": config.model, "prompt": list(spec.prompt_token_ids), "max_tokens": spec.num_output_tokens,
            "temperature": 0.0, "stream": config.is_streaming}
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.is_streaming:
        body["stream_options"] = {"include_usage": True}
    return body


def arrival_times_s(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Send times of an open-loop Poisson process (exponential gaps); all 0 for an infinite rate."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=num_requests)
    return np.cumsum(gaps).tolist()


async def run_benchmark(config: BenchConfig, requests: list[RequestSpec],
                        on_result: Callable[[RequestResult], None] | None = None) -> BenchRun:
    """Send every request, wait for all of them, and return what each one measured."""
    ssl_context = ssl.create_default_context(cafile=config.ca_file) if config.ca_file else None
    # One pooled connection per request that may be in flight at once; no cap without a concurrency cap.
    connector = aiohttp.TCPConnector(limit=config.concurrency or 0, ssl=ssl_context or True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=config.timeout_s)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    cap = asyncio.Semaphore(config.concurrency) if config.concurrency else None
    run_start = time.perf_counter()

    async def one(index: int, spec: RequestSpec, send_at_s: float) -> RequestResult:
        await asyncio.sleep(max(0.0, send_at_s - (time.perf_counter() - run_start)))
        if cap is None:
            return await send_request(session, config, index, spec, headers, run_start)
        async with cap:
            return await send_request(session, config, index, spec, headers, run_start)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        arrivals = arrival_times_s(len(requests), config.request_rate, config.seed)
        tasks = [asyncio.create_task(one(i, spec, t)) for i, (spec, t) in enumerate(zip(requests, arrivals))]
        for task in asyncio.as_completed(tasks):
            result = await task
            if on_result:
                on_result(result)
    results = sorted((t.result() for t in tasks), key=lambda r: r.index)
    ends = [r.start_s + r.e2e_s for r in results if r.e2e_s is not None]
    first_send = min((r.start_s for r in results), default=0.0)
    return BenchRun(config, results, duration_s=max(ends, default=first_send) - first_send)


async def send_request(session: aiohttp.ClientSession, config: BenchConfig, index: int, spec: RequestSpec,
                       headers: dict, run_start: float) -> RequestResult:
    """One request, measured; never raises (what went wrong is in the result's status)."""
    result = RequestResult(index, len(spec.prompt_token_ids), spec.num_output_tokens)
    sent = time.perf_counter()
    result.start_s = sent - run_start
    try:
        async with _post_resending_unsent(session, config, spec, headers, result) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.error = (await resp.text())[:300]
            elif config.is_streaming:
                await _read_stream(resp, result, sent)
            else:
                payload = await resp.json()
                result.ttft_s = time.perf_counter() - sent
                result.num_output_tokens = int((payload.get("usage") or {}).get("completion_tokens", 0))
    except UnsentError as exc:
        result.status, result.error = "unsent", str(exc)[:300]
    except asyncio.TimeoutError:
        result.status, result.error = "timeout", f"no data for {config.timeout_s:g} s"
    except aiohttp.ClientError as exc:
        result.status, result.error = type(exc).__name__, str(exc)[:300]
    except ValueError as exc:   # a body or SSE chunk that is not the JSON it should be
        result.status, result.error = "bad_response", str(exc)[:300]
    result.e2e_s = time.perf_counter() - sent
    return result


MAX_UNSENT_RETRIES = 2   # the openai client's default max_retries
UNSENT_RETRY_DELAY_S = 0.5


def is_unsent(exc: BaseException) -> bool:
    """A request that never reached a server that could answer it: the connection was refused,
    closed or reset before a single byte of the response came. Raised while `session.post`
    waits for the status line, so nothing of the response was seen; NGINX had not accepted
    the request (or had, on a connection it was closing, without passing it on)."""
    if isinstance(exc, aiohttp.ClientSSLError):   # a certificate problem: sending again cannot help
        return False
    return isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectorError)) or (
        isinstance(exc, aiohttp.ClientOSError) and exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED))


@contextlib.asynccontextmanager
async def _post_resending_unsent(session: aiohttp.ClientSession, config: BenchConfig, spec: RequestSpec,
                                 headers: dict, result: RequestResult):
    """POST, re-sent up to MAX_UNSENT_RETRIES times when it was never answered (`is_unsent`),
    after UNSENT_RETRY_DELAY_S, on a new connection. A request that got any answer is never
    re-sent (generations are not idempotent); an unsent one that still fails is an error of
    status "unsent", apart from failures after NGINX answered."""
    body = request_body(config, spec)
    for attempt in range(MAX_UNSENT_RETRIES + 1):
        try:
            resp = await session.post(config.completions_url, json=body, headers=headers)
            break
        except aiohttp.ClientError as exc:
            if not is_unsent(exc):
                raise
            if attempt == MAX_UNSENT_RETRIES:
                raise UnsentError(f"{type(exc).__name__}: {exc}") from exc
            result.num_unsent_retries += 1
            await asyncio.sleep(UNSENT_RETRY_DELAY_S)
    async with resp:
        yield resp


class UnsentError(Exception):
    """Every send of a request was lost before any answer."""


async def _read_stream(resp: aiohttp.ClientResponse, result: RequestResult, sent: float) -> None:
    """Read an SSE completion stream; a stream that ends without `data: [DONE]` is an error."""
    usage_tokens = None
    async for raw_line in resp.content:
        line = raw_line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            result.num_output_tokens = usage_tokens if usage_tokens is not None else len(result.chunk_times_s)
            return
        chunk = json.loads(data)
        if "error" in chunk:
            result.status, result.error = "stream_error", json.dumps(chunk["error"])[:300]
            return
        # A chunk carries new tokens unless it is only the closing one (finish_reason set, no text).
        # Empty-text chunks before that are tokens too (a UTF-8 sequence still incomplete).
        if any(c.get("text") or c.get("finish_reason") is None for c in chunk.get("choices") or []):
            now = time.perf_counter() - sent
            if result.ttft_s is None:
                result.ttft_s = now
            result.chunk_times_s.append(now)
        if chunk.get("usage"):
            usage_tokens = int(chunk["usage"].get("completion_tokens", 0))
    result.status, result.error = "incomplete_stream", "the stream ended without data: [DONE]"


async def fetch_model_name(base_url: str, api_key: str | None = None, ca_file: str | None = None) -> str:
    """The first model id `/v1/models` lists: the fleet's served model name."""
    ssl_context = ssl.create_default_context(cafile=ca_file) if ca_file else True
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/models"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(url, headers=headers, ssl=ssl_context) as resp:
            resp.raise_for_status()
            models = (await resp.json()).get("data") or []
    if not models:
        raise ValueError(f"{url} lists no models: pass --model")
    return models[0]["id"]
