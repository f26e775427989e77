"""A fleet of real `replica serve` processes (tiny model) behind the real NGINX, driven through
the real `fleetctl` CLI, used by the official openai and ollama clients over HTTPS verified
against the fleet's own CA."""
import os
import signal
import subprocess
import sys
import time

import httpx
import ollama
import pytest
from openai import OpenAI

from tests.fleet.conftest import API_KEY, REPO_ROOT, SERVED_NAME, FleetCtl, is_running
from tests.fleet.load import Load


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """Two local replicas behind NGINX, shared by the client tests of this module."""
    ctl = FleetCtl(tmp_path_factory.mktemp("served") / "home")
    try:
        ctl(*ctl.up_args(tiny_model, 2, "local"))
        yield ctl
    finally:
        ctl.cleanup()


@pytest.fixture
def openai_client(served):
    with httpx.Client(verify=served.ssl_context()) as http:
        yield OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, http_client=http, max_retries=0)


def test_up_reports_two_ready_replicas_and_the_https_url(served):
    report = served.status()
    assert report["num_replicas_ready"] == 2 and not report["is_degraded"]
    assert [r["id"] for r in report["replicas"]] == ["r1", "r2"]
    assert all(r["is_ready"] and r["in_nginx"] and r["model"] == SERVED_NAME for r in report["replicas"])
    assert report["nginx"]["is_running"] and report["nginx"]["num_upstreams"] == 2
    assert report["url"] == f"https://localhost:{served.https_port}"


def test_openai_client_gets_completions_through_nginx(openai_client):
    chat = openai_client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 8
    assert [m.id for m in openai_client.models.list()] == [SERVED_NAME]
    assert openai_client.models.retrieve(SERVED_NAME).id == SERVED_NAME


def test_stream_chunks_arrive_one_by_one_through_nginx(openai_client):
    def arrivals() -> list[float]:
        t0, times = time.monotonic(), []
        stream = openai_client.completions.create(model=SERVED_NAME, prompt="Once upon a time", max_tokens=64,
                                                  temperature=0, stream=True)
        for chunk in stream:
            times.append(time.monotonic() - t0)
        assert len(times) == 64
        return times

    def spread_out(times: list[float]) -> bool:
        # Buffered into one, every chunk would arrive in the same few reads at the end.
        return len({round(t, 3) for t in times}) >= 8 and times[-1] - times[0] > 0.02

    # The tiny model sometimes generates all 64 tokens within 3 ms, too fast for any spacing
    # to show; a run in which the replica took its time must show it through NGINX.
    runs = []
    while len(runs) < 10 and not any(map(spread_out, runs)):
        runs.append(arrivals())
    assert any(map(spread_out, runs)), [sorted({round(t, 3) for t in times}) for times in runs]


def test_ollama_client_works_through_nginx(served):
    client = ollama.Client(host=served.url, verify=served.ssl_context(),
                           headers={"Authorization": f"Bearer {API_KEY}"})
    answer = client.generate(model=SERVED_NAME, prompt="Hi", options={"num_predict": 5, "temperature": 0})
    assert answer.done and answer.eval_count == 5
    parts = list(client.chat(model=SERVED_NAME, messages=[{"role": "user", "content": "Hi"}], stream=True,
                             options={"num_predict": 5}))
    assert parts[-1].done and len(parts) >= 2


def test_missing_api_key_gets_401_and_http_gets_308(served):
    with httpx.Client(verify=served.ssl_context()) as client:
        response = client.post(f"{served.url}/v1/completions", json={"model": SERVED_NAME, "prompt": "x"})
        assert response.status_code == 401
        assert client.get(f"{served.url}/metrics").status_code == 404
    redirect = httpx.get(f"http://127.0.0.1:{served.http_port}/v1/models")
    assert redirect.status_code == 308 and redirect.headers["location"].startswith("https://")
    internal = httpx.get(f"http://127.0.0.1:{served.internal_port}/replicas/r1/metrics")
    assert "pagefleet_num_requests_running" in internal.text


def test_rate_limit_per_api_key_answers_429(served):
    served("up", "--rate-limit", "1", "--burst", "2")  # NGINX-only change: no replica restarts
    try:
        with httpx.Client(verify=served.ssl_context(), headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            codes = [client.get(f"{served.url}/v1/models").status_code for _ in range(8)]
        assert codes.count(429) >= 4 and codes[0] == 200
    finally:
        served("up", "--rate-limit", "1000", "--burst", "1000")
    assert all(r["num_restarts"] == 0 for r in served.status()["replicas"])


def test_session_routing_keeps_a_session_on_one_replica(served):
    served("up", "--routing", "session")  # NGINX-only change
    try:
        access_log = served.home / "nginx" / "logs" / "access.log"
        offset = access_log.stat().st_size
        with httpx.Client(verify=served.ssl_context(), headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            for session in ("alice", "bob", "carol", "dave"):
                for _ in range(3):
                    client.post(f"{served.url}/v1/completions", headers={"X-Session-ID": session},
                                json={"model": SERVED_NAME, "prompt": "Hi", "max_tokens": 1}).raise_for_status()
            for _ in range(3):  # no header: the body's "user" field is the session key
                client.post(f"{served.url}/v1/completions",
                            json={"model": SERVED_NAME, "prompt": "Hi", "max_tokens": 1, "user": "erin"})
        # NGINX logs a request once its connection is closed (one request per connection): the
        # last line may come a moment after the client has its answer.
        deadline = time.monotonic() + 5
        while True:
            lines = access_log.read_text()[offset:].splitlines()
            upstreams = [line.split("upstream=")[1].split()[0] for line in lines if "POST /v1/completions" in line]
            if len(upstreams) >= 15 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(upstreams) == 15
        groups = [set(upstreams[i:i + 3]) for i in range(0, 15, 3)]
        assert all(len(group) == 1 for group in groups), groups
    finally:
        served("up", "--routing", "least_conn")


def test_logs_show_a_replica_and_the_fleet_events(served):
    assert "serving tiny-llama" in served("logs", "r1", "--tail", "1000").stdout
    events = served("logs", "events").stdout
    assert "r1: started on local" in events and "r1: in NGINX (/ready 200)" in events


def test_a_broken_template_is_refused_and_nginx_keeps_serving(served, tmp_path):
    broken = tmp_path / "nginx.conf.j2"
    broken.write_text((REPO_ROOT / "lb" / "nginx.conf.j2").read_text().replace("least_conn;", "least_conn bogus;"))
    pid, live = served.nginx_pid(), (served.home / "nginx" / "nginx.conf").read_text()
    result = subprocess.run([sys.executable, "-m", "fleetctl", "up", "--rate-limit", "999"], cwd=REPO_ROOT,
                            env={**served.env, "PAGEFLEET_NGINX_TEMPLATE": str(broken)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 5
    assert "nginx -t rejected the new config" in result.stderr and "keeps the previous one" in result.stderr
    assert served.nginx_pid() == pid and (served.home / "nginx" / "nginx.conf").read_text() == live
    with httpx.Client(verify=served.ssl_context(), headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        assert client.get(f"{served.url}/v1/models").status_code == 200
    served("up", "--rate-limit", "1000")  # the fixed template applies the saved change


def test_printed_openai_example_runs_as_is(served):
    example = served.json("up")["examples"]["python"]
    result = subprocess.run([sys.executable, "-c", example], env={**os.environ, "PAGEFLEET_API_KEY": API_KEY},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_up_again_converges_without_touching_healthy_replicas(served):
    before = {r["id"]: r["handle"] for r in served.status()["replicas"]}
    report = served.json("up")
    assert {r["id"]: r["handle"] for r in report["replicas"]} == before


def test_kill_9_under_load_fails_nothing_after_the_failover_and_the_watcher_restores(served):
    watcher = served.popen("watch", "--interval", "0.5", "--threshold", "1")
    victim = served.status()["replicas"][0]
    pid = int(victim["handle"].split()[-1])
    with Load(served.url, served.ssl_context(), num_clients=4) as load:
        load.wait_for_ok(20)
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        report = served.wait_status(lambda r: r["num_replicas_ready"] == 2 and any(
            x["id"] == victim["id"] and x["num_restarts"] == 1 and x["is_ready"] for x in r["replicas"]), 120)
        t_restored = time.monotonic()
        load.wait_for_ok(20, since=t_restored)
    assert report["num_replicas_ready"] == 2
    # Only requests that were on the killed replica at that moment may fail.
    late = [f for f in load.failures() if f.t_start > t_kill + 0.5]
    assert late == [], late[:3]
    assert len(load.ok(since=t_kill + 0.5)) >= 40
    watcher.send_signal(signal.SIGTERM)
    log = watcher.communicate(timeout=30)[0]
    assert f"{victim['id']}: out of NGINX" in log and f"{victim['id']}: restarted" in log
    assert f"{victim['id']}: in NGINX (/ready 200)" in log


def test_scale_up_and_down_under_load_fails_nothing(served):
    with Load(served.url, served.ssl_context(), num_clients=4) as load:
        load.wait_for_ok(20)
        up3 = served.json("scale", "3")
        assert up3["num_replicas_ready"] == 3
        load.wait_for_ok(20, since=time.monotonic())
        down1 = served.json("scale", "1")
        assert down1["num_replicas_ready"] == 1 and down1["nginx"]["num_upstreams"] == 1
        load.wait_for_ok(20, since=time.monotonic())
    assert load.failures() == []
    assert len(load.ok()) >= 60
    served.json("scale", "2")


def test_lifecycle_up_2_scale_3_scale_1_down_leaves_nothing_running(fleetctl, tiny_model):
    fleetctl(*fleetctl.up_args(tiny_model, 2, "local"))
    assert fleetctl.status()["num_replicas_ready"] == 2
    assert fleetctl.json("scale", "3")["num_replicas_ready"] == 3
    pids = fleetctl.local_pids()
    assert fleetctl.json("scale", "1")["num_replicas_ready"] == 1
    nginx_pid = fleetctl.nginx_pid()
    stopped = fleetctl.json("down")["stopped"]
    assert stopped == ["r1"]
    assert not any(is_running(pid) for pid in pids + [nginx_pid])
    assert fleetctl("status", check=False).returncode == 6
