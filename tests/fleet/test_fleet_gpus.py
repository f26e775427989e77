"""bench/fleet_gpus.py (issue 18 item 2, the multi-GPU fleet numbers) run end to end on the CPU:
the tiny model, 1 then 2 local replicas through the real fleetctl, NGINX and TLS, all three parts
(scale, a rolling update under load, kill -9 of a replica under streaming load with the watcher),
with the outcomes the GPU run must show asserted here first."""
import json
import os
import subprocess
import sys

import pytest

from bench.fleet_gpus_fleet import Fleet, tally
from bench.fleet_gpus_kill import logged_between
from fleetctl.loadgen import RequestResult
from tests.fleet.conftest import REPO_ROOT
from tests.fleet.test_faults import processes_of


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_scale_update_and_kill_on_the_cpu_fleet(tiny_model, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "bench/fleet_gpus.py", "--model", str(tiny_model), "--device", "cpu",
               "--replicas-list", "1,2", "--concurrency-per-replica", "4", "--warmup-requests-per-replica", "2",
               "--num-requests-per-replica", "16",
               "--update-concurrency-per-replica", "2", "--kill-concurrency-per-replica", "4",
               "--prompt-len", "16:64", "--output-len", "32:128", "--set", "num_kv_blocks=64",
               "--set", "max_model_len=256", "--settle-s", "2", "--kill-after-s", "3", "--after-recovery-s", "3",
               "--stream-deadline-s", "60", "--ready-timeout", "180", "--watch-arg=--interval=0.5", "--out", str(out),
               "--work-dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1100)
    print(done.stdout[-4000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [path] = out.glob("fleet-gpus-cpu-x2-*.json")
    doc = json.loads(path.read_text())
    assert path.with_suffix(".png").stat().st_size > 10_000     # the plot beside it (matplotlib: a test extra)
    assert doc["command"] and doc["date"] and doc["versions"]["python"] and doc["gpu"] == "cpu"
    assert processes_of(doc["state_dir"]) == []  # no replica, NGINX or watcher left behind

    rows = {r["num_replicas"]: r for r in doc["scale"]["rows"]}
    assert sorted(rows) == [1, 2]
    for n, row in rows.items():
        assert row["concurrency"] == 4 * n and row["num_requests"] == 16 * n == row["num_ok"], row
        assert row["num_short_outputs"] == 0 and row["requests_per_s"] > 0 and row["output_tokens_per_s"] > 0
        assert 0 < row["ttft_ms_p50"] <= row["ttft_ms_p99"] and 0 < row["itl_ms_p50"] <= row["itl_ms_p99"], row
    assert rows[1]["scaling_efficiency"] == 1.0 and rows[2]["scaling_efficiency"] > 0

    update = doc["update"]
    assert update["exit_code"] == 0 and update["duration_s"] > 0, update["output_tail"]
    assert update["load"]["num_failed"] == 0 and update["load"]["num_unsent"] == 0, update["load"]
    assert update["load"]["num_ok"] > 0
    assert update["num_replicas_ready_after"] == 2 and update["all_on_target"]

    kill = doc["kill"]
    assert len(kill["pids_killed"]) >= 2  # the server and its engine core
    assert kill["num_hung"] == 0, kill
    # Streams on the victim ended with an error, and no request on a surviving replica failed: every
    # failure was one NGINX had sent to the victim (its log may also count a stream the victim had
    # just finished: hence <=). A request sent after the kill may be among them (the instant before
    # the dead replica's sockets close, bench/fleet_gpus_kill.py); none sent once it left NGINX.
    num_failed = kill["open_at_kill"]["num_failed"] + kill["after_kill"]["num_failed"]
    assert kill["open_at_kill"]["num_failed"] >= 1 and num_failed <= kill["num_on_victim_per_nginx_log"], kill
    assert kill["after_left_nginx"]["num_failed"] == 0 and kill["after_left_nginx"]["num_ok"] > 0, kill
    assert kill["recovered_after_s"] is not None and kill["recovered_after_s"] > 0, kill["watcher_log"]
    assert kill["status_after"]["num_replicas_ready"] == 2 and kill["status_after"]["victim"]["num_restarts"] >= 1


def test_the_access_log_is_read_between_offsets_in_the_fleets_format(tmp_path):
    log = tmp_path / "access.log"
    line = ('127.0.0.1 [2026-11-29T03:00:00+00:00] "POST /v1/completions HTTP/1.1" {status} 512 rt=0.5 '
            'upstream={upstream} ustatus={ustatus} uct=0.000 urt=0.4 rid=abc\n')
    first = line.format(status=200, upstream="127.0.0.1:9001", ustatus=200)
    log.write_text(first + line.format(status=503, upstream="127.0.0.1:9001", ustatus=502)
                   + line.format(status=200, upstream="127.0.0.1:9001, 127.0.0.1:9002", ustatus="502, 200"))
    assert logged_between(log, len(first), log.stat().st_size) == [
        ("503", "127.0.0.1:9001", "502"), ("200", "127.0.0.1:9001, 127.0.0.1:9002", "502, 200")]


def test_the_tally_keeps_unsent_requests_apart_from_failed_ones():
    results = [RequestResult(0, 1, 1, 200), RequestResult(1, 1, 1, "unsent", "reset"),
               RequestResult(2, 1, 1, 503, "busy"), RequestResult(3, 1, 1, 200, num_unsent_retries=2)]
    found = tally(results)
    assert (found["num_ok"], found["num_failed"], found["num_unsent"], found["num_resent_unsent"]) == (2, 1, 1, 2)
    assert found["failed_by_status"] == {"503": 1}


def test_replica_settings_reach_the_group_and_gpus_the_fleet(tmp_path):
    fleet = Fleet(tmp_path / "home", "/models/ck", "cuda", ["0", "1"], ["load_format=dummy", "max_num_seqs=256"])
    args = fleet.up_args(2)
    assert args[args.index("--group") + 1] == "bench=/models/ck,replicas=2,served=bench,load_format=dummy,max_num_seqs=256"
    assert args[args.index("--gpus") + 1] == "0,1" and args[args.index("--device") + 1] == "cuda"
