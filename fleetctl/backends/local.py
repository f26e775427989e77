"""Replicas as local processes: `python -m replica.cli serve ...` on 127.0.0.1, one log file each.

Each replica runs in its own session (it outlives the fleetctl that started it and gets no
terminal signals); `local/<id>.json` in the state dir records its pid together with the process'
start time, so a recycled pid is never mistaken for the replica. A replica with a GPU sees only
that one (CUDA_VISIBLE_DEVICES); without GPUs it runs on the CPU.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from fleetctl import procs
from fleetctl.backends.base import Backend, BackendInfo, Replica, ReplicaSpec, free_port, replica_env, serve_args
from fleetctl.follow import follow_file
from fleetctl.models import model_argument
from fleetctl.state import StateDir

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class LocalBackend(Backend):
    name = "local"
    info = BackendInfo()  # a crashed process stays down until the watcher restarts it

    @classmethod
    def create(cls, config, fleet_id: str, state_dir: StateDir) -> "LocalBackend":
        return cls(state_dir)

    def __init__(self, state_dir: StateDir, python: str = sys.executable):
        self.state_dir = state_dir
        self.python = python
        self.registry = state_dir.root / "local"

    def start(self, spec: ReplicaSpec, port: int | None = None) -> Replica:
        self.registry.mkdir(parents=True, exist_ok=True)
        if port is None or not _can_bind(port):
            port = free_port()
        args = serve_args(spec, model_argument(spec.model), "127.0.0.1", port)
        argv = [self.python, "-m", "replica.cli", *args]
        env = {**os.environ, **replica_env(spec)}
        # The `replica` package of this working tree (an installed one resolves the same).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        if spec.gpu:
            env["CUDA_VISIBLE_DEVICES"] = spec.gpu
        log_path = self.state_dir.replica_log(spec.id)
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} fleetctl starts {spec.id}: "
                      f"{' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=str(self.state_dir.root), start_new_session=True)
        started_at_s = time.time()
        entry = {"pid": proc.pid, "start_ticks": procs.start_ticks(proc.pid), "port": port,
                 "started_at_s": started_at_s, "gpu": spec.gpu}
        _write_json(self.registry / f"{spec.id}.json", entry)
        return Replica(spec.id, "127.0.0.1", port, _handle(entry), True, started_at_s)

    def stop(self, replica_id: str, timeout_s: float) -> None:
        path = self.registry / f"{replica_id}.json"
        entry = _read_json(path)
        if entry and _is_ours(entry):
            procs.terminate_group(entry["pid"], timeout_s)
        path.unlink(missing_ok=True)

    def list(self) -> dict[str, Replica]:
        replicas = {}
        for path in sorted(self.registry.glob("*.json")) if self.registry.exists() else []:
            entry = _read_json(path)
            if not entry:
                continue
            running = _is_ours(entry)
            replicas[path.stem] = Replica(path.stem, "127.0.0.1", entry["port"], _handle(entry), running,
                                          entry["started_at_s"], "" if running else "exited")
        return replicas

    def logs(self, replica_id: str, follow: bool = False, tail: int = 200) -> Iterator[str]:
        return follow_file(self.state_dir.replica_log(replica_id), follow, tail)

    def has_logs(self, replica_id: str) -> bool:
        return self.state_dir.replica_log(replica_id).exists()  # also once the replica was removed


def _handle(entry: dict) -> str:
    return f"pid {entry['pid']}"


def _is_ours(entry: dict) -> bool:
    """The recorded process still runs (not a zombie) and is the one we started."""
    procs.reap(entry["pid"])
    return procs.is_same_process(entry["pid"], entry.get("start_ticks"))


def _can_bind(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the replica's server does
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
