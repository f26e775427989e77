"""The engine core runs in a child process of `replica serve`; neither side outlives the other.

- The core killed (kill -9, what a CUDA fault or the OOM killer does): every open stream gets an
  error event and `[DONE]`, /health turns 503, and the replica exits non-zero so that fleetctl,
  Docker or Swarm restarts it.
- The server killed (kill -9: no handler runs): the core goes with it, never an orphan on a GPU.
- SIGINT to the whole process group (Ctrl-C on a terminal): the server drains and the core keeps
  serving the requests in flight until the drain ends.
"""
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.server.conftest import TINY_NAME, ServerProcess, tiny_server_args


def core_pid(server: ServerProcess) -> int:
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    assert len(children) == 1, f"expected one engine core process, found {children}"
    return int(children[0])


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def read_stream(url: str, events: list, body: dict) -> None:
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60.0) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])


def long_stream_body() -> dict:
    return {"model": TINY_NAME, "prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True,
            "stream": True}


def test_a_killed_core_ends_open_streams_with_an_error_and_the_replica_exits_1(tiny_model, tmp_path):
    server = ServerProcess(tiny_server_args(tiny_model), tmp_path / "server.log").wait_ready()
    try:
        pid = core_pid(server)
        events: list[str] = []
        reader = threading.Thread(target=read_stream, args=(server.url, events, long_stream_body()))
        reader.start()
        assert wait_for(lambda: len(events) >= 3, 30), "the stream never started"
        os.kill(pid, signal.SIGKILL)
        reader.join(30)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "engine_dead" and "Traceback" not in error["message"]
        assert server.proc.wait(30) == 1, server.log_tail()
    finally:
        server.stop()


def test_the_core_dies_with_a_killed_server(tiny_model, tmp_path):
    server = ServerProcess(tiny_server_args(tiny_model), tmp_path / "server.log").wait_ready()
    pid = core_pid(server)
    server.proc.kill()
    server.proc.wait()
    assert wait_for(lambda: not is_running(pid), 10), "the engine core outlived its server"
    server.stop()


def test_ctrl_c_on_the_process_group_drains_with_the_core_still_serving(tiny_model, tmp_path):
    server = ServerProcess(tiny_server_args(tiny_model, "--drain-timeout", "60"), tmp_path / "server.log",
                           new_session=True).wait_ready()
    try:
        pid = core_pid(server)
        events: list[str] = []
        body = long_stream_body() | {"max_tokens": 60}
        reader = threading.Thread(target=read_stream, args=(server.url, events, body))
        reader.start()
        assert wait_for(lambda: len(events) >= 2, 30), "the stream never started"
        os.killpg(server.proc.pid, signal.SIGINT)      # what a terminal's Ctrl-C sends
        reader.join(60)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "length", last
        assert server.proc.wait(30) == 0, server.log_tail()
        assert wait_for(lambda: not is_running(pid), 10)
    finally:
        server.stop()


def test_a_replica_that_cannot_start_leaves_no_core_and_no_socket_folder(tiny_model, tmp_path):
    """`replica serve` starts the core before it checks its settings or opens the model (so
    that the two processes import at once): a refusal ends that core and removes its sockets."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    for args, exit_code in ((tiny_server_args(tiny_model, "--max-queue", "-1"), 2),
                            (tiny_server_args(tmp_path / "no-such-model"), 1)):
        server = ServerProcess(args, tmp_path / "server.log", env={"TMPDIR": str(tmp)})
        assert server.proc.wait(120) == exit_code, server.log_tail()
        server.stop()
        assert sorted(p.name for p in tmp.iterdir()) == [], "the core's socket folder was left"
        orphans = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(tmp).encode()
                   in _cmdline(p)]
        assert orphans == [], "an engine core outlived the refused replica"


def _cmdline(proc_dir: Path) -> bytes:
    try:
        return (proc_dir / "cmdline").read_bytes()
    except OSError:          # ended meanwhile
        return b""
