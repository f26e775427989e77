"""In-memory stand-ins for the three parts a `Fleet` reaches the world through, so that its
decisions (converge, scale, the watcher, rolling updates and their rollbacks) run in
milliseconds. Everything else is the real fleetctl: the state directory on disk, `Fleet`, the
rendered NGINX config, `Rollout`, `Watcher`.

  FakeBackend       replicas as records: a test scripts their health, readiness, test
                    generation and crashes (`behave`, `crash`), and reads what was started and
                    stopped (`actions`)
  FakeRollingBackend  the same with the optional `RollingUpdates` protocol, replacing one
                    replica per `update_status()` call as Swarm's start-first update does: the
                    replaced one drains (`stopping_handles`) and exits at the next call
  FakeReplicaHttp   answers probe / load / post_json for the fake replicas by address
  StubNginx         apply/stop/pid of NGINX: keeps every config it was given (`upstreams()`),
                    and can refuse one as `nginx -t` would (`reject_next`)
  make_fleet, start_serving, run_update  a fleet on these fakes, serving, and updated
"""
from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from fleetctl.backends.base import Backend, BackendInfo, Replica, ReplicaSpec
from fleetctl.config import FleetConfig
from fleetctl.errors import NginxConfigError
from fleetctl.fleet import Fleet
from fleetctl.probe import Load, Probe, ReplicaHttp
from fleetctl.state import FleetState, StateDir


@dataclass(frozen=True)
class Behaviour:
    """How a fake replica acts, chosen when it starts."""

    exits_while_loading: bool = False  # its process is gone before it ever answers
    is_ready: bool = True  # /ready 200 (else 503 while /health 200)
    can_generate: bool = True  # the update's test generation returns tokens


GOOD = Behaviour()
EXITS = Behaviour(exits_while_loading=True)
NEVER_READY = Behaviour(is_ready=False)
NO_TOKENS = Behaviour(can_generate=False)


@dataclass
class FakeReplica:
    spec: ReplicaSpec
    port: int
    handle: str
    behaviour: Behaviour
    is_alive: bool = True
    is_healthy: bool = True
    is_draining: bool = False  # stopped by its backend: /ready 503, new requests 503
    started_at_s: float = field(default_factory=time.time)

    @property
    def is_ready(self) -> bool:
        return self.is_alive and self.is_healthy and self.behaviour.is_ready and not self.is_draining


class FakeBackend(Backend):
    name = "fake"
    info = BackendInfo()

    def __init__(self, info: BackendInfo | None = None):
        self.info = info or type(self).info
        self.replicas: dict[str, FakeReplica] = {}
        self.actions: list[tuple[str, str, str]] = []  # ("start" | "stop", replica id, model)
        self._ports = itertools.count(20001)
        self._handles = itertools.count(1)
        self._rules: dict[str, list[Behaviour]] = {}  # model → behaviours of its next starts
        self._id_at: dict[str, str] = {}  # "host:port" → the replica that had it (stopped ones too)

    # Scripting ------------------------------------------------------------------------------
    def behave(self, model: str, *behaviours: Behaviour) -> None:
        """The next starts of `model` act as given, in order; later ones as the last given."""
        self._rules[str(model)] = list(behaviours)

    def crash(self, replica_id: str) -> None:
        replica = self.replicas[replica_id]
        replica.is_alive = replica.is_healthy = False

    def id_at(self, address: str) -> str:
        return self._id_at.get(address, address)

    def starts(self) -> list[tuple[str, str]]:
        return [(rid, model) for what, rid, model in self.actions if what == "start"]

    def stops(self) -> list[str]:
        return [rid for what, rid, _ in self.actions if what == "stop"]

    # Backend --------------------------------------------------------------------------------
    def start(self, spec: ReplicaSpec, port: int | None = None) -> Replica:
        rules = self._rules.get(spec.model, [GOOD])
        behaviour = rules.pop(0) if len(rules) > 1 else rules[0]
        replica = FakeReplica(spec, port or next(self._ports), f"h{next(self._handles)}", behaviour)
        replica.is_alive = replica.is_healthy = not behaviour.exits_while_loading
        self.replicas[spec.id] = replica
        self._id_at[f"127.0.0.1:{replica.port}"] = spec.id
        self.actions.append(("start", spec.id, spec.model))
        return self._replica(replica)

    def stop(self, replica_id: str, timeout_s: float) -> None:
        replica = self.replicas.pop(replica_id, None)
        self.actions.append(("stop", replica_id, replica.spec.model if replica else ""))

    def list(self) -> dict[str, Replica]:
        return {rid: self._replica(r) for rid, r in self.replicas.items()}

    def logs(self, replica_id: str, follow: bool = False, tail: int = 200):
        replica = self.replicas.get(replica_id)
        if replica is not None and replica.behaviour.exits_while_loading:
            yield "ValueError: unsupported architecture"

    def needs_restart(self, replica: Replica | None) -> bool:
        if self.info.restarts_on_crash:
            return replica is None  # the engine brings a crashed one back itself
        return super().needs_restart(replica)

    def by_port(self, port: int) -> FakeReplica | None:
        return next((r for r in self.replicas.values() if r.port == port), None)

    def gate_begins(self, new: FakeReplica) -> None:
        """A POST (fleetctl's gate) reached `new`; FakeRollingBackend may stop its predecessor."""

    def address(self, replica_id: str) -> str:
        return f"127.0.0.1:{self.replicas[replica_id].port}"

    @staticmethod
    def _replica(replica: FakeReplica) -> Replica:
        return Replica(replica.spec.id, "127.0.0.1", replica.port, replica.handle, replica.is_alive,
                       replica.started_at_s, "" if replica.is_alive else "exited")


class FakeRollingBackend(FakeBackend):
    """A backend with its own rolling update (the `RollingUpdates` protocol), like Swarm:
    each `update_status()` call replaces one more replica with one of the new spec (a new
    handle and address, same id), then reports "completed"; `roll_back_model()` puts every
    replica back on the previous spec on the next call. `pause_after` replicas, the update
    stops as Swarm's does when a new task fails its health check. A replaced replica is not
    gone at once: as Swarm's old task, it drains (`stopping_handles`) until the next
    `update_status()` call, when it exits and `on_exit(its address)` is called.
    `stops_old_during_gate`: the old replica is stopped only when fleetctl's gate of its
    successor has begun (Swarm's own health check passing while that gate runs), and
    `on_stop_during_gate(the old replica)` is then called on the gate's thread."""

    name = "rolling"
    info = BackendInfo(restarts_on_crash=True, names_replicas_itself=True, has_rolling_update=True)

    def __init__(self, pause_after: int | None = None, stuck: bool = False, stops_old_during_gate: bool = False):
        super().__init__()
        self.pause_after, self.stuck, self.stops_old_during_gate = pause_after, stuck, stops_old_during_gate
        self.old_of: dict[str, FakeReplica] = {}  # a new replica's handle → the one it replaces, not stopped yet
        self.on_stop_during_gate: Callable[[FakeReplica], None] = lambda old: None
        self.status: dict = {}
        self._num_updates = 0
        self._target: ReplicaSpec | None = None
        self._previous: dict[str, ReplicaSpec] = {}
        self._todo: list[str] = []
        self.stopping: dict[str, FakeReplica] = {}  # handle → a replaced replica, draining
        self.on_exit: Callable[[str], None] = lambda address: None

    def update_model(self, spec: ReplicaSpec) -> None:
        self._num_updates += 1
        self._target, self._previous = spec, {rid: r.spec for rid, r in self.replicas.items()}
        self._todo = sorted(self.replicas)
        # stuck: a new task whose health check never passes, as Swarm then reports it (update_message)
        self.status = {"State": "updating", "StartedAt": f"update {self._num_updates}",
                       "Message": "task t1: health check starting (exit -1: no such file)" if self.stuck else ""}

    def update_status(self, group: str = "default") -> dict:
        for handle, replica in list(self.stopping.items()):  # drained since the last call
            del self.stopping[handle]
            replica.is_alive = False
            self.on_exit(f"127.0.0.1:{replica.port}")
        state = self.status.get("State")
        if state == "updating" and not self.stuck:
            num_done = len(self._previous) - len(self._todo)
            if self.pause_after is not None and num_done >= self.pause_after:
                self.status = {**self.status, "State": "paused", "Message": "task: health check failed"}
            elif self._todo:
                rid = self._todo.pop(0)
                self._replace(rid, replace(self._target, id=rid))
            else:
                self.status = {**self.status, "State": "completed"}
        elif state == "rollback_started":
            for rid, spec in self._previous.items():
                if self.replicas[rid].spec.model != spec.model:
                    self._replace(rid, spec)
            self.status = {**self.status, "State": "rollback_completed"}
        return dict(self.status)

    def update_message(self, group: str = "default") -> str:
        return self.status.get("Message", "")

    def roll_back_model(self, group: str = "default") -> None:
        if not self.status.get("State", "").startswith("rollback"):
            self.status = {**self.status, "State": "rollback_started"}

    def stopping_handles(self, group: str = "default") -> set[str]:
        return set(self.stopping)

    def by_port(self, port: int) -> FakeReplica | None:
        return super().by_port(port) or next((r for r in self.stopping.values() if r.port == port), None)

    def _replace(self, replica_id: str, spec: ReplicaSpec) -> None:
        old = self.replicas[replica_id]
        self.start(spec)
        self.replicas[replica_id].started_at_s = old.started_at_s + 1
        if self.stops_old_during_gate:
            self.old_of[self.replicas[replica_id].handle] = old
        else:
            self._stop(old)

    def gate_begins(self, new: FakeReplica) -> None:
        old = self.old_of.pop(new.handle, None)
        if old is not None:
            self._stop(old)
            self.on_stop_during_gate(old)

    def _stop(self, old: FakeReplica) -> None:
        old.is_draining = True
        self.stopping[old.handle] = old


class FakeReplicaHttp(ReplicaHttp):
    """What a fake replica answers, found by the port in the URL (as NGINX and fleetctl reach it)."""

    def __init__(self, backend: FakeBackend):
        self.backend = backend
        self.num_in_flight: dict[str, float] = {}  # replica id → requests it still runs

    def _replica(self, url: str) -> FakeReplica | None:
        match = re.search(r":(\d+)", url.split("//", 1)[-1])
        return self.backend.by_port(int(match.group(1))) if match else None

    def probe(self, base_url: str, api_key: str = "") -> Probe:
        replica = self._replica(base_url)
        if replica is None or not replica.is_alive:
            return Probe(False, False, "connection refused")
        if not replica.is_healthy:
            return Probe(False, False, "/health 503")
        return Probe(True, replica.is_ready, "" if replica.is_ready else "/ready 503")

    def load(self, base_url: str, api_key: str = "") -> Load:
        replica = self._replica(base_url)
        if replica is None or not replica.is_alive:
            return Load()
        return Load(num_running=self.num_in_flight.pop(replica.spec.id, 0.0), num_waiting=0.0)

    def post_json(self, url: str, body: dict, api_key: str, timeout_s: float) -> tuple[int, dict | str]:
        replica = self._replica(url)
        if replica is None or not replica.is_alive:
            return 0, "connection refused"
        self.backend.gate_begins(replica)
        if replica.is_draining:
            return 503, {"error": {"message": "this replica is draining"}}
        if not replica.behaviour.can_generate:
            return 500, {"error": {"message": "this model has no tokenizer"}}
        return 200, {"usage": {"completion_tokens": body.get("max_tokens", 1)}}


class StubNginx:
    """`Nginx`'s apply/stop/pid without a process: every accepted config is kept."""

    def __init__(self, prefix: Path):
        self.conf = prefix / "nginx.conf"
        self.error_log = prefix / "logs" / "error.log"
        self.access_log = prefix / "logs" / "access.log"
        self.configs: list[str] = []
        self.is_running = False
        self.reject_next = False

    def apply(self, text: str) -> str:
        if self.reject_next:
            self.reject_next = False
            raise NginxConfigError("nginx -t rejected the new config: stub says no")
        if self.is_running and self.configs and self.configs[-1] == text:
            return "unchanged"
        self.configs.append(text)
        outcome = "reloaded" if self.is_running else "started"
        self.is_running = True
        return outcome

    def pid(self) -> int | None:
        return None  # `status` then asks no stub_status of a real NGINX

    def stop(self, timeout_s: float = 10.0) -> bool:
        was_running, self.is_running = self.is_running, False
        return was_running

    def upstreams(self, config: str | None = None) -> list[str]:
        """host:port of each server in a config's upstream (default: the last one applied)."""
        text = config if config is not None else (self.configs[-1] if self.configs else "")
        return re.findall(r"server (\S+) max_fails", text)


def make_fleet(tmp_path: Path, backend: FakeBackend | None = None, **config) -> tuple[Fleet, FakeBackend, StubNginx]:
    """A saved fleet (no replicas yet) on the fakes, in a fresh state dir under tmp_path."""
    state_dir = StateDir(tmp_path / "home").ensure()
    state_dir.save(FleetState(FleetConfig(**{"drain_timeout_s": 1.0, "ready_timeout_s": 5.0, **config}),
                              fleet_id="test"))
    backend = backend or FakeBackend()
    nginx = StubNginx(state_dir.nginx_dir)
    return Fleet(state_dir, backend=backend, nginx=nginx, http=FakeReplicaHttp(backend)), backend, nginx


def start_serving(tmp_path: Path, num_replicas: int = 2, backend: FakeBackend | None = None,
                  **config) -> tuple[Fleet, FakeBackend, StubNginx]:
    """make_fleet, then `converge` to num_replicas serving replicas."""
    from fleetctl.lifecycle import converge

    fleet, backend, nginx = make_fleet(tmp_path, backend, **config)
    converge(fleet, num_replicas, lambda num_ready, num_wanted: None)
    return fleet, backend, nginx


def run_update(fleet: Fleet, model: str, **options) -> list[tuple[int, int]]:
    """`fleetctl update --model model` (the real Rollout); the (num_done, num_total) it reported."""
    from fleetctl.rollout import Rollout, UpdateOptions

    progress = []
    Rollout(fleet, UpdateOptions(model, **options), lambda done, total: progress.append((done, total))).run()
    return progress


def weights(fleet: Fleet) -> dict[str, str]:
    """Replica id → the folder name of the weights its record says it serves."""
    return {r.id: Path(r.model).name for r in fleet.state_dir.load().sorted_replicas()}
