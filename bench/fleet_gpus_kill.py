"""bench/fleet_gpus.py's kill part: kill -9 of one replica of a fleet under streaming load, with
the health watcher (`fleetctl watch`) running, and what clients and the fleet made of it.

Sequence: N replicas up; `fleetctl watch` started; streaming W4 load (`ClosedLoop`, each request
with a deadline) for --kill-after-s; the victim (the first replica in rotation) gets SIGKILL on
every process of its tree at t_kill; `fleetctl status --json` is polled until N replicas are
ready and in NGINX with the victim restarted; the load runs --after-recovery-s more, then stops
and its requests in flight finish.

Figures: the requests open at t_kill (sent before, ended after) by outcome: ok, failed (a stream
error event, a connection closed before `data: [DONE]`, a 503 from NGINX for one queued on the
victim), hung (no end within the deadline: must be 0); the requests sent after t_kill (target 0
failed: NGINX passes a refused connection to the next replica); the seconds until the victim left
NGINX and until the fleet was whole again; and, from NGINX's access log, how many requests the
victim held at its death (lines after t_kill naming it as their only upstream; a stream it
finished just before the kill may be logged just after it and counted too, so this bounds the
errors from above).

A request sent right after the kill can still fail, in the instant before the kernel has closed
the dead replica's sockets: NGINX sends it on a kept-alive upstream connection, gets a reset
before any answer, and does not pass a POST it has sent to the next replica (the template's
`proxy_next_upstream error timeout`, without `non_idempotent`): the client gets 503 "no replica
could serve the request" with Retry-After. Seen in 2 of 5 CPU runs (1 of 259, 2 of 235 requests). Hence
also the failures of requests sent once the victim was out of NGINX (`after_left_nginx`: must be 0).
"""
from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

from bench.fleet_gpus_fleet import GROUP, ROOT, ClosedLoop, Fleet, tally
from fleetctl.loadgen import BenchConfig


def gauges(address: str) -> dict[str, float]:
    """The replica's running and waiting requests, from its own /metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {}
    for name in ("running", "waiting"):
        match = re.search(rf"^pagefleet_num_requests_{name}\{{[^}}]*\}} (\S+)", text, re.MULTILINE)
        found[name] = float(match.group(1)) if match else float("nan")
    return found


def logged_between(access_log: Path, start: int, end: int) -> list[tuple[str, str, str]]:
    """(status, $upstream_addr, $upstream_status) of each request NGINX logged between two
    byte offsets of its access log (lb/nginx.conf.j2's `pagefleet` format)."""
    with open(access_log, "rb") as log:
        log.seek(start)
        text = log.read(max(0, end - start)).decode(errors="replace")
    return re.findall(r'" (\d{3}) \d+ rt=\S+ upstream=(.*?) ustatus=(.*?) uct=', text)


async def status(fleet: Fleet) -> dict:
    """`fleetctl status --json`, without blocking the load's event loop."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "fleetctl", "status", "--json", env=fleet.env,
                                                cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    output, _ = await proc.communicate()
    return json.loads(output)


def kill_part(fleet: Fleet, args, n: int, work: Path) -> dict:
    fleet.up(n)
    before = fleet.status()
    victim = next(r for r in before["replicas"] if r["in_nginx"])
    watcher = fleet.popen("watch", *args.watch_arg, log=work / "watch.log")
    config = BenchConfig(fleet.url, GROUP, ca_file=fleet.ca_file, timeout_s=args.stream_deadline_s)
    load = ClosedLoop(config, args.kill_concurrency_per_replica * n, args.prompt_len, args.output_len,
                      args.vocab_size, args.stream_deadline_s)
    found: dict = {}

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(load.run(stop))
        await asyncio.sleep(args.kill_after_s)
        found["victim_gauges"] = await asyncio.to_thread(gauges, victim["address"])
        found["pids"] = pids = fleet.replica_processes(victim["id"])
        found["log_offset"] = fleet.access_log.stat().st_size
        found["t_kill_s"] = load.now_s()
        fleet.kill(pids)
        found["t_killed_s"] = load.now_s()
        killed_at = time.monotonic()
        deadline = killed_at + args.ready_timeout + 120
        while time.monotonic() < deadline:
            report = await status(fleet)
            row = next((r for r in report["replicas"] if r["id"] == victim["id"]), None)
            if row and not row["in_nginx"] and "left_nginx_after_s" not in found:
                found["left_nginx_after_s"] = round(time.monotonic() - killed_at, 2)
                found["log_offset_out"] = fleet.access_log.stat().st_size  # no request reaches it now
                found["t_out_s"] = load.now_s()
            if (row and row["in_nginx"] and row["is_ready"] and row["num_restarts"] > victim["num_restarts"]
                    and report["num_replicas_ready"] == n and report["nginx"]["num_upstreams"] == n):
                found["recovered_after_s"] = round(time.monotonic() - killed_at, 2)
                found["status_after"] = {"num_replicas_ready": report["num_replicas_ready"],
                                         "victim": {k: row[k] for k in ("handle", "phase", "reason", "num_restarts")}}
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(args.after_recovery_s)  # new requests reach the replaced replica too
        stop.set()
        await task

    try:
        asyncio.run(go())
    finally:
        watcher.terminate()
        watcher.wait(30)
    # Open at the kill: sent before its last signal, ended after its first one.
    t_kill, t_killed = found["t_kill_s"], found["t_killed_s"]
    open_at_kill = [r for r in load.results if r.start_s <= t_killed and r.start_s + (r.e2e_s or 0) >= t_kill]
    after = [r for r in load.results if r.start_s > t_killed]
    after_out = [r for r in after if r.start_s > found.get("t_out_s", float("inf"))]
    # Logged from the kill until the victim was out of NGINX: those it held ("victim" alone as
    # upstream), and new ones NGINX tried on it first and passed on ("victim, other").
    logged = logged_between(fleet.access_log, found["log_offset"],
                            found.get("log_offset_out", fleet.access_log.stat().st_size))
    held: dict[str, int] = {}
    for status_code, upstream, upstream_status in logged:
        if upstream == victim["address"]:
            key = f"{status_code} (replica: {upstream_status})"
            held[key] = held.get(key, 0) + 1
    result = {
        "num_replicas": n, "concurrency": args.kill_concurrency_per_replica * n, "victim": victim["id"],
        "victim_address": victim["address"], "pids_killed": found["pids"],
        "victim_requests_at_kill": found["victim_gauges"], "t_kill_s": round(t_kill, 3),
        "kill_took_s": round(t_killed - t_kill, 4),
        "open_at_kill": tally(open_at_kill),
        "num_hung": sum(r.status in ("hung", "timeout") for r in open_at_kill + after),
        "num_on_victim_per_nginx_log": sum(held.values()), "on_victim_per_nginx_log": held,
        "num_passed_on_by_nginx": sum(u.startswith(victim["address"] + ",") for _, u, _ in logged),
        "after_kill": tally(after), "after_left_nginx": tally(after_out),
        "left_nginx_after_s": found.get("left_nginx_after_s"),
        "recovered_after_s": found.get("recovered_after_s"), "status_after": found.get("status_after"),
        "watcher_log": (work / "watch.log").read_text()[-2000:],
    }
    print(f"kill: {result['open_at_kill']['num_failed']} open streams ended with an error, {result['num_hung']} hung, "
          f"{result['after_kill']['num_failed']} new requests failed, whole again after "
          f"{result['recovered_after_s']} s", flush=True)
    return result
