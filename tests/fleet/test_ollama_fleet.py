"""A fleet serving a model of Ollama's store by its Ollama name (`fleetctl up --model
myorg/assistant:v1`), used by the unchanged `ollama` client through NGINX and TLS, and on
the plain-HTTP loopback port for apps that hard-code Ollama's (`--ollama-port`)."""
import math

import httpx
import ollama
import pytest

from replica.models.ollama_store import open_model
from tests.fleet.conftest import API_KEY, FleetCtl, free_ports
from tests.models.ollama_store_builder import ASSISTANT_NAME, ASSISTANT_SYSTEM, build_test_store

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    store = build_test_store(tmp_path_factory.mktemp("ollama") / "models")
    ctl = FleetCtl(tmp_path_factory.mktemp("ollama-fleet") / "home", env={"OLLAMA_MODELS": str(store)})
    # a port the OS hands out again can equal one of the fleet's own: pick another
    taken = {ctl.https_port, ctl.http_port, ctl.internal_port}
    ctl.ollama_port = next(p for p in free_ports(4) if p not in taken)
    try:
        ctl(*ctl.up_args(ASSISTANT_NAME, 1, "local", "--ollama-port", str(ctl.ollama_port)))
        yield ctl, store
    finally:
        ctl.cleanup()


@pytest.fixture(scope="module")
def client(fleet):
    ctl, _ = fleet
    return ollama.Client(host=ctl.url, verify=ctl.ssl_context(), headers={"Authorization": f"Bearer {API_KEY}"})


def test_fleet_serves_the_store_model_under_its_ollama_name(fleet, client):
    ctl, store = fleet
    assert [r["model"] for r in ctl.status()["replicas"]] == [ASSISTANT_NAME]
    (model,) = client.list().models
    entry = open_model(ASSISTANT_NAME, {"OLLAMA_MODELS": str(store)})
    assert model.model == ASSISTANT_NAME and model.digest == entry.digest
    show = client.show(ASSISTANT_NAME)
    assert show.capabilities == ["completion"] and show.modelinfo["llama.context_length"] == 256
    assert [m.model for m in client.ps().models] == [ASSISTANT_NAME]


def test_chat_generate_and_embed_through_nginx_apply_the_layers(fleet, client):
    ctl, _ = fleet
    out = client.chat(model=ASSISTANT_NAME, messages=QUESTION)
    with httpx.Client(verify=ctl.ssl_context(), headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        count = http.post(ctl.url + "/tokenize", json={"messages": [
            {"role": "system", "content": ASSISTANT_SYSTEM}] + QUESTION}).json()["count"]
    assert out.prompt_eval_count == count                    # the system layer was applied
    assert "Paris" not in out.message.content                # the params' stop word
    parts = list(client.generate(model=ASSISTANT_NAME, prompt="Hello", stream=True,
                                 options={"num_predict": 8, "stop": []}))
    assert parts[-1].done and parts[-1].eval_count == 8
    vectors = client.embed(model=ASSISTANT_NAME, input=["one", "two"]).embeddings
    assert len(vectors) == 2 and all(abs(math.hypot(*v) - 1) < 1e-3 for v in vectors)


def test_ollama_port_serves_apps_that_hard_code_it(fleet):
    ctl, _ = fleet
    base = f"http://127.0.0.1:{ctl.ollama_port}"
    assert httpx.get(base + "/").text == "Ollama is running"
    client = ollama.Client(host=base, headers={"Authorization": f"Bearer {API_KEY}"})
    assert [m.model for m in client.list().models] == [ASSISTANT_NAME]
    out = client.generate(model=ASSISTANT_NAME, prompt="Hello", options={"num_predict": 4, "stop": []})
    assert out.done and out.eval_count == 4
