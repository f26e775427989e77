"""A Swarm task whose Docker health check cannot run stalls an update (Swarm waits for "healthy");
fleetctl's update message then names the task and quotes Docker's own error. On the real private
engine (tests/fleet/dockerd.py)."""
import secrets
import time

import pytest

from fleetctl.backends.swarm import SwarmBackend
from fleetctl.config import FleetConfig
from tests.fleet import dockerd as dockerd_mod

pytestmark = pytest.mark.skipif(bool(dockerd_mod.available()), reason=dockerd_mod.available() or "")


def test_a_task_whose_health_check_cannot_run_is_named_with_dockers_error(docker_engine):
    from docker.types import Healthcheck, Mount, ServiceMode

    daemon, client = docker_engine
    backend = SwarmBackend(f"hc{secrets.token_hex(3)}", FleetConfig(backend="swarm"), client)
    service = client.services.create(
        dockerd_mod.IMAGE, command=["/usr/bin/sleep", "600"], name=backend.service_name(),
        mounts=[Mount("/usr", "/usr", type="bind", read_only=True)], mode=ServiceMode("replicated", replicas=1),
        # an image whose check's program is missing, as when its Python is not where the check says
        healthcheck=Healthcheck(test=["CMD", "/opt/no-python", "-c", "pass"], interval=10**9, timeout=10**9,
                                retries=1000))
    try:
        deadline, message = time.monotonic() + 90, ""
        while "(exit" not in message and time.monotonic() < deadline:       # until a check has run
            time.sleep(0.5)
            message = backend.update_message()
        task = next(t for t in service.tasks() if t.get("DesiredState") == "running")
        assert f"task {task['ID'][:12]}: health check " in message, message
        assert "/opt/no-python" in message and "no such file or directory" in message.lower(), message
    finally:
        service.remove()
        label = {"label": f"com.docker.swarm.service.name={backend.service_name()}"}
        deadline = time.monotonic() + 60
        while client.containers.list(all=True, filters=label) and time.monotonic() < deadline:
            time.sleep(0.5)
