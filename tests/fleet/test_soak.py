"""The soak (bench/soak.py) on the CPU fleet: two local replicas of the tiny model behind NGINX,
mixed streaming and non-streaming completions through HTTPS at concurrency 64 for 10 minutes
(PAGEFLEET_SOAK_S to change it): no request fails, each replica's RSS after warm-up drifts by
2% at most, and every replica ends with no request running and its KV cache free."""
import contextlib
import os
import signal

import pytest

from bench.soak import soak

SOAK_S = float(os.environ.get("PAGEFLEET_SOAK_S", "600"))


@pytest.mark.slow
@pytest.mark.timeout(SOAK_S + 600)
def test_ten_minutes_at_concurrency_64_through_https_leave_no_error_no_growth_no_residue(fleetctl, tiny_model):
    fleetctl(*fleetctl.up_args(tiny_model, 2, "local"))
    # The tiny model's context is 256 tokens (up_args): prompts and outputs fit within it.
    report = soak(fleetctl.home, duration_s=SOAK_S, concurrency=64, prompt_len=(16, 160), output_len=(8, 64),
                  vocab_size=400, sample_every_s=max(2.0, SOAK_S / 60))
    summary = {k: v for k, v in report.to_json().items() if k != "samples"}
    print(summary)
    print([(round(s.t_s), {k: v >> 20 for k, v in s.rss_bytes.items()}) for s in report.samples])
    assert report.problems() == [], summary
    assert report.num_ok > 0 and report.num_unsent_retries == 0, summary


def test_a_replica_is_measured_as_its_whole_process_tree_server_and_engine_core():
    import subprocess
    import sys
    import time

    from bench.soak import process_tree, rss_bytes

    # A parent that starts a child holding 64 MiB, as `replica serve` starts its engine core.
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; b = bytearray(64 << 20); time.sleep(60)']); "
            "time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while len(process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = process_tree(parent.pid)
        assert tree[0] == parent.pid and len(tree) == 2
        while rss_bytes(tree[1]) < 64 << 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sum(rss_bytes(pid) for pid in tree) > rss_bytes(parent.pid) + (64 << 20) - (1 << 20)
    finally:
        for pid in process_tree(parent.pid)[::-1]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait()
    assert process_tree(parent.pid) == []
