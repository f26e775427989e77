"""Rolling model updates (`fleetctl update`) and NGINX reloads under continuous load, on real
local replicas of two tiny checkpoints behind the real NGINX, driven through the real CLI.

The load (`MixedLoad`) runs for the whole operation: streaming and non-streaming requests from
the openai client (chat and completions) and from httpx (completions, and raw SSE read line by
line), all naming the fleet's served model name. A request fails on any non-2xx answer, any
transport error, or a stream that ends without its end (`data: [DONE]` in the raw SSE, a
finish_reason through the openai client). One rule lets a request be sent again, once, as in the
other fleet tests: when NGINX closed a kept-alive connection before answering a single byte (an
NGINX reload closes its old workers' idle connections; a request racing that close was never
read, and curl, browsers and the openai client re-send it too, RFC 9112 9.3.1). A request that
got any byte of an answer is never re-sent.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from fleetctl.cli import cli
from fleetctl.config import FleetConfig
from fleetctl.fleet import Fleet
from fleetctl.health import Watcher
from fleetctl.state import FleetState, StateDir, UpdatePhase, UpdateProgress
from tests.fleet.conftest import API_KEY, REPO_ROOT, SERVED_NAME, FleetCtl, is_running
from tests.fleet.load import MixedLoad
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def fleet(tiny_model, tmp_path_factory):
    """Two local replicas of M1 (tiny_model) behind NGINX; served as SERVED_NAME, the name
    derived from M1's folder. The tests below leave it serving M1, except the last one."""
    ctl = FleetCtl(tmp_path_factory.mktemp("rollout") / "home")
    try:
        ctl(*ctl.up_args(tiny_model, 2, "local"))
        yield ctl
    finally:
        ctl.cleanup()


@pytest.fixture(scope="module")
def unsupported_architecture(tiny_model, tmp_path_factory) -> Path:
    """M1's files, but config.json names an architecture the engine does not have: the replica
    exits while loading."""
    path = Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("broken") / "tiny-falcon"))
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["FalconForCausalLM"], model_type="falcon")
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory) -> Path:
    """Loads and answers /ready 200, but cannot generate from text: only the gate's real
    generation finds out."""
    return make_tiny_model(tmp_path_factory.mktemp("broken") / "tiny-no-tokenizer", with_tokenizer=False)


def served_weights(ctl: FleetCtl) -> dict[str, str]:
    """Each NGINX upstream's own answer to /v1/models: replica address → `root` (the weights'
    folder name), after checking it answers to the fleet's served name."""
    conf = (ctl.home / "nginx" / "nginx.conf").read_text()
    upstream = conf.split("upstream pf_replicas {")[1].split("}")[0]
    roots = {}
    for address in re.findall(r"server (\S+) max_fails", upstream):
        card = httpx.get(f"http://{address}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert [m["id"] for m in card["data"]] == [SERVED_NAME]
        roots[address] = card["data"][0]["root"]
    return roots


def error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0]  # the last thing printed, on one line
    return errors[0]


def test_ten_nginx_reloads_under_load_fail_nothing(fleet):
    """Five reloads through Fleet.commit and five through `fleetctl up` converging; each one
    changes the config (the burst), since a commit that renders the same config reloads nothing."""
    state_dir = StateDir(fleet.home)
    pid = fleet.nginx_pid()
    num_reloads_before = state_dir.events_file.read_text().count("nginx: reloaded")
    with MixedLoad(fleet.url, fleet.ssl_context()) as load:
        load.wait_for_ok(10)
        for index in range(10):
            burst = 1001 if index % 2 == 0 else 1000
            if index % 4 < 2:
                Fleet(state_dir).commit(lambda state: setattr(state.config, "rate_limit_burst", burst))
            else:
                fleet("up", "--burst", str(burst))
            load.wait_for_ok(5, since=time.monotonic())  # traffic goes on between the reloads
    assert state_dir.events_file.read_text().count("nginx: reloaded") == num_reloads_before + 10
    assert fleet.nginx_pid() == pid
    print(load.summary())
    assert load.failures() == [], load.failures()[:3]
    assert all(n >= 5 for n in load.num_ok_by_kind().values()), load.num_ok_by_kind()
    assert load.num_raw_done >= 5
    assert load.num_stale_connection_retries == 0  # no kept-alive connection to lose (test_reload_race.py)


@pytest.mark.parametrize("broken, options, words", [
    ("unsupported_architecture", [], ["exited while loading", "unsupported architecture"]),
    ("no_tokenizer", ["--max-surge", "0", "--max-unavailable", "1"], ["failed its test generation", "no tokenizer"]),
], ids=["exits-while-loading", "fails-its-generation-in-place"])
def test_a_failing_new_replica_halts_the_update_and_rolls_back(fleet, tiny_model, request, broken, options, words):
    model = request.getfixturevalue(broken)
    before = fleet.status()
    assert {r["weights"] for r in before["replicas"]} == {str(tiny_model)}
    with MixedLoad(fleet.url, fleet.ssl_context()) as load:
        load.wait_for_ok(10)
        result = fleet("update", "--model", str(model), *options, check=False)
        load.wait_for_ok(10, since=time.monotonic())
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr)
    assert f"update to {model.name} halted and rolled back" in line
    assert all(word in line for word in words), line
    assert f"NGINX serves only {tiny_model.name}" in line

    report = fleet.status()
    assert report["num_replicas_ready"] == 2 and report["nginx"]["num_upstreams"] == 2
    assert [r["weights"] for r in report["replicas"]] == [str(tiny_model)] * 2
    assert report["weights"] == str(tiny_model) and report["model"] == SERVED_NAME
    assert report["update"]["phase"] == "rolled_back" and report["update"]["num_done"] == 0
    assert not report["update"]["is_running"] and report["update"]["reason"] in line
    assert sorted(served_weights(fleet).values()) == [tiny_model.name] * 2
    assert sorted(served_weights(fleet)) == sorted(r["address"] for r in report["replicas"])
    assert len([pid for pid in fleet.local_pids() if is_running(pid)]) == 2  # the failed one is gone
    print(load.summary())
    assert load.failures() == [], load.failures()[:3]
    if options:  # in place: the old replica left first and came back on its address
        assert "restored: its replacement failed its gate" in fleet("logs", "events").stdout


def test_scale_up_and_a_second_update_refuse_while_an_update_runs(tmp_path, monkeypatch):
    """The update's owner is a live process: the watcher pauses, scale and up refuse; once the
    owner is gone, status calls the update interrupted."""
    monkeypatch.setenv("PAGEFLEET_HOME", str(tmp_path / "home"))
    state_dir = StateDir(tmp_path / "home").ensure()
    state = FleetState(FleetConfig(num_replicas=2))
    ticks = int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
    state.update = UpdateProgress("/models/m2", "/models/m1", num_total=2, num_done=1, step="r4 loading",
                                  pid=os.getpid(), pid_start_ticks=ticks)
    state_dir.save(state)
    runner = CliRunner()
    for args in (["scale", "3"], ["up"], ["update", "--model", str(tmp_path)]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 1, result.output
        assert "an update to m2 is running (1/2 replicas" in result.output
    Watcher(Fleet(state_dir)).tick()  # returns before touching any replica
    assert "watch: paused (fleetctl update is running)" in state_dir.events_file.read_text()

    dead = subprocess.Popen(["true"])
    dead.wait()
    state.update.pid = dead.pid
    state_dir.save(state)
    from fleetctl.rollout import describe

    progress = describe(state_dir.load())
    assert progress["is_interrupted"] and not progress["is_running"]
    assert progress["phase"] == UpdatePhase.RUNNING.value


def test_bench_aims_at_the_fleet_by_default(fleet):
    result = fleet("bench", "--num-requests", "6", "--prompt-len", "8", "--output-len", "4",
                   "--concurrency", "2", "--vocab-size", "1000", "--json")
    summary = json.loads(result.stdout)
    assert summary["num_requests"] == 6 and summary["num_errors"] == 0


@pytest.mark.parametrize("command", ["update", "bench"])
def test_update_and_bench_have_help_with_examples(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output


def run_update_watching_status(ctl: FleetCtl, model: Path, tmp_path: Path) -> tuple[dict, list[dict], str]:
    """`fleetctl update --model M --json`, polling `fleetctl status` meanwhile: (its report, the
    update progress that `status --json` showed while it ran, one `status` table of then). One
    poll a second: each is a Python process, and polling without a pause kept one of two cores
    busy, slowing the replicas the update starts."""
    out, err = tmp_path / "update.out", tmp_path / "update.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "fleetctl", "update", "--model", str(model), "--json"],
                                env=ctl.env, cwd=REPO_ROOT, stdout=stdout, stderr=stderr, text=True)
        seen, table = [], ""
        try:
            while proc.poll() is None:
                update = ctl.status().get("update") or {}
                if update.get("is_running"):
                    seen.append(update)
                    if not table:
                        table = ctl("status", check=False).stdout
                time.sleep(1.0)
            assert proc.wait(timeout=240) == 0, err.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    return json.loads(out.read_text()), seen, table


def test_rolling_update_under_load_drops_nothing_and_every_replica_serves_m2(fleet, tiny_model, tiny_model_v2,
                                                                              tmp_path):
    before = fleet.status()
    old_ids = [r["id"] for r in before["replicas"]]
    assert {r["weights"] for r in before["replicas"]} == {str(tiny_model)}
    events_offset = len(fleet("logs", "events", "--tail", "100000").stdout.splitlines())
    with MixedLoad(fleet.url, fleet.ssl_context()) as load:
        load.wait_for_ok(10)
        t_update = time.monotonic()
        report, progress_seen, table = run_update_watching_status(fleet, tiny_model_v2, tmp_path)
        t_updated = time.monotonic()
        load.wait_for_ok(10, since=t_updated)
    print(load.summary())
    assert load.failures() == [], load.failures()[:3]
    # `fleetctl status` showed the update while it ran: its step, and how many were done.
    assert progress_seen and all(p["phase"] == "running" and p["step"] for p in progress_seen), progress_seen
    assert {p["num_done"] for p in progress_seen} <= {0, 1, 2} and progress_seen[0]["num_total"] == 2
    assert f"update to {tiny_model_v2.name}: running" in table
    during = load.num_ok_by_kind(since=t_update, until=t_updated)
    assert all(n >= 2 for n in during.values()), during  # every kind of client ran throughout
    assert load.num_raw_done >= 5
    assert load.num_stale_connection_retries == 0  # no kept-alive connection to lose (test_reload_race.py)

    update = report["update"]
    assert update["phase"] == "done" and update["num_done"] == update["num_total"] == 2
    assert update["target_model"] == str(tiny_model_v2) and update["from_model"] == str(tiny_model)
    assert report["model"] == SERVED_NAME and report["weights"] == str(tiny_model_v2)
    assert report["num_replicas_ready"] == 2 and not set(old_ids) & {r["id"] for r in report["replicas"]}
    assert [r["weights"] for r in report["replicas"]] == [str(tiny_model_v2)] * 2
    assert fleet.status()["update"]["phase"] == "done"
    assert sorted(served_weights(fleet).values()) == [tiny_model_v2.name] * 2
    with httpx.Client(verify=fleet.ssl_context(), headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        assert [m["id"] for m in client.get(f"{fleet.url}/v1/models").json()["data"]] == [SERVED_NAME]

    # Surge order, step by step: the new replica entered NGINX before the old one left it.
    events = fleet("logs", "events", "--tail", "100000").stdout.splitlines()[events_offset:]
    new_ids = [r["id"] for r in report["replicas"]]
    for old_id, new_id in zip(old_ids, new_ids):
        entered = next(i for i, e in enumerate(events) if f"{new_id}: in NGINX" in e)
        left = next(i for i, e in enumerate(events) if f"{old_id}: out of NGINX" in e)
        stopped = next(i for i, e in enumerate(events) if f"{old_id}: stopped" in e)
        assert entered < left < stopped, events

    # Prometheus follows the fleet: the file_sd targets are the replicas now running, and the
    # rendered scrape config reads that file.
    targets = json.loads((fleet.home / "prometheus" / "replicas.json").read_text())
    assert sorted(targets[0]["targets"]) == sorted(r["address"] for r in report["replicas"])
    prometheus_yml = fleet("render", "prometheus").stdout
    assert str(fleet.home / "prometheus" / "replicas.json") in prometheus_yml
    if shutil.which("promtool"):
        (fleet.home / "prometheus.yml").write_text(prometheus_yml)
        check = subprocess.run(["promtool", "check", "config", str(fleet.home / "prometheus.yml")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


@pytest.fixture(scope="module")
def swarm(docker_engine, tiny_model, tmp_path_factory):
    """2 replicas of M1 on the single-node swarm of conftest's `docker_engine`. Swarm checks each
    task's /ready every second (3 s by default) and watches an updated task for 2 s (10 s by
    default): the updates below wait less for Swarm, and Swarm stops an old task before
    fleetctl's gate has failed its successor more often."""
    from tests.fleet.dockerd import docker_up_args

    daemon, _ = docker_engine
    ctl = FleetCtl(tmp_path_factory.mktemp("rollout-swarm") / "home", env={"DOCKER_HOST": daemon.host})
    try:
        ctl(*docker_up_args(ctl, tiny_model, 2, "swarm"), "--health-interval", "1", "--update-monitor", "2")
        yield ctl
    finally:
        ctl.cleanup()


def _dockerd_unavailable() -> str:
    from tests.fleet import dockerd as dockerd_mod

    return dockerd_mod.available()


@pytest.mark.skipif(bool(_dockerd_unavailable()), reason=_dockerd_unavailable() or "")
def test_swarm_update_is_swarms_own_rolling_update_gated_by_fleetctl(swarm, tiny_model, tiny_model_v2, no_tokenizer):
    """Swarm replaces the tasks (start-first, parallelism 1); fleetctl gates each new task with
    a real generation and moves its slot's NGINX address to it. A new task that passes Swarm's
    health check (/ready) but fails the generation makes fleetctl roll the service back."""
    # two updates and a rollback under load: over Load's default 180 s on a busy 2-core runner
    with MixedLoad(swarm.url, swarm.ssl_context(), max_s=600) as load:
        load.wait_for_ok(10)
        report = swarm.json("update", "--model", str(tiny_model_v2))
        load.wait_for_ok(10, since=time.monotonic())
        failed = swarm("update", "--model", str(no_tokenizer), check=False)
        load.wait_for_ok(10, since=time.monotonic())
    print(load.summary())
    assert load.failures() == [], load.failures()[:3]
    assert report["update"]["phase"] == "done" and report["update"]["num_done"] == 2
    assert [r["weights"] for r in report["replicas"]] == [str(tiny_model_v2)] * 2
    assert sorted(served_weights(swarm).values()) == [tiny_model_v2.name] * 2

    assert failed.returncode == 1
    line = error_line(failed.stderr)
    assert "failed its test generation" in line and f"NGINX serves only {tiny_model_v2.name}" in line
    after = swarm.status()
    assert after["update"]["phase"] == "rolled_back" and after["num_replicas_ready"] == 2
    assert sorted(served_weights(swarm).values()) == [tiny_model_v2.name] * 2
