"""Faults on a real local fleet (tiny model, real NGINX, the real watcher): a replica that
hangs (SIGSTOP), an NGINX master killed with SIGKILL, and an `up` that fails part-way."""
import json
import os
import signal
import time

import httpx
import pytest

from fleetctl import procs
from fleetctl.nginx_orphans import orphan_workers
from tests.fleet.conftest import API_KEY, SERVED_NAME

WATCH = ("watch", "--interval", "0.5", "--threshold", "2", "--restart-after", "3")


def replica_pid(ctl, replica_id: str) -> int:
    return json.loads((ctl.home / "local" / f"{replica_id}.json").read_text())["pid"]


def row(report: dict, replica_id: str) -> dict:
    return next(r for r in report["replicas"] if r["id"] == replica_id)


def processes_of(home) -> list[int]:
    """Live processes started for the fleet in `home` (replicas inherit PAGEFLEET_HOME)."""
    marker = f"PAGEFLEET_HOME={home}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and entry != str(os.getpid()):
            try:
                environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if marker in environ and procs.is_alive(int(entry)):
                found.append(int(entry))
    return found


def completion_ok(ctl) -> bool:
    try:
        with httpx.Client(verify=ctl.ssl_context(), timeout=30) as client:
            response = client.post(f"{ctl.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                                   json={"model": SERVED_NAME, "prompt": "hi", "max_tokens": 2})
        return response.status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_a_hung_replica_leaves_nginx_within_the_threshold_and_the_watcher_replaces_it(fleetctl, tiny_model):
    fleetctl(*fleetctl.up_args(tiny_model, 2, "local"))
    fleetctl.popen(*WATCH)
    hung = replica_pid(fleetctl, "r1")
    os.kill(hung, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        conf = fleetctl.home / "nginx" / "nginx.conf"
        while "# r1" in conf.read_text() and time.monotonic() - stopped_at < 30:
            time.sleep(0.05)
        left_after_s = time.monotonic() - stopped_at
        # 2 failed polls, 0.5 s apart, each waiting at most the probe's 2 s, and one tick's work.
        assert left_after_s < 2 * (0.5 + 2.0) + 2.0, left_after_s
        assert not row(fleetctl.status(), "r1")["in_nginx"]
        assert completion_ok(fleetctl)  # r2 serves meanwhile

        report = fleetctl.wait_status(lambda r: row(r, "r1")["in_nginx"] and row(r, "r1")["num_restarts"] >= 1,
                                      timeout_s=90)
        assert row(report, "r1")["in_nginx"] and row(report, "r1")["num_restarts"] >= 1, report
        assert replica_pid(fleetctl, "r1") != hung and not procs.is_alive(hung)
        assert report["num_replicas_ready"] == 2 and completion_ok(fleetctl)
    finally:
        try:
            os.kill(hung, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_a_killed_nginx_master_is_restarted_and_its_orphaned_workers_are_ended(fleetctl, tiny_model):
    """By `up`, by the watcher, and by `down`: each time the old workers held the ports."""
    fleetctl(*fleetctl.up_args(tiny_model, 1, "local"))
    ports = {fleetctl.https_port, fleetctl.http_port, fleetctl.internal_port}
    config_before = (fleetctl.home / "nginx" / "nginx.conf").read_text()

    def kill_master() -> list[int]:
        master = fleetctl.nginx_pid()
        workers = procs.children(master)
        os.kill(master, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while procs.is_alive(master) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(orphan_workers(ports)) == sorted(workers) and workers
        return workers

    def restarted(workers: list[int]) -> bool:
        pid = fleetctl.nginx_pid()
        return bool(pid and procs.is_alive(pid)) and not any(procs.is_alive(w) for w in workers)

    workers = kill_master()
    fleetctl("up")
    assert restarted(workers) and completion_ok(fleetctl)

    workers = kill_master()
    fleetctl.popen(*WATCH)
    deadline = time.monotonic() + 30
    while not restarted(workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert restarted(workers) and completion_ok(fleetctl)
    assert (fleetctl.home / "nginx" / "nginx.conf").read_text() == config_before  # the last good config
    events = (fleetctl.home / "logs" / "events.log").read_text()
    assert "nginx" in events and "started" in events

    for proc in fleetctl.children:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    workers = kill_master()
    fleetctl("down")
    assert not any(procs.is_alive(w) for w in workers) and orphan_workers(ports) == []


def test_an_up_that_fails_part_way_leaves_nothing_running(fleetctl, tiny_model):
    """The replicas cannot be ready within the 1 s given: `up` fails, and takes down the NGINX
    and replicas it had started (the fleet was new), saying so."""
    args = fleetctl.up_args(tiny_model, 1, "local")
    args[args.index("--ready-timeout") + 1] = "1"
    result = fleetctl(*args, check=False)
    assert result.returncode != 0
    assert "stopped everything this `up` had started" in result.stderr, result.stderr
    assert not (fleetctl.home / "fleet.json").exists()
    assert fleetctl.nginx_pid() is None or not procs.is_alive(fleetctl.nginx_pid())
    assert processes_of(fleetctl.home) == []
    assert orphan_workers({fleetctl.https_port, fleetctl.http_port, fleetctl.internal_port}) == []
