"""`fleetctl update` on a backend that runs rolling updates itself (`info.has_rolling_update`,
the `RollingUpdates` protocol of backends/base.py; Swarm's service update).

The backend replaces the replicas one at a time, each new one started before its old one stops
(Swarm: parallelism 1, start-first, rollback on failure). fleetctl keeps the same guarantees as
its own rollout (fleetctl/rollout.py): it gates each new replica (/ready, then one real
generation) and only then moves that replica's NGINX address to it, in one reload.

Swarm stops a slot's old task as soon as its successor passes Swarm's own health check (/ready),
which may come before fleetctl's gate. fleetctl polls which tasks the backend is stopping
(`stopping_handles`) and takes each out of NGINX at once, in one reload; the reload's new workers
hold no kept-alive connection to it. The polling goes on while a gate runs (`_gate`): under load
a gate's generation can take tens of seconds. Until the reload the old task drains, refusing new
requests with 503, and NGINX passes those to another replica (`proxy_next_upstream ... http_503`
in lb/nginx.conf.j2). A task the backend stops never enters NGINX again.

When a gate fails, the backend reports a rollback or pause, or the time runs out, the backend is
asked to roll back; fleetctl keeps taking out what the rollback stops, waits for it, takes over
the tasks it left running (`Fleet.refresh`), puts each new one in NGINX only after /ready and the
same gate, and the rollout's `roll_back` raises the one-line error.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from fleetctl.errors import FleetError
from fleetctl.fleet import POLL_S
from fleetctl.models import weights_name
from fleetctl.state import FleetState, Phase, ReplicaRecord

if TYPE_CHECKING:
    from fleetctl.rollout import Rollout


def run_backend_update(rollout: "Rollout") -> None:
    """Returns once every replica serves the rollout's target and passed its gate; raises the
    rollout's FleetError after a rollback otherwise."""
    fleet = rollout.fleet
    backend = fleet.backend
    state = fleet.state_dir.load()
    group = rollout.group
    previous_update = backend.update_status(group).get("StartedAt")
    backend.update_model(fleet.spec(state, "", "", rollout.target, group))
    who = backend.name.capitalize()  # "Swarm"
    rollout.record(step=f"{who} replaces the replicas one at a time (start-first)")
    timeout_s = rollout.options.timeout_s or state.config.ready_timeout_s
    deadline = time.monotonic() + timeout_s * max(1, len(state.active(group)))
    gated: set[str] = set()  # handles of the new replicas that passed their gate

    def halt(error: FleetError) -> None:
        backend.roll_back_model(group)  # a no-op when the backend already rolls back
        try:
            _follow_rollback(rollout, previous_update)
        except FleetError as exc:
            rollout.roll_back(error, failure=str(exc))
        rollout.roll_back(error)

    while True:
        seen = backend.list()
        take_out_stopping(fleet, group)
        state = fleet.state_dir.load()
        for rid, rec in state.replicas.items():
            replica = seen.get(rid) if rec.group == group else None
            if replica is None or not replica.port or not replica.is_alive or replica.handle == rec.handle \
                    or replica.handle in gated:
                continue  # not replaced yet, already moved, or going away itself
            candidate = ReplicaRecord(rid, replica.host, replica.port, replica.handle, rec.gpu, rollout.target,
                                      group=group)
            if not fleet.http.probe(candidate.url, state.config.client_api_key).is_ready:
                continue
            try:
                _gate(rollout, candidate, max(1.0, deadline - time.monotonic()))
            except FleetError as exc:
                halt(exc)
            if replica.handle in backend.stopping_handles(group):
                continue  # stopped by the backend during its gate (its own rollback): never in NGINX
            gated.add(replica.handle)
            _repoint(fleet, rid, candidate)
            rollout.record(num_done=len(gated))
            rollout.on_progress(len(gated), state.update.num_total)
        update = backend.update_status(group)
        status = update.get("State", "") if update.get("StartedAt") != previous_update else ""  # not ours yet
        if status.startswith("rollback") or status == "paused":
            halt(FleetError(f"{who} {'rolled back' if status.startswith('rollback') else 'paused'} "
                            f"the update: {backend.update_message(group)}"))
        if status == "completed" and len(gated) >= len(state.active(group)):
            return
        if time.monotonic() > deadline:
            why = backend.update_message(group)
            halt(FleetError(f"the {who} update did not finish within {timeout_s:.0f} s per replica"
                            + (f": {why}" if why else "")))
        time.sleep(POLL_S)


def _gate(rollout: "Rollout", record: ReplicaRecord, seconds_left: float) -> None:
    """The rollout's gate of a new replica (one real generation), on a thread, while this one
    goes on taking out of NGINX what the backend stops meanwhile: Swarm's own health check may
    pass, and Swarm stop the slot's old task, during a gate that takes seconds under load.
    Raises the gate's FleetError."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate") as pool:
        gate = pool.submit(rollout.check_generation, record, seconds_left)
        while not wait([gate], timeout=POLL_S).done:
            take_out_stopping(rollout.fleet, rollout.group)
        gate.result()


def _repoint(fleet, replica_id: str, new: ReplicaRecord) -> None:
    """One reload: the replica's old address leaves NGINX, its new one enters it."""
    def change(state: FleetState) -> None:
        rec = state.replicas[replica_id]
        rec.host, rec.port, rec.handle, rec.model = new.host, new.port, new.handle, new.model
        rec.phase, rec.reason, rec.started_at_s = Phase.SERVING, "new task passed its gate", time.time()

    fleet.commit(change)
    fleet.event(replica_id, f"now {new.handle} at {new.address} in NGINX", weights_name(new.model))


def take_out_stopping(fleet, group: str) -> list[str]:
    """Takes out of NGINX, in one reload, the group's replicas whose task the backend stops (or
    has stopped) on its own; returns their ids. They stay out: the slot's next task has to pass
    /ready and the gate to enter."""
    stopping = fleet.backend.stopping_handles(group)
    if not any(r.group == group and r.handle in stopping for r in fleet.state_dir.load().serving()):
        return []  # the usual case: no lock taken, nothing written

    def change(state: FleetState) -> list[ReplicaRecord]:
        records = [r for r in state.serving() if r.group == group and r.handle in stopping]
        for rec in records:
            rec.phase, rec.reason = Phase.STARTING, f"{fleet.backend.name} stops its task {rec.handle}"
        return records

    records = fleet.commit(change)
    for rec in records:
        fleet.event(rec.id, "out of NGINX", f"{fleet.backend.name.capitalize()} stops its task {rec.handle} "
                                            f"at {rec.address}")
    return [r.id for r in records]


def _follow_rollback(rollout: "Rollout", previous_update: str | None) -> None:
    """Waits for the backend's rollback of this update (not an older one's status), taking out of
    NGINX whatever it stops meanwhile, then brings NGINX to the tasks that run the old spec: each
    new one enters after /ready and the gate, as in the update."""
    fleet = rollout.fleet
    backend = fleet.backend
    group = rollout.group
    deadline = time.monotonic() + fleet.state_dir.load().config.ready_timeout_s
    while time.monotonic() < deadline:
        take_out_stopping(fleet, group)
        update = backend.update_status(group)
        if update.get("StartedAt") != previous_update and \
                update.get("State") in ("rollback_completed", "rollback_paused"):
            break
        time.sleep(POLL_S)
    fleet.refresh()  # each slot's record follows the task the backend runs for it now
    take_out_stopping(fleet, group)
    with fleet.transaction() as state:  # every replica of the group runs the old spec again
        for rec in state.replicas.values():
            if rec.group == group:
                rec.model = rollout.from_model

    def gate(record: ReplicaRecord, seconds_left: float) -> None:
        if record.handle in backend.stopping_handles(group):
            raise FleetError(f"{backend.name.capitalize()} stops {record.id}'s task {record.handle} and runs "
                             f"no other in its slot")
        _gate(rollout, record, seconds_left)

    state = fleet.state_dir.load()
    fleet.wait_ready([r.id for r in state.active(group) if r.phase is not Phase.SERVING],
                     state.config.ready_timeout_s, gate=gate)
