"""Bounded load generators for the fleet tests, through NGINX over HTTPS: `Load` (small
completions from a few threads) and `MixedLoad` (every kind of client a fleet serves), each
recording every request's outcome and stopping by itself after `max_s`."""
from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass

import httpx
import openai

from tests.fleet.conftest import API_KEY, SERVED_NAME


class ClientThreads:
    """Client threads from `__enter__` until `__exit__`: `_targets()` lists each thread's
    (function, args); the functions end when `_stop` is set, and `__exit__` joins them."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _targets(self) -> list[tuple]:
        raise NotImplementedError

    def __enter__(self):
        for target, args in self._targets():
            thread = threading.Thread(target=target, args=args, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


@dataclass
class Result:
    t_start: float
    t_end: float
    status: int  # 0: no HTTP answer
    error: str = ""
    kind: str = "completions"

    @property
    def ok(self) -> bool:
        return self.status == 200


class Load(ClientThreads):
    """A steady load of small completions through NGINX from `num_clients` threads, one request
    in flight each, against 127.0.0.1 only; bounded by max_s and max_requests."""

    def __init__(self, url: str, ctx: ssl.SSLContext, num_clients: int = 4, max_s: float = 180.0,
                 max_requests: int = 20000) -> None:
        self.url, self.ctx = url, ctx
        self.num_clients, self.max_s, self.max_requests = num_clients, max_s, max_requests
        self.results: list[Result] = []
        self.num_stale_connection_retries = 0
        self._lock = threading.Lock()
        super().__init__()

    def _targets(self) -> list[tuple]:
        return [(self._client, (index,)) for index in range(self.num_clients)]

    def __enter__(self) -> "Load":
        self._deadline = time.monotonic() + self.max_s
        return super().__enter__()

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
                    result = Result(t_start, time.monotonic(), 0, describe_transport_error(exc))
                with self._lock:
                    self.results.append(result)

    def _post(self, client: httpx.Client, body: dict) -> httpx.Response:
        """One request, sent again once if the server closed the kept-alive connection before
        answering a single byte: an NGINX reload closes its old workers' idle connections, and a
        request racing that close was never read. curl, browsers and the openai client retry
        this case too (RFC 9112 9.3.1); a request that got any answer is never re-sent."""
        return self._once_more_if_stale(lambda: client.post("/v1/completions", json=body))

    def _once_more_if_stale(self, send):
        try:
            return send()
        except Exception as exc:
            if not is_unanswered_stale_connection(exc):
                raise
            with self._lock:
                self.num_stale_connection_retries += 1
            return send()

    def wait_for_ok(self, num_ok: int, since: float = 0.0, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.ok(since)) < num_ok:
            assert time.monotonic() < self._deadline and len(self.results) < self.max_requests, (
                f"the load itself ended (max_s {self.max_s}, max_requests {self.max_requests}) before "
                f"{num_ok} requests succeeded: give it more")
            assert time.monotonic() < deadline, f"only {len(self.ok(since))} of {num_ok} requests succeeded"
            time.sleep(0.05)

    def ok(self, since: float = 0.0) -> list[Result]:
        with self._lock:
            return [r for r in self.results if r.ok and r.t_start >= since]

    def failures(self) -> list[Result]:
        with self._lock:
            return [r for r in self.results if not r.ok]


def describe_transport_error(exc: BaseException) -> str:
    """The error and the causes under it ("APIConnectionError: Connection error." alone does not
    say whether the connection was refused, reset or closed unanswered)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen and len(parts) < 4:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " <- ".join(parts)


def is_unanswered_stale_connection(exc: BaseException | None) -> bool:
    """httpx's error for a kept-alive connection closed before a single byte of the answer came
    (also when the openai client wraps it as APIConnectionError)."""
    while exc is not None:
        if isinstance(exc, httpx.RemoteProtocolError) and "without sending a response" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class MixedLoad(Load):
    """Every kind of client a fleet serves, one request in flight per client thread, all naming
    SERVED_NAME, through NGINX over HTTPS (127.0.0.1 only), bounded like `Load`. Client i runs
    KINDS[i % len(KINDS)]:

      completions         httpx, non-streaming
      chat                openai client, non-streaming
      completions-stream  openai client, streaming: must end with a finish_reason
      chat-stream         openai client, streaming: must end with a finish_reason
      raw-sse             httpx, streaming: the raw SSE must end with `data: [DONE]`

    A request fails on any non-2xx answer, any transport error, or a stream that ends without its
    end. The only re-send is `Load`'s: once, when NGINX closed a kept-alive connection before
    answering a single byte."""

    KINDS = ("completions", "chat", "completions-stream", "chat-stream", "raw-sse")
    MAX_TOKENS = 6

    def __init__(self, url: str, ctx: ssl.SSLContext, num_clients: int = len(KINDS), **kwargs) -> None:
        super().__init__(url, ctx, num_clients, **kwargs)
        self.num_raw_done = 0  # raw SSE streams seen ending with data: [DONE]

    def _client(self, index: int) -> None:
        kind = self.KINDS[index % len(self.KINDS)]
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=self.url, verify=self.ctx, headers=headers, timeout=60.0) as http:
            api = openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, http_client=http, max_retries=0)
            send = getattr(self, "_" + kind.replace("-", "_"))
            while not self._stop.is_set() and time.monotonic() < self._deadline \
                    and len(self.results) < self.max_requests:
                t_start = time.monotonic()
                try:
                    status, error = self._once_more_if_stale(lambda: send(http, api, index))
                except openai.APIStatusError as exc:
                    status, error = exc.status_code, str(exc)[:200]
                except (httpx.HTTPError, openai.APIError) as exc:
                    status, error = 0, describe_transport_error(exc)[:300]
                with self._lock:
                    self.results.append(Result(t_start, time.monotonic(), status, error, kind))

    def _completions(self, http: httpx.Client, api, index: int) -> tuple[int, str]:
        response = http.post("/v1/completions", json={"model": SERVED_NAME, "prompt": f"client {index} says",
                                                      "max_tokens": self.MAX_TOKENS})
        return response.status_code, "" if response.status_code == 200 else response.text[:200]

    def _chat(self, http: httpx.Client, api, index: int) -> tuple[int, str]:
        answer = api.chat.completions.create(model=SERVED_NAME, max_tokens=self.MAX_TOKENS,
                                             messages=[{"role": "user", "content": f"Hi from {index}"}])
        return (200, "") if answer.choices[0].finish_reason else (200, "no finish_reason")

    def _completions_stream(self, http: httpx.Client, api, index: int) -> tuple[int, str]:
        finish = None
        for chunk in api.completions.create(model=SERVED_NAME, prompt=f"client {index} streams",
                                            max_tokens=self.MAX_TOKENS, stream=True):
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
        return (200, "") if finish else (200, "stream ended without a finish_reason")

    def _chat_stream(self, http: httpx.Client, api, index: int) -> tuple[int, str]:
        finish = None
        for chunk in api.chat.completions.create(model=SERVED_NAME, max_tokens=self.MAX_TOKENS, stream=True,
                                                 messages=[{"role": "user", "content": f"Stream {index}"}]):
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
        return (200, "") if finish else (200, "stream ended without a finish_reason")

    def _raw_sse(self, http: httpx.Client, api, index: int) -> tuple[int, str]:
        body = {"model": SERVED_NAME, "prompt": f"client {index} reads raw", "max_tokens": self.MAX_TOKENS,
                "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line.strip()]
        if response.status_code != 200:
            return response.status_code, " ".join(lines)[:200]
        if not lines or lines[-1] != "data: [DONE]":
            return 200, f"raw SSE ended with {lines[-1:]!r}, not data: [DONE]"
        with self._lock:
            self.num_raw_done += 1
        return 200, ""

    def ok(self, since: float = 0.0) -> list[Result]:
        with self._lock:
            return [r for r in self.results if r.ok and not r.error and r.t_start >= since]

    def failures(self) -> list[Result]:
        with self._lock:
            return [r for r in self.results if not r.ok or r.error]

    def summary(self) -> str:
        """One line for the test log (`pytest -s`): what ran, what failed, what was re-sent."""
        return (f"{len(self.results)} requests, {len(self.failures())} failed, ok by kind {self.num_ok_by_kind()}, "
                f"{self.num_raw_done} raw SSE streams ended with [DONE], "
                f"{self.num_stale_connection_retries} re-sent (stale kept-alive connection, no byte answered)")

    def num_ok_by_kind(self, since: float = 0.0, until: float = float("inf")) -> dict[str, int]:
        with self._lock:
            done = [r for r in self.results if r.ok and not r.error and since <= r.t_start and r.t_end <= until]
        return {kind: sum(1 for r in done if r.kind == kind) for kind in self.KINDS}
