"""The fleet: the desired state (config, number of replicas) made real on a backend behind NGINX.

Every command and the watcher work through these methods; they hold no state of their own
between calls (the state directory does). Two rules keep traffic safe:
  * a replica enters NGINX only after its /ready answered 200 (`put_in_rotation`);
  * a replica leaves NGINX before it is stopped, and is stopped only after its in-flight requests
    drained (`remove_replicas`).
Every NGINX change goes through `commit`: change the state, render, `nginx -t`, reload, save;
if NGINX refuses, nothing is saved and the running NGINX keeps its config. Every change of the
replica set goes through `transaction` (which `commit` uses), so Prometheus' file_sd targets
(state dir `prometheus/replicas.json`) follow up, scale, update and the watcher alike. A rolling
update (fleetctl/rollout.py) composes the same steps: `start_replicas(1, model=new)`,
`wait_ready(..., gate=...)`, `remove_replicas([old])`.

A Fleet reaches the world through three parts it is given or builds: the backend (replicas),
`Nginx` (apply a config) and `ReplicaHttp` (probe, load, generate); the orchestration tests
give it in-memory stand-ins for all three (tests/fleet/fakes.py).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from fleetctl import nginx as nginx_mod
from fleetctl.backends import make_backend
from fleetctl.backends.base import Backend, Replica, ReplicaSpec
from fleetctl.errors import NotReadyError
from fleetctl.groups import DEFAULT_GROUP
from fleetctl.observability import render_file_sd
from fleetctl.probe import Probe, ReplicaHttp
from fleetctl.state import FleetState, Phase, ReplicaRecord, StateDir
from fleetctl.tls import planned_paths

POLL_S = 0.25
RESTART_STOP_TIMEOUT_S = 5.0  # a failed replica serves nothing: no long drain
T = TypeVar("T")


class Fleet:
    def __init__(self, state_dir: StateDir, say: Callable[[str], None] = lambda line: None,
                 backend: Backend | None = None, nginx: nginx_mod.Nginx | None = None,
                 http: ReplicaHttp | None = None):
        self.state_dir = state_dir
        self.say = say
        self._backend = backend
        self._nginx = nginx
        self.http = http or ReplicaHttp()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            state = self.state_dir.load()
            self._backend = make_backend(state.config, state.fleet_id, self.state_dir)
        return self._backend

    def nginx(self) -> nginx_mod.Nginx:
        return self._nginx or nginx_mod.Nginx(self.state_dir.nginx_dir)

    def event(self, replica_id: str, action: str, reason: str = "") -> None:
        self.say(self.state_dir.log_event(replica_id, action, reason))

    # NGINX --------------------------------------------------------------------------------
    def render_nginx(self, state: FleetState) -> str:
        """The config for the replicas in rotation, one upstream per model group."""
        config = state.config
        tls = planned_paths(self.state_dir.tls_dir, config.tls_cert, config.tls_key)
        serving = state.serving()
        groups = [nginx_mod.ModelGroup(number, g.served_model_name,
                                       tuple(nginx_mod.Upstream(r.id, r.address) for r in serving
                                             if r.group == g.name or not config.groups))
                  for number, g in enumerate(config.model_groups(), start=1)]
        return nginx_mod.render(nginx_mod.site_context(config, state.fleet_id, groups[0].upstreams, tls,
                                                       self.state_dir.nginx_dir, groups=groups))

    def commit(self, change: Callable[[FleetState], T]) -> T:
        """Changes the saved state and brings NGINX in line with it, or neither; returns what
        change(state) returned (e.g. whether it found anything to change)."""
        with self.transaction() as state:
            result = change(state)
            outcome = self.nginx().apply(self.render_nginx(state))
        if outcome != "unchanged":
            self.event("nginx", outcome, f"{len(state.serving())} replica(s) in rotation")
        return result

    def sync_nginx(self) -> FleetState:
        return self.commit(lambda state: state)

    @contextmanager
    def transaction(self) -> Iterator[FleetState]:
        """The state dir's transaction, which also rewrites Prometheus' targets file (under the
        same lock, so two writers never leave an older replica set behind)."""
        with self.state_dir.transaction() as state:
            yield state
            self.write_scrape_targets(state)

    def write_scrape_targets(self, state: FleetState) -> None:
        """Every replica fleetctl runs (loading and draining ones too, so a dashboard sees them
        come and go), as a file_sd document; written atomically and only when it changes."""
        path = self.state_dir.scrape_targets_file
        text = render_file_sd([r.address for r in state.sorted_replicas() if r.port], {"fleet": state.fleet_id})
        if path.exists() and path.read_text() == text:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    # Replicas -----------------------------------------------------------------------------
    def spec(self, state: FleetState, replica_id: str, gpu: str, model: str = "",
             group: str = DEFAULT_GROUP) -> ReplicaSpec:
        """What a replica of `group` runs (with `model` instead of the group's, in an update)."""
        c = state.config
        if not c.groups:  # the implicit group: the fleet's own fields
            return ReplicaSpec(replica_id, model or c.model, c.served_model_name, c.replica_device, gpu,
                               tuple(c.api_keys), c.max_model_len, c.num_kv_blocks, c.drain_timeout_s)
        g = c.group(group)
        device = c.device or ("cuda" if g.gpus or c.gpus else "cpu")
        return ReplicaSpec(replica_id, model or g.model, g.served_model_name, device, gpu, tuple(c.api_keys),
                           drain_timeout_s=c.drain_timeout_s, engine_args=tuple(g.engine_args()), group=g.name)

    @staticmethod
    def pick_gpu(state: FleetState, also_used: list[str] = (), group: str = DEFAULT_GROUP) -> str:
        """Round-robin over the group's GPUs (else --gpus): the one the fewest active replicas use."""
        gpus = state.config.group(group).gpus or state.config.gpus
        if not gpus:
            return ""
        used = [r.gpu for r in state.active()] + list(also_used)
        return min(gpus, key=lambda g: (used.count(g), gpus.index(g)))

    def start_missing(self, num_wanted: int, group: str = DEFAULT_GROUP) -> list[str]:
        """Starts replicas of `group` until num_wanted are active. Counting and starting happen
        under the lock, so `scale` and the watcher never both start the same missing replica."""
        with self.state_dir.locked():
            return self.start_replicas(num_wanted - len(self.state_dir.load().active(group)), group=group)

    def start_replicas(self, count: int, model: str = "", group: str = DEFAULT_GROUP) -> list[str]:
        """Starts `count` more replicas of `group` (of `model`, default the group's), not yet in NGINX."""
        if count <= 0:
            return []
        with self.transaction() as state:
            specs = []
            for _ in range(count):
                gpu = self.pick_gpu(state, [s.gpu for s in specs], group)
                specs.append(self.spec(state, state.new_replica_id(), gpu, model, group))
            replicas = self.backend.start_many(specs)
            for spec, replica in zip(specs, replicas):
                state.replicas[replica.id] = ReplicaRecord(
                    replica.id, replica.host, replica.port, replica.handle, spec.gpu, spec.model,
                    spec.served_model_name, Phase.STARTING, "started", time.time(), group=group)
        for spec, replica in zip(specs, replicas):
            self.event(replica.id, f"started on {self.backend.name} at {replica.host}:{replica.port}",
                       f"GPU {spec.gpu}" if spec.gpu else "CPU")
        return [r.id for r in replicas]

    def restart_replica(self, replica_id: str, reason: str) -> bool:
        """Out of NGINX, then stop and start again (same id, same address where possible).
        Holds the lock throughout, so a concurrent `scale` cannot remove it half-way; a replica
        that is draining or gone is left alone (returns False)."""
        with self.state_dir.locked():
            if not self.take_out(replica_id, Phase.FAILED, reason):
                return False
            state = self.state_dir.load()
            record = state.replicas[replica_id]
            replica = self.backend.restart(self.spec(state, replica_id, record.gpu, record.model, record.group),
                                           record.port,
                                           min(state.config.drain_timeout_s, RESTART_STOP_TIMEOUT_S))

            def restarted(state: FleetState) -> None:
                rec = state.replicas[replica_id]
                rec.host, rec.port, rec.handle = replica.host, replica.port, replica.handle
                rec.phase, rec.reason, rec.started_at_s = Phase.STARTING, f"restarted: {reason}", time.time()
                rec.num_restarts += 1

            self.commit(restarted)
        self.event(replica_id, f"restarted at {replica.host}:{replica.port}", reason)
        return True

    def put_in_rotation(self, replica_id: str, reason: str) -> bool:
        """Into NGINX; False (nothing done) unless it is STARTING or FAILED."""
        def change(state: FleetState) -> bool:
            rec = state.replicas.get(replica_id)
            if rec is None or rec.phase not in (Phase.STARTING, Phase.FAILED):
                return False
            rec.phase, rec.reason = Phase.SERVING, reason
            return True

        if not self.commit(change):
            return False
        self.event(replica_id, "in NGINX", reason)
        return True

    def take_out(self, replica_id: str, phase: Phase, reason: str) -> bool:
        """Out of NGINX into `phase`; False (nothing done) if it is gone or draining."""
        def change(state: FleetState) -> bool | None:  # None: left alone; else whether it was serving
            rec = state.replicas.get(replica_id)
            if rec is None or rec.phase is Phase.DRAINING:
                return None
            was_serving = rec.phase is Phase.SERVING
            rec.phase, rec.reason = phase, reason
            return was_serving

        was_serving = self.commit(change)
        if was_serving:
            self.event(replica_id, "out of NGINX", reason)
        return was_serving is not None

    def remove_surplus(self, num_wanted: int, reason: str, group: str = DEFAULT_GROUP) -> list[str]:
        """Removes replicas of `group` beyond num_wanted: not-ready ones first, then the newest."""
        with self.state_dir.locked():
            active = self.state_dir.load().active(group)
            surplus = sorted(active, key=lambda r: (r.phase is Phase.SERVING, -_index(r.id)))
            ids = [r.id for r in surplus[: max(0, len(active) - num_wanted)]]
            self._mark_draining(ids, reason)
        self._stop_drained(ids, reason)
        return ids

    def remove_replicas(self, ids: list[str], reason: str, forget: bool = True) -> None:
        """Out of NGINX (one reload), wait for in-flight requests to finish, SIGTERM, forget.
        With forget=False the record stays (DRAINING, stopped), so `start_again` can restore it."""
        self._mark_draining(ids, reason)
        self._stop_drained(ids, reason, forget)

    def start_again(self, replica_id: str, reason: str) -> None:
        """Starts a stopped replica again with its recorded model and GPU, on its old address
        where it is free; not in NGINX until `wait_ready` puts it there."""
        with self.state_dir.locked():
            state = self.state_dir.load()
            record = state.replicas[replica_id]
            replica = self.backend.start(self.spec(state, replica_id, record.gpu, record.model, record.group),
                                         record.port)

            def restarted(state: FleetState) -> None:
                rec = state.replicas[replica_id]
                rec.host, rec.port, rec.handle = replica.host, replica.port, replica.handle
                rec.phase, rec.reason, rec.started_at_s = Phase.STARTING, reason, time.time()

            self.commit(restarted)
        self.event(replica_id, f"started again at {replica.host}:{replica.port}", reason)

    def forget(self, replica_id: str) -> None:
        with self.transaction() as state:
            state.replicas.pop(replica_id, None)

    def _mark_draining(self, ids: list[str], reason: str) -> None:
        if not ids:
            return

        def drain(state: FleetState) -> set[str]:  # the ones that were in NGINX
            was_serving = {rid for rid in ids if state.replicas[rid].phase is Phase.SERVING}
            for rid in ids:
                state.replicas[rid].phase, state.replicas[rid].reason = Phase.DRAINING, reason
            return was_serving

        was_serving = self.commit(drain)
        for rid in ids:
            self.event(rid, "out of NGINX, draining" if rid in was_serving else "draining", reason)

    def _stop_drained(self, ids: list[str], reason: str, forget: bool = True) -> None:
        if not ids:
            return
        state = self.state_dir.load()
        timeout_s = state.config.drain_timeout_s
        key = state.config.client_api_key

        def stop(record: ReplicaRecord) -> None:
            # NGINX sends it nothing new now; let what it runs finish, then SIGTERM (which
            # drains too, for a replica whose /metrics does not answer).
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and (self.http.load(record.url, key).num_in_flight or 0) > 0:
                time.sleep(POLL_S)
            self.backend.stop(record.id, timeout_s)
            if forget:
                self.forget(record.id)
            self.event(record.id, "stopped", reason)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(stop, [state.replicas[rid] for rid in ids if rid in state.replicas]))

    def refresh(self) -> dict[str, Replica]:
        """Reconciles the records with what the backend runs (Swarm replaces tasks on its own:
        a new task of a slot means a new address, which must pass /ready again)."""
        seen = self.backend.list()
        names_itself = self.backend.info.names_replicas_itself

        def change(state: FleetState) -> list[tuple[str, str]]:  # (replica, what happened) for the log
            changes = []
            for rid, rec in list(state.replicas.items()):
                replica = seen.get(rid)
                if replica is None:
                    if names_itself and rec.phase is not Phase.DRAINING:
                        del state.replicas[rid]
                        changes.append((rid, f"gone from {self.backend.name}"))
                elif (replica.host, replica.port, replica.handle) != (rec.host, rec.port, rec.handle) and replica.port:
                    rec.host, rec.port, rec.handle = replica.host, replica.port, replica.handle
                    rec.started_at_s = replica.started_at_s or time.time()
                    changes.append((rid, f"replaced by {self.backend.name}: now {replica.handle} at {rec.address}"))
                    if rec.phase is Phase.SERVING:
                        changes.append((rid, "out of NGINX until ready"))
                    if rec.phase is not Phase.DRAINING:
                        # the new task is loading, also when the old one had already left NGINX
                        # (failed): the watcher gives it the ready timeout, not restart_after_s
                        rec.phase, rec.reason = Phase.STARTING, "replaced by the backend"
                elif self._restarted_in_place(rec, replica):
                    # Docker's restart policy brought the crashed process back: it is loading,
                    # so the watcher gives it the ready timeout, not restart_after_s
                    changes.append((rid, f"restarted by {self.backend.name}"))
                    if rec.phase is Phase.SERVING:  # crashed and back between two looks
                        changes.append((rid, "out of NGINX until ready"))
                    rec.phase, rec.reason = Phase.STARTING, f"restarted by {self.backend.name}"
                    rec.started_at_s = replica.started_at_s
                if replica is not None and replica.started_at_s:
                    rec.process_seen = f"{replica.handle}@{replica.started_at_s!r}"
            if names_itself:
                for rid, replica in seen.items():
                    if rid not in state.replicas and replica.port:
                        group = state.config.group(replica.labels.get("group", DEFAULT_GROUP))
                        state.replicas[rid] = ReplicaRecord(rid, replica.host, replica.port, replica.handle, "",
                                                            group.model, group.served_model_name,
                                                            Phase.STARTING, f"found on {self.backend.name}",
                                                            replica.started_at_s or time.time(), group=group.name)
            return changes

        for rid, what in self.commit(change):
            self.event(rid, what)
        return seen

    @staticmethod
    def _restarted_in_place(rec: ReplicaRecord, replica: Replica) -> bool:
        """The handle refresh saw before with a later process start, and not draining."""
        handle, _, started_at_s = rec.process_seen.rpartition("@")
        return (handle == replica.handle == rec.handle and replica.started_at_s > float(started_at_s or "inf")
                and rec.phase is not Phase.DRAINING)

    def probe_active(self, state: FleetState) -> dict[str, Probe]:
        """/health and /ready of every active replica, in parallel: what converge and the watcher
        decide on."""
        active, key = state.active(), state.config.client_api_key
        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(zip([r.id for r in active], pool.map(lambda r: self.http.probe(r.url, key), active)))

    def wait_ready(self, ids: list[str], timeout_s: float, on_ready: Callable[[str], None] = lambda rid: None,
                   gate: Callable[[ReplicaRecord, float], None] | None = None,
                   timeout_option: str = "--ready-timeout") -> None:
        """Polls each replica's /ready; each goes into NGINX as soon as it answers 200 (and,
        given a `gate`, once gate(record, seconds_left) returned; it raises to keep the replica
        out). Raises NotReadyError when one exits during start-up or the time runs out."""
        pending = set(ids)
        deadline = time.monotonic() + timeout_s
        next_liveness_check = 0.0
        while pending:
            state = self.state_dir.load()
            key = state.config.client_api_key
            for rid in sorted(pending):
                rec = state.replicas.get(rid)
                if rec is None or rec.phase in (Phase.SERVING, Phase.DRAINING):
                    pending.discard(rid)  # someone else (the watcher, a scale) took care of it
                    on_ready(rid)
                elif self.http.probe(rec.url, key).is_ready:
                    if gate is not None:
                        gate(rec, max(1.0, deadline - time.monotonic()))
                    self.put_in_rotation(rid, "/ready 200" + (" and its gate" if gate else ""))
                    pending.discard(rid)
                    on_ready(rid)
            if pending and time.monotonic() > next_liveness_check:
                seen = self.backend.list()
                for rid in pending:
                    replica, rec = seen.get(rid), state.replicas.get(rid)
                    if replica is None or not replica.is_alive or (rec and replica.handle != rec.handle):
                        last = _last_line(self.backend, rid)
                        raise NotReadyError(f"replica {rid} exited while loading ({last}); "
                                            f"see `fleetctl logs {rid}`")
                next_liveness_check = time.monotonic() + 1.0
            if pending and time.monotonic() > deadline:
                raise NotReadyError(f"{', '.join(sorted(pending))} not ready after {timeout_s:.0f} s; "
                                    f"see `fleetctl logs {min(pending)}` or raise {timeout_option}")
            if pending:
                time.sleep(POLL_S)


def _index(replica_id: str) -> int:
    digits = "".join(c for c in replica_id if c.isdigit())
    return int(digits) if digits else 0


def _last_line(backend: Backend, replica_id: str) -> str:
    try:
        lines = [line for line in backend.logs(replica_id, tail=20) if line.strip()]
    except Exception:  # logs are a courtesy here; the error message must still come out
        lines = []
    return lines[-1].strip()[:200] if lines else "no output"
