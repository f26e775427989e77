"""The two Engine API calls the docker SDK does not wrap, behind one small adapter.

Why this exists: docker-py (7.x) wraps `/services/{id}/logs` but not `/tasks/{id}/logs`, and it
has no call for `docker service rollback` (`POST /services/{id}/update?rollback=previous`).
Both are plain Engine API endpoints, so they are sent through the SDK's own low-level client
(`client.api`: its session, base URL, TLS and error types), whose request helpers are
underscore methods. This module is the only place fleetctl touches them; if a docker-py
release renames them, only this file changes. Also here: Docker's timestamps as epoch seconds,
which both Docker backends read, and a container's health check in one line.
"""
from __future__ import annotations

import datetime as dt
import time
from typing import Iterator


class EngineApi:
    """Thin adapter over a `docker.DockerClient`'s low-level `APIClient`."""

    def __init__(self, client):
        self.api = client.api

    def task_logs(self, task_id: str, follow: bool = False, tail: int | str = "all") -> Iterator[bytes]:
        """A Swarm task's stdout and stderr as raw chunks (demultiplexed, not split in lines),
        the same call shape as the SDK's service logs."""
        api = self.api
        response = api._get(api._url("/tasks/{0}/logs", task_id), stream=True,
                            params={"follow": follow, "stdout": True, "stderr": True, "tail": tail})
        yield from api._get_result_tty(True, response, False)

    def roll_back_service(self, service_id: str, version: int, spec: dict) -> None:
        """`docker service rollback`: the engine restores the previous spec (it ignores the body,
        which the API still requires)."""
        api = self.api
        api._raise_for_status(api._post_json(api._url("/services/{0}/update", service_id), data=spec,
                                             params={"version": version, "rollback": "previous"}))


def health_report(api, container_id: str) -> str:
    """A container's Docker health check in one line while it is not healthy: its status and its
    newest check's exit code and last line of output (e.g. "exec: ... no such file or directory"
    from an image whose check cannot run); "" when healthy, without a check, or not found (a
    task on another node: its engine is not this client's)."""
    import docker

    try:
        health = (api.inspect_container(container_id).get("State") or {}).get("Health")
    except docker.errors.APIError:
        return ""
    if not health or health.get("Status") == "healthy":
        return ""
    report = f"health check {health.get('Status', '?')}"
    if health.get("Log"):
        last = health["Log"][-1]
        output = (last.get("Output") or "").strip().splitlines()
        report += f" (exit {last.get('ExitCode')}" + (f": {output[-1][:200]})" if output else ")")
    return report


def lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Raw log chunks → text lines (the last one even without its newline)."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        yield from (line.decode(errors="replace") for line in complete)
    if buffer:
        yield buffer.decode(errors="replace")


def parse_time(text: str | None) -> float:
    """Docker's RFC 3339 time (nanoseconds) → epoch seconds; 0 when unknown."""
    if not text or text.startswith("0001"):
        return 0.0
    base = text.split(".")[0].rstrip("Z")
    try:
        return dt.datetime.fromisoformat(base).replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return time.time()
