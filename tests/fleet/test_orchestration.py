"""What the fleet decides (start, stop, eject, restart, re-add, replace, roll back), against the
in-memory backend, replica HTTP and NGINX stub of tests/fleet/fakes.py: the real `Fleet`,
`converge`, `Watcher` and `Rollout` on a real state directory, in milliseconds. The end-to-end
files (test_local_fleet, test_rollout, test_docker_fleet) prove the real parts fit together."""
from __future__ import annotations

import subprocess

import pytest

from fleetctl.backends.base import BackendInfo
from fleetctl.errors import FleetError, NginxConfigError, NotReadyError
from fleetctl.health import Watcher
from fleetctl.lifecycle import converge, down
from fleetctl.state import Phase, UpdatePhase, UpdateProgress
from fleetctl.status import collect
from tests.fleet.fakes import (EXITS, GOOD, NEVER_READY, NO_TOKENS, FakeBackend, make_fleet, run_update,
                               start_serving, weights)


pytestmark = pytest.mark.usefixtures("fast_polls")


def phases(fleet) -> dict[str, str]:
    return {r.id: r.phase.value for r in fleet.state_dir.load().sorted_replicas()}


def in_nginx(fleet, nginx) -> list[str]:
    """Replica ids behind the addresses of NGINX's last applied upstream, in order."""
    by_address = {r.address: r.id for r in fleet.state_dir.load().replicas.values()}
    return [by_address.get(address, address) for address in nginx.upstreams()]


# converge and scale -----------------------------------------------------------------------
def test_converge_starts_the_missing_replicas_and_puts_each_in_nginx_once_ready(tmp_path):
    fleet, backend, nginx = make_fleet(tmp_path)
    seen = []
    converge(fleet, 2, lambda num_ready, num_wanted: seen.append((num_ready, num_wanted)))
    assert phases(fleet) == {"r1": "serving", "r2": "serving"}
    assert in_nginx(fleet, nginx) == ["r1", "r2"]
    assert seen[0] == (0, 2) and seen[-1] == (2, 2)


def test_converge_again_touches_no_healthy_replica(tmp_path):
    fleet, backend, nginx = start_serving(tmp_path)
    num_actions, num_configs = len(backend.actions), len(nginx.configs)
    converge(fleet, 2, lambda *_: None)
    assert len(backend.actions) == num_actions and len(nginx.configs) == num_configs


def test_scale_down_removes_not_ready_replicas_first_then_the_newest(tmp_path):
    fleet, backend, nginx = start_serving(tmp_path, 4)
    backend.replicas["r2"].behaviour = NEVER_READY  # r2 stops answering /ready
    converge(fleet, 2, lambda *_: None)
    assert sorted(backend.stops()) == ["r2", "r4"]
    assert phases(fleet) == {"r1": "serving", "r3": "serving"}
    assert in_nginx(fleet, nginx) == ["r1", "r3"]


def test_scale_to_zero_and_back_keeps_counting_ids_up(tmp_path):
    fleet, backend, nginx = start_serving(tmp_path)
    converge(fleet, 0, lambda *_: None)
    assert phases(fleet) == {} and nginx.upstreams() == []
    converge(fleet, 1, lambda *_: None)
    assert phases(fleet) == {"r3": "serving"}


def test_converge_restarts_a_replica_whose_process_is_gone_on_its_address(tmp_path):
    fleet, backend, nginx = start_serving(tmp_path)
    port = backend.replicas["r1"].port
    backend.crash("r1")
    converge(fleet, 2, lambda *_: None)
    assert backend.stops() == ["r1"] and backend.replicas["r1"].port == port
    record = fleet.state_dir.load().replicas["r1"]
    assert record.phase is Phase.SERVING and record.num_restarts == 1


def test_converge_fails_with_the_replicas_last_line_when_it_exits_while_loading(tmp_path, models):
    fleet, backend, nginx = make_fleet(tmp_path, model=models[0])
    backend.behave(models[0], GOOD, EXITS)
    with pytest.raises(NotReadyError, match=r"replica r2 exited while loading \(ValueError: unsupported"):
        converge(fleet, 2, lambda *_: None)
    assert in_nginx(fleet, nginx) == ["r1"]


def test_a_replica_that_never_gets_ready_times_out_and_stays_out_of_nginx(tmp_path, models):
    fleet, backend, nginx = make_fleet(tmp_path, model=models[0], ready_timeout_s=0.05)
    backend.behave(models[0], NEVER_READY)
    with pytest.raises(NotReadyError, match="r1 not ready after 0 s"):
        converge(fleet, 1, lambda *_: None)
    assert phases(fleet) == {"r1": "starting"} and nginx.upstreams() == []


def test_a_config_nginx_refuses_changes_neither_nginx_nor_the_saved_state(tmp_path):
    fleet, backend, nginx = start_serving(tmp_path)
    nginx.reject_next = True
    with pytest.raises(NginxConfigError):
        fleet.take_out("r1", Phase.FAILED, "test")
    assert phases(fleet) == {"r1": "serving", "r2": "serving"} and in_nginx(fleet, nginx) == ["r1", "r2"]


def test_down_stops_every_replica_and_nginx_and_forgets_the_fleet(tmp_path):
    fleet, backend, nginx = start_serving(tmp_path)
    assert sorted(down(fleet)) == ["r1", "r2"]
    assert backend.replicas == {} and not nginx.is_running and not fleet.state_dir.has_fleet()


# the watcher ------------------------------------------------------------------------------
def test_watcher_ejects_a_serving_replica_after_threshold_failed_polls_and_readds_it_when_ready(tmp_path):
    fleet, backend, nginx = start_serving(tmp_path)
    watcher = Watcher(fleet, failure_threshold=2)
    backend.replicas["r1"].behaviour = NEVER_READY  # alive and healthy, /ready 503 (e.g. draining)
    watcher.tick()
    assert in_nginx(fleet, nginx) == ["r1", "r2"]  # one failed poll is not enough
    watcher.tick()
    assert in_nginx(fleet, nginx) == ["r2"] and phases(fleet)["r1"] == "starting"
    backend.replicas["r1"].behaviour = GOOD
    watcher.tick()
    assert in_nginx(fleet, nginx) == ["r1", "r2"] and backend.stops() == []


def test_watcher_restarts_an_unhealthy_replica_after_restart_after_s(tmp_path):
    fleet, backend, nginx = start_serving(tmp_path)
    watcher = Watcher(fleet, failure_threshold=1, restart_after_s=0.0)
    backend.replicas["r2"].is_healthy = False  # the process lives, /health fails
    watcher.tick()
    assert phases(fleet)["r2"] == "failed" and in_nginx(fleet, nginx) == ["r1"] and backend.stops() == []
    watcher.tick()  # out for longer than restart_after_s: restarted, then in NGINX once ready
    assert backend.stops() == ["r2"] and phases(fleet)["r2"] == "starting"
    watcher.tick()
    assert in_nginx(fleet, nginx) == ["r1", "r2"]
    assert fleet.state_dir.load().replicas["r2"].num_restarts == 1


def test_watcher_gives_an_unhealthy_replica_time_before_restarting_it(tmp_path):
    fleet, backend, nginx = start_serving(tmp_path)
    watcher = Watcher(fleet, failure_threshold=1, restart_after_s=3600.0)
    backend.replicas["r2"].is_healthy = False
    for _ in range(3):
        watcher.tick()
    assert backend.stops() == [] and phases(fleet)["r2"] == "failed"


def test_watcher_restarts_a_dead_process_at_once(tmp_path):
    fleet, backend, nginx = start_serving(tmp_path)
    backend.crash("r1")
    Watcher(fleet).tick()
    assert backend.stops() == ["r1"] and [rid for rid, _ in backend.starts()] == ["r1", "r2", "r1"]
    assert "r1: restarted" in fleet.state_dir.events_file.read_text()


def test_watcher_waits_for_a_backend_that_restarts_crashed_replicas_itself(tmp_path):
    """Swarm replaces a crashed task (a new handle and address); the new one loads for longer
    than restart_after_s on a slow machine, and must get the ready timeout instead."""
    backend = FakeBackend(BackendInfo(restarts_on_crash=True))
    fleet, backend, nginx = start_serving(tmp_path, backend=backend)
    watcher = Watcher(fleet, failure_threshold=1, restart_after_s=0.0)
    backend.crash("r1")
    watcher.tick()
    assert backend.stops() == [] and in_nginx(fleet, nginx) == ["r2"]
    backend.start(backend.replicas["r1"].spec)  # the engine restarts it: a new handle and address
    backend.replicas["r1"].is_healthy = False  # still loading
    for _ in range(3):
        watcher.tick()  # the fleet takes the new address over; it must pass /ready again
    assert phases(fleet)["r1"] == "starting" and backend.stops() == []
    backend.replicas["r1"].is_healthy = True  # loaded
    watcher.tick()
    assert in_nginx(fleet, nginx) == ["r1", "r2"] and backend.stops() == []


def test_watcher_gives_a_replica_the_backend_restarted_in_place_the_ready_timeout(tmp_path):
    """Docker's restart policy keeps the container (same handle) and starts its process again; a
    loading replica that outlasts restart_after_s (a slow machine) must not be recreated."""
    backend = FakeBackend(BackendInfo(restarts_on_crash=True))
    fleet, backend, nginx = start_serving(tmp_path, backend=backend)
    watcher = Watcher(fleet, failure_threshold=1, restart_after_s=0.0)
    watcher.tick()  # refresh notes each process's start
    replica = backend.replicas["r1"]
    backend.crash("r1")
    watcher.tick()
    assert phases(fleet)["r1"] == "failed" and in_nginx(fleet, nginx) == ["r2"]
    replica.is_alive, replica.started_at_s = True, replica.started_at_s + 5  # back, still loading
    for _ in range(3):
        watcher.tick()
    record = fleet.state_dir.load().replicas["r1"]
    assert backend.stops() == [] and record.phase is Phase.STARTING
    assert record.reason == "restarted by fake" and record.handle == replica.handle
    replica.is_healthy = True  # loaded
    watcher.tick()
    assert in_nginx(fleet, nginx) == ["r1", "r2"] and backend.stops() == []


def test_watcher_restarts_a_replica_not_ready_within_the_ready_timeout(tmp_path, models):
    fleet, backend, nginx = make_fleet(tmp_path, model=models[0], ready_timeout_s=0.001, num_replicas=1)
    backend.behave(models[0], NEVER_READY, GOOD)
    fleet.start_replicas(1)
    watcher = Watcher(fleet)
    watcher.tick()
    assert backend.stops() == ["r1"]
    watcher.tick()
    assert in_nginx(fleet, nginx) == ["r1"]


def test_watcher_starts_replicas_until_the_wanted_number_runs(tmp_path):
    fleet, backend, nginx = start_serving(tmp_path)
    backend.stop("r2", 0)  # gone behind the fleet's back (e.g. removed by hand)
    with fleet.state_dir.transaction() as state:
        state.config.num_replicas = 3
    watcher = Watcher(fleet)
    watcher.tick()
    watcher.tick()
    assert phases(fleet) == {"r1": "serving", "r2": "serving", "r3": "serving"}


def test_watcher_pauses_while_an_update_owned_by_a_live_process_runs(tmp_path):
    fleet, backend, nginx = start_serving(tmp_path)
    with fleet.state_dir.transaction() as state:
        state.update = UpdateProgress("/m2", "/m1", num_total=2).claim()  # owned by this live process
    backend.crash("r1")
    watcher = Watcher(fleet)
    watcher.tick()
    assert watcher.is_paused and backend.stops() == []
    with fleet.state_dir.transaction() as state:
        state.update.phase = UpdatePhase.DONE
    watcher.tick()
    assert not watcher.is_paused and backend.stops() == ["r1"]


def test_an_update_whose_owner_died_counts_as_interrupted(tmp_path):
    fleet, backend, nginx = start_serving(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    with fleet.state_dir.transaction() as state:
        state.update = UpdateProgress("/m2", "/m1", num_total=2, pid=dead.pid, pid_start_ticks=1)
    state = fleet.state_dir.load()
    assert not state.is_update_running()
    state.refuse_during_update("scale")  # does not raise
    update = collect(fleet)["update"]
    assert update["is_interrupted"] and not update["is_running"]


# rolling update ---------------------------------------------------------------------------
def test_update_with_surge_replaces_each_replica_new_one_first(tmp_path, models):
    m1, m2 = models
    fleet, backend, nginx = start_serving(tmp_path, model=m1)
    progress = run_update(fleet, m2)
    assert progress == [(0, 2), (1, 2), (2, 2)]
    assert weights(fleet) == {"r3": "m2", "r4": "m2"} and in_nginx(fleet, nginx) == ["r3", "r4"]
    # each new replica started while its old one still served, and entered NGINX before the old left
    assert backend.actions[2:] == [("start", "r3", m2), ("stop", "r1", m1), ("start", "r4", m2), ("stop", "r2", m1)]
    assert [set(map(backend.id_at, nginx.upstreams(config))) for config in nginx.configs[-4:]] == \
        [{"r1", "r2", "r3"}, {"r2", "r3"}, {"r2", "r3", "r4"}, {"r3", "r4"}]
    state = fleet.state_dir.load()
    assert state.config.model == m2 and state.update.phase is UpdatePhase.DONE


def test_update_in_place_frees_the_gpu_first_when_no_gpu_is_spare(tmp_path, models):
    m1, m2 = models
    fleet, backend, nginx = start_serving(tmp_path, model=m1, gpus=["0", "1"])
    run_update(fleet, m2, max_surge=0, max_unavailable=1)
    assert backend.actions[2:] == [("stop", "r1", m1), ("start", "r3", m2), ("stop", "r2", m1), ("start", "r4", m2)]
    state = fleet.state_dir.load()
    assert {r.id: r.gpu for r in state.serving()} == {"r3": "0", "r4": "1"}


def test_update_without_room_and_without_max_unavailable_halts_before_touching_anything(tmp_path, models):
    m1, m2 = models
    fleet, backend, nginx = start_serving(tmp_path, model=m1, gpus=["0", "1"])
    with pytest.raises(FleetError, match="no free GPU .* pass --max-unavailable 1"):
        run_update(fleet, m2)
    assert backend.actions[2:] == [] and weights(fleet) == {"r1": "m1", "r2": "m1"}
    assert fleet.state_dir.load().update.phase is UpdatePhase.ROLLED_BACK


@pytest.mark.parametrize("behaviour, words", [(EXITS, "exited while loading"), (NEVER_READY, "not ready after"),
                                              (NO_TOKENS, "failed its test generation")])
def test_a_new_replica_failing_its_gate_is_removed_and_the_old_ones_serve_on(tmp_path, models, behaviour, words):
    m1, m2 = models
    fleet, backend, nginx = start_serving(tmp_path, model=m1)
    backend.behave(m2, behaviour)
    with pytest.raises(FleetError, match=f"halted and rolled back: .*{words}.*NGINX serves only m1"):
        run_update(fleet, m2, timeout_s=0.05)
    assert weights(fleet) == {"r1": "m1", "r2": "m1"} and in_nginx(fleet, nginx) == ["r1", "r2"]
    assert backend.stops() == ["r3"]
    state = fleet.state_dir.load()
    assert state.update.phase is UpdatePhase.ROLLED_BACK and state.config.model == m1


def test_in_place_gate_failure_starts_the_old_replica_again_on_its_address(tmp_path, models):
    m1, m2 = models
    fleet, backend, nginx = start_serving(tmp_path, model=m1, gpus=["0", "1"])
    port = backend.replicas["r1"].port
    backend.behave(m2, NO_TOKENS)
    with pytest.raises(FleetError, match="halted and rolled back"):
        run_update(fleet, m2, max_surge=0, max_unavailable=1)
    assert backend.actions[2:] == [("stop", "r1", m1), ("start", "r3", m2), ("stop", "r3", m2), ("start", "r1", m1)]
    assert backend.replicas["r1"].port == port and in_nginx(fleet, nginx) == ["r1", "r2"]
    assert "restored: its replacement failed its gate" in fleet.state_dir.events_file.read_text()


def test_a_failure_midway_moves_the_replicas_already_updated_back(tmp_path, models):
    m1, m2 = models
    fleet, backend, nginx = start_serving(tmp_path, model=m1, num_replicas=3)
    backend.behave(m2, GOOD, EXITS)  # the first new replica passes, the second exits
    with pytest.raises(FleetError, match="halted and rolled back.*NGINX serves only m1"):
        run_update(fleet, m2)
    assert set(weights(fleet).values()) == {"m1"} and len(fleet.state_dir.load().serving()) == 3
    assert ("stop", "r4", m2) in backend.actions  # the one already moved went back to M1


def test_a_rollback_that_fails_too_says_where_the_fleet_stands(tmp_path, models):
    m1, m2 = models
    fleet, backend, nginx = start_serving(tmp_path, model=m1)
    backend.behave(m2, GOOD, EXITS)
    backend.behave(m1, EXITS)  # and the old weights no longer load either
    with pytest.raises(FleetError, match=r"the rollback failed too .*NGINX serves r2 m1, r3 m2; run `fleetctl update"):
        run_update(fleet, m2)
    assert fleet.state_dir.load().update.phase is UpdatePhase.FAILED


def test_running_the_update_again_resumes_an_interrupted_one(tmp_path, models):
    m1, m2 = models
    fleet, backend, nginx = start_serving(tmp_path, model=m1, num_replicas=3)
    run_update(fleet, m2)  # r4, r5, r6 on M2
    # an update back to M1, interrupted: r7 loading M1 beside them, its owner process gone
    fleet.start_replicas(1, model=m1)
    with fleet.state_dir.transaction() as state:
        state.update = UpdateProgress(m1, m2, num_total=3, pid=1, pid_start_ticks=1)
    progress = run_update(fleet, m1)
    assert progress[0] == (0, 3) and progress[-1] == (3, 3)
    assert set(weights(fleet).values()) == {"m1"} and len(fleet.state_dir.load().serving()) == 3
    assert "left over from an interrupted update" in fleet.state_dir.events_file.read_text()
