"""Two model groups on the docker backend (a real, private Docker engine): one container per
replica with its group's model mounted, NGINX routing each request by its `model`."""
import httpx
import pytest
import yaml

from tests.fleet import dockerd as dockerd_mod
from tests.fleet.conftest import API_KEY, SERVED_NAME
from tests.fleet.test_docker_fleet import ctl, docker_up_args, engine, fleet_containers  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.skipif(bool(dockerd_mod.available()), reason=dockerd_mod.available() or ""),
              pytest.mark.slow]

OTHER_NAME = "tiny-two"


def test_docker_runs_a_two_group_fleet_and_nginx_routes_by_model(ctl, engine, tiny_model, tiny_model_v2, tmp_path):
    _, client = engine
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump({"groups": [
        {"name": "tiny", "model": str(tiny_model), "served_model_name": SERVED_NAME, "num_replicas": 1},
        {"name": "two", "model": str(tiny_model_v2), "served_model_name": OTHER_NAME, "num_replicas": 1}]}))
    report = ctl.json(*docker_up_args(ctl, tiny_model, 2, "docker"), "-f", str(fleet_file))
    assert report["num_replicas_ready"] == 2
    assert [(g["name"], g["num_replicas_ready"]) for g in report["groups"]] == [("tiny", 1), ("two", 1)]
    containers = fleet_containers(client, report["fleet_id"])
    assert sorted(c.labels["pagefleet.model"] for c in containers) == sorted([SERVED_NAME, OTHER_NAME])
    with httpx.Client(base_url=ctl.url, verify=ctl.ssl_context(), timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for name in (SERVED_NAME, OTHER_NAME):
            answer = http.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
            assert answer.status_code == 200 and answer.json()["model"] == name, answer.text
    ctl("down")
    assert fleet_containers(client, report["fleet_id"]) == []
