"""Fleet pieces for Ollama users: `--ollama-port 11434`, a plain-HTTP loopback listener for apps
that hard-code Ollama's port (under the real NGINX); a store model given by its Ollama name stays
a name, and Docker/Swarm replicas get the store mounted read-only."""
import dataclasses

import httpx
import pytest

from fleetctl.errors import ConfigError
from fleetctl.nginx import Nginx
from tests.fleet.conftest import free_ports
from tests.fleet.front import make_config, rendered


def test_ollama_port_listens_on_loopback_and_answers_like_ollama(tmp_path):
    config = make_config()
    taken = {config.https_port, config.http_port, config.internal_port}
    ollama_port = next(p for p in free_ports(4) if p not in taken)
    config = dataclasses.replace(config, ollama_port=ollama_port)
    text = rendered(tmp_path, config)
    assert f"listen 127.0.0.1:{ollama_port};" in text
    assert "listen 127.0.0.1:0" not in rendered(tmp_path, make_config())   # off unless asked
    nginx = Nginx(tmp_path / "nginx")
    assert nginx.apply(text) == "started"
    try:
        base = f"http://127.0.0.1:{ollama_port}"
        root = httpx.get(base + "/")
        assert root.status_code == 200 and root.text == "Ollama is running"
        down = httpx.get(base + "/api/tags")                 # no replica listens behind it
        assert down.status_code == 503 and "no replica" in down.json()["error"]
        assert httpx.get(base + "/metrics").status_code == 404     # the API routes only
    finally:
        nginx.stop(timeout_s=5)


def test_ollama_port_must_differ_from_the_fleets_ports():
    config = make_config()
    with pytest.raises(ConfigError, match="--ollama-port"):
        dataclasses.replace(config, ollama_port=config.internal_port)


def test_store_names_stay_names_and_docker_mounts_the_store_read_only(tmp_path, monkeypatch):
    from fleetctl.backends.docker import model_mount
    from fleetctl.config import FleetConfig
    from tests.models.ollama_store_builder import ASSISTANT_NAME, build_test_store

    store = build_test_store(tmp_path / "models")
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    config = FleetConfig(model=ASSISTANT_NAME)
    assert config.model == ASSISTANT_NAME and config.served_model_name == ASSISTANT_NAME
    from fleetctl.rollout import UpdateOptions
    assert UpdateOptions("smollm2:135m").target_model == "smollm2:135m"   # `fleetctl update`
    model_arg, mount = model_mount(ASSISTANT_NAME)
    assert mount["Source"] == str(store) and mount["Target"] == "/ollama/models" and mount["ReadOnly"]
    blob = next(p.name for p in (store / "blobs").iterdir() if p.stat().st_size > 1_000_000)
    assert model_arg == f"/ollama/models/blobs/{blob}"
