"""Disconnects, a responsive event loop, backpressure and the SIGTERM drain, on real processes."""
import json
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.conftest import API_KEY, TINY_NAME, ServerProcess, engine_idle, scrape, \
    tiny_server_args

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"model": TINY_NAME, "prompt": [1, 2, 3], "max_tokens": 250, "temperature": 0.8}


def _wait_for(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_disconnect_mid_stream_aborts_and_frees_blocks(tiny_server):
    before = scrape(tiny_server.url)["pagefleet_generation_tokens_total"]
    with httpx.Client(base_url=tiny_server.url, headers=AUTH, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={**LONG, "stream": True, "n": 4}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first[5:])["choices"]
            busy = scrape(tiny_server.url)
            assert busy["pagefleet_num_requests_running"] == 4      # n=4: four sequences
            assert busy["pagefleet_kv_cache_usage_perc"] > 0
        # leaving the block closed the connection mid-stream
    idle = engine_idle(tiny_server.url)
    assert idle["pagefleet_num_requests_running"] == 0
    assert idle["pagefleet_kv_cache_usage_perc"] == 0
    generated = idle["pagefleet_generation_tokens_total"] - before
    assert generated < 4 * 250, "the request ran to the end instead of being aborted"


def test_disconnect_while_waiting_for_a_non_streamed_answer(tiny_server):
    before = scrape(tiny_server.url)["pagefleet_generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server.url + "/v1/completions", headers=AUTH, timeout=0.3,
                   json={**LONG, "n": 8})
    idle = engine_idle(tiny_server.url)
    assert idle["pagefleet_num_requests_running"] == 0
    assert idle["pagefleet_kv_cache_usage_perc"] == 0
    assert idle["pagefleet_generation_tokens_total"] - before < 8 * 250


def test_health_answers_fast_while_the_engine_is_busy(tiny_server):
    stop = threading.Event()

    def load():
        with httpx.Client(base_url=tiny_server.url, headers=AUTH, timeout=60) as client:
            while not stop.is_set():
                client.post("/v1/completions", json={**LONG, "n": 4, "max_tokens": 100})

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(load)
        _wait_for(lambda: scrape(tiny_server.url)["pagefleet_num_requests_running"] > 0,
                  what="the engine to be busy")
        latencies = []
        with httpx.Client(base_url=tiny_server.url) as client:
            for _ in range(20):
                start = time.monotonic()
                assert client.get("/health").status_code == 200
                latencies.append(time.monotonic() - start)
                time.sleep(0.02)
        stop.set()
    assert statistics.median(latencies) < 0.05
    assert max(latencies) < 0.1, latencies
    engine_idle(tiny_server.url, timeout_s=30)


# ---- one starved server: backpressure, then the drain that ends it -----------------------

@pytest.fixture(scope="module")
def one_seq_server(tiny_model, tmp_path_factory):
    """One running sequence at a time and a waiting queue of one."""
    server = ServerProcess(
        tiny_server_args(tiny_model, "--api-key", API_KEY, "--max-num-seqs", "1",
                         "--max-queue", "1", "--drain-timeout", "60"),
        tmp_path_factory.mktemp("logs") / "one-seq.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _stream_text(url: str, body: dict, first_chunk: threading.Event | None = None) -> dict:
    """Streams a completion; returns its text, finish reason and HTTP status."""
    text, finish = "", None
    with httpx.Client(headers=AUTH, timeout=120) as client:
        with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
                if first_chunk is not None:
                    first_chunk.set()
            return {"status": r.status_code, "text": text, "finish_reason": finish}


def test_full_waiting_queue_answers_503_with_retry_after(one_seq_server):
    url = one_seq_server.url
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(_stream_text, url, LONG)
        _wait_for(lambda: scrape(url)["pagefleet_num_requests_running"] == 1, what="running")
        waiting = pool.submit(_stream_text, url, LONG)
        _wait_for(lambda: scrape(url)["pagefleet_num_requests_waiting"] == 1, what="waiting")
        r = httpx.post(url + "/v1/completions", headers=AUTH, json={**LONG, "max_tokens": 2})
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        r = httpx.post(url + "/api/generate", headers=AUTH,
                       json={"model": TINY_NAME, "prompt": "x", "stream": False})
        assert r.status_code == 503 and "queue" in r.json()["error"]
        assert running.result()["finish_reason"] == "length"
        assert waiting.result()["finish_reason"] == "length"
    assert scrape(url)['pagefleet_http_requests_total{route="/v1/completions",status="503"}'] == 1


def test_sigterm_drains_in_flight_requests_then_exits_0(one_seq_server):
    url = one_seq_server.url
    started = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(_stream_text, url, {**LONG, "max_tokens": 200}, started)
        started.wait(30)
        queued = pool.submit(_stream_text, url, {**LONG, "max_tokens": 200})
        _wait_for(lambda: scrape(url)["pagefleet_num_requests_waiting"] == 1, what="queued")
        one_seq_server.signal(signal.SIGTERM)
        _wait_for(lambda: httpx.get(url + "/ready").status_code == 503, what="/ready 503")
        assert httpx.get(url + "/health").status_code == 200          # still alive meanwhile
        r = httpx.post(url + "/v1/completions", headers=AUTH, json={**LONG, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        # both the running and the queued request were admitted before SIGTERM: they finish
        assert running.result()["finish_reason"] == "length"
        assert queued.result()["finish_reason"] == "length"
    assert one_seq_server.proc.wait(30) == 0


def test_drain_timeout_aborts_long_requests_cleanly_and_still_exits_0(tiny_model, tmp_path):
    server = ServerProcess(tiny_server_args(tiny_model, "--api-key", API_KEY,
                                            "--drain-timeout", "0"), tmp_path / "cut.log")
    server.wait_ready()
    finishes: list = []
    lines: list[str] = []
    try:
        with httpx.Client(headers=AUTH, timeout=60) as client:
            with client.stream("POST", server.url + "/v1/completions",
                               json={**LONG, "n": 8, "stream": True}) as r:
                for line in r.iter_lines():
                    if not lines:
                        server.signal(signal.SIGTERM)      # after the first event
                    lines.append(line)
                    if line.startswith("data: {"):
                        finishes += [c["finish_reason"] for c in json.loads(line[6:])["choices"]]
    finally:
        started_s = time.monotonic()
        assert server.proc.wait(20) == 0
        server.stop()
    assert time.monotonic() - started_s < 10
    # the samples still running are aborted: the stream ends whole, not cut mid-body
    assert [line for line in lines if line][-1] == "data: [DONE]"
    assert "abort" in finishes
    assert finishes.count("length") < 8, "all samples ran to the end despite the drain timeout"
