"""The health watcher (`fleetctl watch`, `fleetctl up --watch`).

Every interval it polls each replica's /health and /ready and acts; every action is logged with
its reason (stdout and the state's logs/events.log):

  process gone (and the backend will not restart it)  → out of NGINX, restarted on its address
  in NGINX, /ready fails `failure_threshold` times     → out of NGINX (NGINX itself already
                                                          skips it after max_fails)
  out of NGINX and /ready answers 200 again            → back in NGINX
  out of NGINX and unhealthy for `restart_after_s`,
  or not ready `ready_timeout_s` after start or leaving → restarted
  fewer replicas than asked for                        → new ones started
  NGINX not running                                    → started again with the current config

Docker and Swarm restart crashed containers themselves (restart policy); the watcher then only
moves the replica out of NGINX and back in once it is ready (on Swarm, at its new task's address).
A container Docker started again is loading: it gets the ready timeout, not `restart_after_s`.

While `fleetctl update` runs, the watcher pauses: the update owns the replica set (it starts,
gates and removes replicas itself, and a replica that passed /ready must still pass its test
generation before NGINX sees it). It resumes when the update ends or its process is gone.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from fleetctl.errors import NoFleetError
from fleetctl.fleet import Fleet
from fleetctl.probe import Probe
from fleetctl.state import Phase


DEFAULT_INTERVAL_S = 2.0
DEFAULT_FAILURE_THRESHOLD = 2
DEFAULT_RESTART_AFTER_S = 30.0


@dataclass
class Watcher:
    fleet: Fleet
    interval_s: float = DEFAULT_INTERVAL_S
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD  # failed polls before a serving replica leaves NGINX
    restart_after_s: float = DEFAULT_RESTART_AFTER_S  # an unhealthy replica out of NGINX gets this long
    num_failures: dict[str, int] = field(default_factory=dict)
    out_since_s: dict[str, float] = field(default_factory=dict)  # when it left NGINX (or started)
    is_paused: bool = False  # for a rolling update

    def run(self, stop: threading.Event | None = None, max_ticks: int | None = None) -> None:
        stop = stop or threading.Event()
        num_ticks = 0
        while not stop.is_set() and (max_ticks is None or num_ticks < max_ticks):
            started = time.monotonic()
            try:
                self.tick()
            except NoFleetError:
                self.fleet.say("the fleet is gone (fleetctl down); the watcher stops")
                return
            except Exception as exc:  # one bad tick (Docker busy, a race with `scale`) must not end the watch
                self.fleet.event("watch", "tick failed, will retry", f"{type(exc).__name__}: {exc}")
            num_ticks += 1
            stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def tick(self) -> None:
        fleet = self.fleet
        if fleet.state_dir.load().is_update_running() != self.is_paused:
            self.is_paused = not self.is_paused
            fleet.event("watch", "paused" if self.is_paused else "resumed",
                        "fleetctl update is running" if self.is_paused else "the update ended")
        if self.is_paused:
            return
        seen = fleet.refresh()  # also restarts NGINX if it is not running
        state = fleet.state_dir.load()
        probes = fleet.probe_active(state)
        now_s = time.time()
        for rec in state.active():
            result: Probe = probes[rec.id]
            if fleet.backend.needs_restart(seen.get(rec.id)):
                fleet.restart_replica(rec.id, f"process gone ({result.reason or 'not running'})")
                self._forget(rec.id)
            elif rec.phase is Phase.SERVING:
                self._check_serving(rec.id, result)
            elif result.is_ready:
                if fleet.put_in_rotation(rec.id, "/ready 200"):
                    self._forget(rec.id)
            elif self._should_restart(rec, result, now_s, state.config.ready_timeout_s):
                fleet.restart_replica(rec.id, self._restart_reason(rec, result, now_s))
                self._forget(rec.id)
        state = fleet.state_dir.load()
        for group in state.config.model_groups():
            num_active = len(state.active(group.name))
            if num_active < group.num_replicas:
                where = "" if len(state.config.model_groups()) == 1 else f" of {group.name}"
                fleet.event("fleet", f"{num_active} of {group.num_replicas} replicas{where}", "starting more")
                fleet.start_missing(group.num_replicas, group.name)

    def _check_serving(self, replica_id: str, result: Probe) -> None:
        if result.is_ready:
            self.num_failures.pop(replica_id, None)
            return
        self.num_failures[replica_id] = self.num_failures.get(replica_id, 0) + 1
        if self.num_failures[replica_id] >= self.failure_threshold:
            # FAILED: it stopped answering /health; STARTING: alive but not ready (e.g. draining).
            phase = Phase.STARTING if result.is_healthy else Phase.FAILED
            self.fleet.take_out(replica_id, phase, f"{result.reason} {self.num_failures[replica_id]} times")
            self.num_failures.pop(replica_id, None)
            self.out_since_s[replica_id] = time.time()

    def _should_restart(self, rec, result: Probe, now_s: float, ready_timeout_s: float) -> bool:
        """A replica that failed while serving gets restart_after_s to answer again; one that is
        loading gets the whole ready timeout (big models load for minutes)."""
        out_for_s = now_s - self.out_since_s.setdefault(rec.id, rec.started_at_s)
        if rec.phase is Phase.FAILED and not result.is_healthy:
            return out_for_s > self.restart_after_s
        # a process the backend started again after it left NGINX loads from its own start
        return now_s - max(self.out_since_s[rec.id], rec.started_at_s) > ready_timeout_s

    def _restart_reason(self, rec, result: Probe, now_s: float) -> str:
        out_for_s = now_s - self.out_since_s.get(rec.id, rec.started_at_s)
        what = "unhealthy" if rec.phase is Phase.FAILED else "not ready"
        return f"{what} for {out_for_s:.0f} s ({result.reason})"

    def _forget(self, replica_id: str) -> None:
        self.num_failures.pop(replica_id, None)
        self.out_since_s.pop(replica_id, None)
