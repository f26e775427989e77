"""Two model groups on the docker and swarm backends (a real, private Docker engine): a container
per replica, or a Swarm service per group, with the group's model mounted; NGINX routes each
request by its `model`."""
import httpx
import pytest
import yaml

from tests.fleet import dockerd as dockerd_mod
from tests.fleet.conftest import API_KEY, SERVED_NAME

pytestmark = [pytest.mark.skipif(bool(dockerd_mod.available()), reason=dockerd_mod.available() or ""),
              pytest.mark.slow]

OTHER_NAME = "tiny-two"


@pytest.mark.parametrize("backend", ["docker", "swarm"])
def test_a_two_group_fleet_runs_and_nginx_routes_by_model(docker_ctl, docker_engine, tiny_model, tiny_model_v2,
                                                          tmp_path, backend):
    _, client = docker_engine
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump({"groups": [
        {"name": "tiny", "model": str(tiny_model), "served_model_name": SERVED_NAME, "num_replicas": 1},
        {"name": "two", "model": str(tiny_model_v2), "served_model_name": OTHER_NAME, "num_replicas": 1}]}))
    report = docker_ctl.json(*dockerd_mod.docker_up_args(docker_ctl, tiny_model, 2, backend), "-f", str(fleet_file))
    assert report["num_replicas_ready"] == 2
    assert [(g["name"], g["num_replicas_ready"]) for g in report["groups"]] == [("tiny", 1), ("two", 1)]
    if backend == "docker":  # one container per replica, labelled with its model
        containers = dockerd_mod.fleet_containers(client, report["fleet_id"])
        assert sorted(c.labels["pagefleet.model"] for c in containers) == sorted([SERVED_NAME, OTHER_NAME])
    else:  # one service per group, its replicas named after the group
        assert sorted(s.name for s in client.services.list()) == \
            [f"pagefleet-{report['fleet_id']}-tiny", f"pagefleet-{report['fleet_id']}-two"]
        assert sorted(r["id"] for r in report["replicas"]) == ["tiny-r1", "two-r1"]
    with httpx.Client(base_url=docker_ctl.url, verify=docker_ctl.ssl_context(), timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for name in (SERVED_NAME, OTHER_NAME):
            answer = http.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
            assert answer.status_code == 200 and answer.json()["model"] == name, answer.text
    docker_ctl("down")
    assert dockerd_mod.fleet_containers(client, report["fleet_id"]) == [] and client.services.list() == []
