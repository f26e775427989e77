"""The load generator: workloads, arrivals, and what it measures, against a scripted SSE server
whose timings are known, then briefly against a real replica (skipped until one exists)."""
import asyncio
import json
import math
import threading

import pytest
from aiohttp import web

from fleetctl import loadgen_report
from fleetctl.bench_cli import main
from fleetctl.loadgen import (WORKLOADS, BenchConfig, arrival_times_s, make_requests, request_body,
                              run_benchmark)
from tests.ops.conftest import free_port

TOKEN_GAP_S = 0.02


def test_w3_requests_are_seeded_and_within_the_ranges():
    w3 = WORKLOADS["W3"]
    requests = make_requests(w3.num_requests, w3.prompt_len, w3.output_len, vocab_size=128256, seed=0)
    assert requests == make_requests(w3.num_requests, w3.prompt_len, w3.output_len, vocab_size=128256, seed=0)
    assert requests != make_requests(w3.num_requests, w3.prompt_len, w3.output_len, vocab_size=128256, seed=1)
    prompt_lens = [len(r.prompt_token_ids) for r in requests]
    output_lens = [r.num_output_tokens for r in requests]
    assert len(requests) == 1000 and WORKLOADS["W4"].concurrency == 128
    assert 64 <= min(prompt_lens) <= max(prompt_lens) <= 1024 and 16 <= min(output_lens) <= max(output_lens) <= 512
    # Pinned: results of different runs and versions compare only if W3 stays the same requests.
    assert (sum(prompt_lens), sum(output_lens), prompt_lens[:3], output_lens[:3]) == \
        (559349, 268435, [881, 676, 555], [291, 56, 108])
    assert all(0 <= t < 128256 for r in requests[:20] for t in r.prompt_token_ids)


def test_a_request_asks_for_exactly_its_output_length():
    spec = make_requests(1, (5, 5), (7, 7), vocab_size=100)[0]
    body = request_body(BenchConfig("http://127.0.0.1:1", "m"), spec)
    assert body["prompt"] == list(spec.prompt_token_ids) and len(body["prompt"]) == 5
    assert (body["max_tokens"], body["ignore_eos"], body["stream"]) == (7, True, True)
    assert "ignore_eos" not in request_body(BenchConfig("http://127.0.0.1:1", "m", ignore_eos=False), spec)


def test_arrivals_are_poisson_at_the_rate_or_all_at_once():
    assert arrival_times_s(5, math.inf, seed=0) == [0.0] * 5
    times = arrival_times_s(4000, 20.0, seed=0)
    assert times == sorted(times) and abs(times[-1] / 4000 - 1 / 20) < 0.003


def test_bad_settings_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="concurrency"):
        BenchConfig("http://x:1", "m", concurrency=0)
    with pytest.raises(ValueError, match="request_rate"):
        BenchConfig("http://x:1", "m", request_rate=0)
    with pytest.raises(ValueError, match="prompt_len"):
        make_requests(1, (10, 5), (1, 1), vocab_size=10)


class ScriptedServer:
    """An OpenAI-style /v1/completions that streams `max_tokens` one-token chunks TOKEN_GAP_S apart.

    A prompt starting with token 0 is answered 503; one starting with 1 is cut before [DONE].
    It records the most requests it ever had in flight.
    """

    def __init__(self):
        self.in_flight = self.max_in_flight = 0
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()

    async def completions(self, request):
        body = await request.json()
        if body["prompt"][0] == 0:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(body["max_tokens"]):
                await asyncio.sleep(TOKEN_GAP_S)
                choice = {"index": 0, "text": f"t{i}", "finish_reason": "length" if i == body["max_tokens"] - 1 else None}
                await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            if body["prompt"][0] == 1:
                return resp
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
            return resp
        finally:
            self.in_flight -= 1

    async def models(self, request):
        return web.json_response({"data": [{"id": "scripted"}]})

    def __enter__(self):
        def serve():
            asyncio.set_event_loop(self.loop)
            app = web.Application()
            app.router.add_post("/v1/completions", self.completions)
            app.router.add_get("/v1/models", self.models)
            self.runner = web.AppRunner(app)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
            self.started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        self.started.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_measures_ttft_inter_token_gaps_tokens_and_errors_by_status():
    requests = make_requests(8, (3, 3), (5, 5), vocab_size=1000, seed=0)
    requests[2] = type(requests[2])((0, 5, 5), 5)    # → 503
    requests[5] = type(requests[5])((1, 5, 5), 5)    # → stream cut before [DONE]
    with ScriptedServer() as server:
        run = asyncio.run(run_benchmark(BenchConfig(f"http://127.0.0.1:{server.port}/v1", "scripted",
                                                    concurrency=3), requests))
    assert server.max_in_flight == 3
    summary = loadgen_report.summarize(run)
    assert (summary["num_ok"], summary["errors_by_status"]) == (6, {"503": 1, "incomplete_stream": 1})
    assert summary["num_output_tokens"] == 30 and summary["num_short_outputs"] == 0
    ok = [r for r in run.results if r.is_ok]
    assert all(len(r.chunk_times_s) == 5 and r.ttft_s >= TOKEN_GAP_S for r in ok)
    # 4 gaps a request; the scripted gap plus scheduling noise
    assert TOKEN_GAP_S <= summary["itl_ms"]["p50"] / 1e3 < TOKEN_GAP_S + 0.015
    assert summary["requests_per_s"] == pytest.approx(6 / run.duration_s)
    bins = loadgen_report.timeline(run, bin_s=0.05)
    assert sum(b["output_tokens_per_s"] * b["width_s"] for b in bins) == pytest.approx(30)
    assert sum(b["requests_per_s"] * b["width_s"] for b in bins) == pytest.approx(6)


def test_cli_writes_json_and_exits_1_when_a_request_failed(tmp_path, capsys):
    out = tmp_path / "run.json"
    with ScriptedServer() as server:
        # seed 0, vocab 2: some prompt starts with token 0 → a 503 among the 6 requests
        code = main(["--base-url", f"http://127.0.0.1:{server.port}", "--num-requests", "6", "--prompt-len", "2",
                     "--output-len", "3", "--concurrency", "2", "--vocab-size", "2", "--out", str(out), "--json"])
    document = json.loads(out.read_text())
    assert code == 1 and document["summary"]["num_errors"] >= 1
    assert document["config"]["model"] == "scripted" and "api_key" not in document["config"]
    assert document["workload"]["num_requests"] == 6 and len(document["requests"]) == 6
    assert json.loads(capsys.readouterr().out)["num_requests"] == 6


def test_against_a_real_replica(tiny_replica, tmp_path):
    out = tmp_path / "replica.json"
    code = main(["--base-url", tiny_replica["base_url"], "--num-requests", "6", "--prompt-len", "8:24",
                 "--output-len", "4:12", "--concurrency", "3", "--vocab-size", str(tiny_replica["vocab_size"]),
                 "--out", str(out)])
    document = json.loads(out.read_text())
    summary = document["summary"]
    assert code == 0, f"{summary['errors_by_status']}, first: {next(r['error'] for r in document['requests'] if r['error'])}"
    assert summary["num_ok"] == 6 and summary["num_short_outputs"] == 0   # ignore_eos honoured
    assert summary["ttft_ms"]["p50"] > 0 and summary["itl_ms"]["p50"] > 0 and summary["output_tokens_per_s"] > 0
