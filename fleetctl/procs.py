"""Processes on this host, read from /proc: the one place fleetctl parses /proc/PID/stat.

A pid alone does not name a process (the kernel recycles pids), so a process fleetctl must
recognise later (a local replica, the owner of a rolling update) is recorded as its pid together
with its start time in clock ticks (`start_ticks`); the pair is unique for the host's uptime.
Zombies and dead processes count as gone everywhere here.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses):
    fields[0] is the state, fields[1] the parent pid, fields[19] the start time in ticks."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    """The process' start time in clock ticks since boot; None if it is gone or a zombie."""
    fields = _stat_fields(pid)
    return None if not fields or fields[0] in ("Z", "X") else int(fields[19])


def is_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    return start_ticks(pid) is not None


def is_same_process(pid: int, ticks: int | None) -> bool:
    """pid still names the process that was recorded with start time `ticks`."""
    return bool(pid) and ticks is not None and start_ticks(pid) == ticks


def parent(pid: int) -> int:
    """The parent's pid; 0 when the process is gone."""
    fields = _stat_fields(pid)
    return int(fields[1]) if fields and len(fields) > 1 else 0


def children(pid: int) -> list[int]:
    """The live (non-zombie) children of pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and len(fields) > 1 and fields[1] == str(pid) and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> bytes:
    """The process' command line (NUL-separated); b"" when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def reap(pid: int) -> None:
    """Collects the exit status of a child of this process (else it lingers as a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def terminate_group(pid: int, timeout_s: float, poll_s: float = 0.05) -> None:
    """SIGTERM to pid's process group (it drains, then exits), SIGKILL after timeout_s.
    SIGCONT follows the SIGTERM: a stopped (SIGSTOP, hung in a debugger) replica then drains
    and exits too instead of sitting out the whole timeout."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
            if sig == signal.SIGTERM:
                os.killpg(pid, signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            reap(pid)
            if not is_alive(pid):
                return
            time.sleep(poll_s)
