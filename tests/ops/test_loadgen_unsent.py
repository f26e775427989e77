"""The load generator tells a request that never got an answer (the connection closed under it,
as at an NGINX reload) from one that failed after the server answered, and re-sends only the
first kind, as the openai client does. Against a real socket server on 127.0.0.1."""
import asyncio
import json

from fleetctl import loadgen, loadgen_report
from fleetctl.loadgen import BenchConfig, make_requests, run_benchmark

ANSWER = json.dumps({"choices": [{"text": "x", "finish_reason": "length"}], "usage": {"completion_tokens": 1}})


async def serve(num_to_drop: int, status: int = 200):
    """Drops the first num_to_drop requests after reading them (no byte answered), then answers
    each with `status`. Returns (server, url, seen) where seen counts requests read."""
    seen = {"num": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            seen["num"] += 1
            if seen["num"] <= num_to_drop:
                writer.close()
                return
            body = ANSWER.encode() if status == 200 else b'{"error":{"message":"boom"}}'
            writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (status, len(body), body))
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen


def bench(num_to_drop: int, status: int = 200):
    async def go():
        server, url, seen = await serve(num_to_drop, status)
        async with server:
            config = BenchConfig(url, "m", concurrency=1, is_streaming=False)
            run = await run_benchmark(config, make_requests(1, (2, 2), (1, 1), vocab_size=10))
        return run, seen["num"]
    return asyncio.run(go())


def test_a_request_dropped_before_any_answer_is_sent_again_and_counted(monkeypatch):
    monkeypatch.setattr(loadgen, "UNSENT_RETRY_DELAY_S", 0.0)
    run, num_seen = bench(num_to_drop=1)
    assert num_seen == 2 and run.results[0].is_ok and run.results[0].num_unsent_retries == 1
    summary = loadgen_report.summarize(run)
    assert summary["num_errors"] == 0 and summary["num_unsent_retries"] == 1 and summary["num_unsent"] == 0


def test_a_request_dropped_every_time_is_an_unsent_error_after_the_openai_clients_two_retries(monkeypatch):
    monkeypatch.setattr(loadgen, "UNSENT_RETRY_DELAY_S", 0.0)
    run, num_seen = bench(num_to_drop=10)
    assert num_seen == 3
    assert run.results[0].status == "unsent" and "ServerDisconnectedError" in run.results[0].error
    assert loadgen_report.summarize(run)["num_unsent"] == 1


def test_a_request_the_server_answered_with_an_error_is_never_sent_again():
    run, num_seen = bench(num_to_drop=0, status=500)
    assert num_seen == 1 and run.results[0].status == 500 and run.results[0].num_unsent_retries == 0
