"""Stopping a replica: SIGTERM ends an idle one at once, a second signal ends a drain at once,
and a signal while the model loads ends the start; each time the engine core goes with it and
its socket folder is removed.

The time bounds are regression guards, generous for 2 loaded cores: a stop used to take 3.5-5 s
idle (both processes finalising an interpreter that holds torch), and a second SIGTERM did
nothing until the drain timeout.
"""
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess, tiny_server_args
from tests.server.test_engine_death import core_pid, is_running, long_stream_body, read_stream, wait_for

IDLE_STOP_BOUND_S = 5.0


def start_server(tiny_model, tmp_path: Path, *extra: str) -> tuple[ServerProcess, Path]:
    """A tiny server whose temporary files (the core's socket folder) go to a folder of its own."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = ServerProcess(tiny_server_args(tiny_model, *extra), tmp_path / "server.log",
                           env={"TMPDIR": str(tmp)})
    return server, tmp


def test_an_idle_replica_exits_0_soon_after_sigterm_and_leaves_no_core_or_sockets(tiny_model, tmp_path):
    server, tmp = start_server(tiny_model, tmp_path)
    try:
        server.wait_ready()
        pid = core_pid(server)
        server.signal(signal.SIGTERM)
        start_s = time.monotonic()
        assert server.proc.wait(30) == 0, server.log_tail()
        assert time.monotonic() - start_s < IDLE_STOP_BOUND_S, server.log_tail()
        assert wait_for(lambda: not is_running(pid), 5), "the engine core outlived its server"
        assert list(tmp.iterdir()) == [], "the core's socket folder was left"
    finally:
        server.stop()


def test_a_second_sigterm_ends_the_drain_at_once_and_the_stream_ends_with_abort(tiny_model, tmp_path):
    server, tmp = start_server(tiny_model, tmp_path, "--drain-timeout", "300")
    try:
        server.wait_ready()
        pid = core_pid(server)
        events: list[str] = []
        body = long_stream_body() | {"max_tokens": 250, "n": 8}     # far longer than this test
        reader = threading.Thread(target=read_stream, args=(server.url, events, body))
        reader.start()
        assert wait_for(lambda: len(events) >= 2, 30), "the stream never started"
        server.signal(signal.SIGTERM)
        assert wait_for(lambda: httpx.get(server.url + "/ready").status_code == 503, 10)
        assert server.proc.poll() is None, "the first SIGTERM did not wait for the stream"
        server.signal(signal.SIGTERM)
        assert server.proc.wait(IDLE_STOP_BOUND_S) == 0, server.log_tail()
        reader.join(10)
        assert events[-1] == "[DONE]", events[-3:]
        finishes = {c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"]}
        assert "abort" in finishes and "length" not in finishes, finishes
        assert wait_for(lambda: not is_running(pid), 5), "the engine core outlived its server"
        assert list(tmp.iterdir()) == [], "the core's socket folder was left"
    finally:
        server.stop()


def test_sigterm_while_the_model_loads_exits_0_and_leaves_no_core_or_sockets(tiny_model, tmp_path):
    server, tmp = start_server(tiny_model, tmp_path)
    try:
        # the core is started first thing, long before the model is loaded
        assert wait_for(lambda: _children(server.proc.pid), 30), server.log_tail()
        pid = int(_children(server.proc.pid)[0])
        with pytest.raises(httpx.ConnectError):             # still loading: not listening yet
            httpx.get(server.url + "/health", timeout=1)
        server.signal(signal.SIGTERM)
        assert server.proc.wait(IDLE_STOP_BOUND_S) == 0, server.log_tail()
        assert wait_for(lambda: not is_running(pid), 5), "the engine core outlived its server"
        assert list(tmp.iterdir()) == [], "the core's socket folder was left"
    finally:
        server.stop()


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return []

