"""NGINX workers orphaned by a SIGKILLed master still hold the fleet's ports; starting NGINX
again and stopping it both find and end them (fleetctl/nginx_orphans.py), with the real NGINX."""
import os
import signal
import socket
import time

from fleetctl import procs
from fleetctl.nginx_orphans import config_ports, orphan_workers


def kill_master(nginx) -> list[int]:
    master = nginx.pid()
    workers = procs.children(master)
    os.kill(master, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while procs.is_alive(master) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert workers and all(procs.is_alive(pid) for pid in workers)
    return workers


def is_listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_config_ports_reads_every_listen_directive():
    text = "listen 127.0.0.1:8443 ssl;\n  listen 80;\n    listen [::1]:9000;\n# listen 1;\nproxy_pass x:1;"
    assert config_ports(text) == {8443, 80, 9000}


def test_start_after_a_killed_master_ends_its_workers_and_serves_again(running):
    nginx, config = running
    workers = kill_master(nginx)
    ports = {config.https_port, config.http_port, config.internal_port}
    assert sorted(orphan_workers(ports)) == sorted(workers)
    assert is_listening(config.https_port)  # the orphans still answer on the public port

    assert nginx.apply(nginx.conf.read_text()) == "started"  # what `up` and the watcher do
    assert not any(procs.is_alive(pid) for pid in workers)
    assert orphan_workers(ports) == [] and nginx.pid() and is_listening(config.https_port)


def test_stop_without_a_master_ends_the_orphans_and_frees_the_ports(running):
    nginx, config = running
    workers = kill_master(nginx)
    assert nginx.stop(timeout_s=5)  # what `fleetctl down` does
    assert not any(procs.is_alive(pid) for pid in workers)
    assert not any(is_listening(p) for p in (config.https_port, config.http_port, config.internal_port))


def test_a_running_nginx_has_no_orphans(running):
    nginx, config = running
    assert orphan_workers({config.https_port, config.http_port, config.internal_port}) == []
