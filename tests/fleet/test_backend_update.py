"""`fleetctl update` on a backend that runs its own rolling update (`RollingUpdates`: Swarm),
against tests/fleet/fakes.py's FakeRollingBackend: the real Rollout and backend_update gate each
new replica and follow the backend's rollback, in milliseconds. The real Swarm runs in
tests/fleet/test_rollout.py."""
from __future__ import annotations

import time

import pytest

from fleetctl.backends.base import RollingUpdates
from fleetctl.errors import FleetError
from fleetctl.state import UpdatePhase
from tests.fleet.fakes import NO_TOKENS, FakeRollingBackend, run_update, start_serving, weights

pytestmark = pytest.mark.usefixtures("fast_polls")


def test_a_backend_with_its_own_rolling_update_is_gated_replica_by_replica(tmp_path, models):
    m1, m2 = models
    fleet, backend, nginx = start_serving(tmp_path, backend=FakeRollingBackend(), model=m1)
    assert isinstance(backend, RollingUpdates)
    progress = run_update(fleet, m2)
    assert progress[-1] == (2, 2) and weights(fleet) == {"r1": "m2", "r2": "m2"}
    assert sorted(nginx.upstreams()) == sorted(f"127.0.0.1:{r.port}" for r in backend.replicas.values())
    assert fleet.state_dir.load().update.phase is UpdatePhase.DONE


def test_a_backend_update_whose_new_replica_fails_its_gate_is_rolled_back_by_the_backend(tmp_path, models):
    m1, m2 = models
    fleet, backend, nginx = start_serving(tmp_path, backend=FakeRollingBackend(), model=m1)
    backend.behave(m2, NO_TOKENS)
    with pytest.raises(FleetError, match="failed its test generation.*NGINX serves only m1"):
        run_update(fleet, m2)
    assert backend.status["State"] == "rollback_completed"
    assert {r.spec.model for r in backend.replicas.values()} == {m1} and weights(fleet) == {"r1": "m1", "r2": "m1"}
    assert sorted(nginx.upstreams()) == sorted(f"127.0.0.1:{r.port}" for r in backend.replicas.values())


STUCK_WORDS = r"the Rolling update did not finish within 0 s per replica: task t1: health check starting \(exit -1"


@pytest.mark.parametrize("backend_kwargs, words", [({"pause_after": 1}, "Rolling paused the update: task: health"),
                                                   ({"stuck": True}, STUCK_WORDS)])
def test_a_backend_update_that_pauses_or_hangs_is_rolled_back(tmp_path, models, backend_kwargs, words):
    m1, m2 = models
    fleet, backend, nginx = start_serving(tmp_path, backend=FakeRollingBackend(**backend_kwargs), model=m1)
    with pytest.raises(FleetError, match=f"halted and rolled back: {words}"):
        run_update(fleet, m2, timeout_s=0.02)
    assert {r.spec.model for r in backend.replicas.values()} == {m1} and len(fleet.state_dir.load().serving()) == 2


def test_a_task_the_backend_stops_leaves_nginx_before_it_exits_and_the_rollback_gates_its_successor(
        tmp_path, models):
    """Swarm stops a slot's old task as soon as the new one passes Swarm's health check, which may
    be before fleetctl's gate fails the new one. The old task must leave NGINX before it exits
    and never come back; the slot's task from the rollback enters NGINX only after /ready and
    the same gate as in the update."""
    m1, m2 = models
    fleet, backend, nginx = start_serving(tmp_path, backend=FakeRollingBackend(), model=m1)
    old_r1 = backend.address("r1")
    in_nginx_at_exit: dict[str, bool] = {}
    backend.on_exit = lambda address: in_nginx_at_exit.setdefault(address, address in nginx.upstreams())
    backend.behave(m2, NO_TOKENS)
    num_configs = len(nginx.configs)
    with pytest.raises(FleetError, match="r1 .* failed its test generation.*NGINX serves only m1"):
        run_update(fleet, m2)

    assert in_nginx_at_exit == {old_r1: False}  # out of NGINX before its process was gone
    configs = [set(nginx.upstreams(config)) for config in nginx.configs[num_configs:]]
    first_without = next(i for i, upstreams in enumerate(configs) if old_r1 not in upstreams)
    assert not any(old_r1 in upstreams for upstreams in configs[first_without:])  # never back
    failed_new = [f"127.0.0.1:{r.port}" for r in backend.stopping.values()]  # the rollback stops it
    assert failed_new and not any(address in upstreams for address in failed_new for upstreams in configs)
    assert sorted(nginx.upstreams()) == sorted(backend.address(rid) for rid in ("r1", "r2"))
    assert weights(fleet) == {"r1": "m1", "r2": "m1"}
    rolled_back_r1 = backend.replicas["r1"].handle
    events = fleet.state_dir.events_file.read_text().splitlines()
    gate = next(i for i, e in enumerate(events) if "r1: passed its gate" in e)
    entered = next(i for i, e in enumerate(events) if "r1: in NGINX" in e and i > gate)
    assert gate < entered and "r1: out of NGINX (Rolling stops its task" in "\n".join(events)
    assert fleet.state_dir.load().replicas["r1"].handle == rolled_back_r1


def test_a_task_the_backend_stops_during_its_successors_gate_leaves_nginx_before_that_gate_ends(tmp_path, models):
    """Swarm's own health check may pass, and Swarm stop the slot's old task, while fleetctl's
    gate of the new task is still generating (tens of seconds on a loaded machine): the old task
    leaves NGINX during that gate, not after it. Each gate here waits (5 s at most) for that."""
    m1, m2 = models
    backend = FakeRollingBackend(stops_old_during_gate=True)
    fleet, backend, nginx = start_serving(tmp_path, backend=backend, model=m1)
    left_during_gate: dict[str, bool] = {}

    def gate_waits_for_nginx(old) -> None:
        address = f"127.0.0.1:{old.port}"
        deadline = time.monotonic() + 5.0
        while address in nginx.upstreams() and time.monotonic() < deadline:
            time.sleep(0.001)
        left_during_gate[address] = address not in nginx.upstreams()

    backend.on_stop_during_gate = gate_waits_for_nginx
    run_update(fleet, m2)
    assert len(left_during_gate) == 2 and all(left_during_gate.values()), left_during_gate
    assert weights(fleet) == {"r1": "m2", "r2": "m2"}
    assert sorted(nginx.upstreams()) == sorted(backend.address(rid) for rid in ("r1", "r2"))
