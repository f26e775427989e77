"""NGINX workers left behind by a master that died (SIGKILL, OOM kill): found and ended.

A master killed without a chance to stop its workers leaves them serving: each still holds the
listening sockets it inherited, so a new master on the same ports fails with "Address already
in use" and the old workers keep answering with an old config. They are recognised by three
facts read from /proc: the title NGINX gives its workers ("nginx: worker process", also the
cache helpers), a parent that is no NGINX master (the kernel re-parented them), and a socket
listening on one of the fleet's ports. Nothing else on the host matches all three.

Ending them: SIGQUIT first (a worker closes its listening sockets at once and finishes the
requests it holds), SIGKILL for any still listening after the grace period.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from fleetctl import procs

LISTEN_STATE = "0A"  # TCP_LISTEN in /proc/net/tcp*
WORKER_TITLES = (b"nginx: worker process", b"nginx: cache manager process", b"nginx: cache loader process")


def config_ports(conf_text: str) -> set[int]:
    """The ports a config's `listen` directives name (`listen 127.0.0.1:8443 ssl;`, `listen 80;`)."""
    ports = set()
    for address in re.findall(r"^\s*listen\s+([^\s;]+)", conf_text, flags=re.MULTILINE):
        port = address.rsplit(":", 1)[-1].rstrip("]")
        if port.isdigit():
            ports.add(int(port))
    return ports


def listening_inodes(ports: set[int]) -> set[str]:
    """Socket inodes listening on any of `ports` (IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN_STATE and int(fields[1].rsplit(":", 1)[1], 16) in ports:
                inodes.add(fields[9])
    return inodes


def orphan_workers(ports: set[int]) -> list[int]:
    """Pids of NGINX workers without a master that hold a listening socket on `ports`."""
    inodes = listening_inodes(ports)
    if not inodes:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if not procs.cmdline(pid).startswith(WORKER_TITLES) or _has_master(pid):
            continue
        if inodes & _socket_inodes(pid):
            found.append(pid)
    return sorted(found)


def end_orphan_workers(ports: set[int], grace_s: float = 5.0) -> list[int]:
    """Ends the orphaned workers on `ports`; returns their pids. SIGQUIT, then up to grace_s
    for them to exit; one still listening after that gets SIGKILL, while one that closed its
    listening sockets but still finishes a long stream is left to end by itself (the ports are
    free either way)."""
    pids = orphan_workers(ports)
    for pid in pids:
        _signal(pid, signal.SIGQUIT)
    deadline = time.monotonic() + grace_s
    while any(procs.is_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in orphan_workers(ports):
        _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _has_master(pid: int) -> bool:
    parent = procs.parent(pid)
    return parent > 1 and procs.cmdline(parent).startswith(b"nginx: master")


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes
