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

from pathlib import Path

import aiohttp
import click
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fleetctl import loadgen_report


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


def fleet_defaults(state_dir) -> dict:
    """`fleetctl bench` aims at the fleet when there is one: its HTTPS URL, its CA and the key
    fleetctl sends (each still overridden by the option or its environment variable). The CLI
    hands these to click as the command's default_map."""
    if not state_dir.has_fleet():
        return {}
    from fleetctl.tls import planned_paths

    config = state_dir.load().config
    defaults = {"base_url": config.public_url}
    ca = planned_paths(state_dir.tls_dir, config.tls_cert, config.tls_key).ca
    if ca and ca.exists():
        defaults["ca_file"] = str(ca)
    if config.client_api_key:
        defaults["api_key"] = config.client_api_key
    return defaults


def _parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise click.BadParameter(f"expected N or LOW:HIGH, got {text!r}") from None


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base-url", required=True, envvar="PAGEFLEET_URL",
              help="OpenAI-compatible server: the fleet (https://HOST:PORT) or one replica (http://127.0.0.1:8001).")
@click.option("--model", help="Model name to send. Default: the first one /v1/models lists.")
@click.option("--workload", type=click.Choice(sorted(WORKLOADS)), default="W4", show_default=True,
              help="Preset from WORKLOADS.md; the options below override its fields.")
@click.option("--num-requests", type=click.IntRange(min=1), help="Requests to send.")
@click.option("--prompt-len", type=_parse_range, metavar="N|LOW:HIGH",
              help="Prompt tokens: N or LOW:HIGH (uniform).")
@click.option("--output-len", type=_parse_range, metavar="N|LOW:HIGH",
              help="Output tokens, exact: N or LOW:HIGH (uniform).")
@click.option("--concurrency", type=click.IntRange(min=0), help="Cap on requests in flight; 0: no cap.")
@click.option("--request-rate", type=float, default=math.inf, show_default=True,
              help="Open-loop Poisson arrivals, requests/s; inf sends all at once.")
@click.option("--vocab-size", type=click.IntRange(min=2), default=32000, show_default=True,
              help="Prompt token ids are drawn from [0, vocab-size): keep it within the model's vocabulary.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-stream", is_flag=True, help="Non-streaming requests (TTFT is then the whole response).")
@click.option("--no-ignore-eos", is_flag=True,
              help="Do not send ignore_eos (servers without it); outputs may then end before their length.")
@click.option("--api-key", envvar="PAGEFLEET_API_KEY", help="Bearer token (env PAGEFLEET_API_KEY).")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), help="CA to verify the fleet's TLS with.")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True,
              help="Longest silence on one request, seconds.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write results as JSON here, and latency/throughput charts to the same name with .png.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
def bench_command(base_url, model, workload, num_requests, prompt_len, output_len, concurrency, request_rate,
                  vocab_size, seed, no_stream, no_ignore_eos, api_key, ca_file, timeout_s, out, as_json) -> None:
    """Load-test an OpenAI-compatible completions endpoint and report throughput and latency.

    Prompts are random token ids; every request generates exactly its output length
    (ignore_eos). Exit status: 0 when every request succeeded, 1 when any failed.

    \b
    Examples:
      # W4: 1000 mixed requests at concurrency 128, through the fleet's NGINX
      bench --base-url https://localhost:8443 --ca-file tls/ca.pem --out bench/results/w4.json
      # 32 requests of 512 in / 128 out at 4 requests/s against one replica
      bench --base-url http://127.0.0.1:8001 --num-requests 32 --prompt-len 512 \\
            --output-len 128 --request-rate 4 --concurrency 0
    """
    preset = WORKLOADS[workload]
    cap = preset.concurrency if concurrency is None else (concurrency or None)
    workload_info = {"preset": workload, "num_requests": num_requests or preset.num_requests,
                     "prompt_len": prompt_len or preset.prompt_len, "output_len": output_len or preset.output_len,
                     "vocab_size": vocab_size, "seed": seed}
    try:
        requests = make_requests(workload_info["num_requests"], workload_info["prompt_len"],
                                 workload_info["output_len"], vocab_size=vocab_size, seed=seed)
        model = model or asyncio.run(fetch_model_name(base_url, api_key, ca_file))
        config = BenchConfig(base_url, model, concurrency=cap, request_rate=request_rate,
                             is_streaming=not no_stream, ignore_eos=not no_ignore_eos, api_key=api_key,
                             ca_file=ca_file, timeout_s=timeout_s, seed=seed)
    except (ValueError, aiohttp.ClientError) as exc:
        raise click.ClickException(f"{exc}") from None
    run = _run_with_progress(config, requests, Console(stderr=True))
    summary = loadgen_report.summarize(run)
    bins = loadgen_report.timeline(run)
    title = f"{workload_info['num_requests']} requests, concurrency {cap or 'uncapped'}, {base_url}"
    if as_json:
        click.echo(json.dumps(loadgen_report.finite_json(summary), indent=2))
    else:
        loadgen_report.print_report(summary, title=title)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        loadgen_report.write_json(out, run, summary, bins, workload_info)
        is_png = loadgen_report.write_png(out.with_suffix(".png"), run, bins, title=title)
        click.echo(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if is_png else
                                     " (no PNG: install matplotlib for charts)"), err=True)
    if summary["num_errors"]:
        click.get_current_context().exit(1)


def _run_with_progress(config: BenchConfig, requests: list[RequestSpec], console: Console) -> BenchRun:
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("errors: {task.fields[errors]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("requests", total=len(requests), errors=0)
        num_errors = 0

        def on_result(result: RequestResult) -> None:
            nonlocal num_errors
            num_errors += not result.is_ok
            progress.update(task, advance=1, errors=num_errors)

        return asyncio.run(run_benchmark(config, requests, on_result))


def main(argv: list[str] | None = None) -> int:
    """Entry point for `bench/serve.py`; returns the exit status. (`fleetctl bench` can add
    `bench_command` to its click group instead.)"""
    try:
        return bench_command.main(args=argv, prog_name="bench", standalone_mode=False) or 0
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 130
