"""A replica serving a model of Ollama's store by its Ollama name, driven by the `ollama` client:
`myorg/assistant:v1`, the bundled SmolLM2 blob with a system layer ("You are a pirate.") and a
params layer (stop "Paris", temperature 0). float32, so that greedy answers are the same on
every CPU."""
import math
import re

import httpx
import ollama
import openai
import pytest

from replica.models.ollama_store import open_model
from tests.models.ollama_store_builder import ASSISTANT_NAME, ASSISTANT_SYSTEM, CHATML_GO_TEMPLATE
from tests.server.conftest import ServerProcess

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def store(ollama_store):
    return ollama_store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    server = ServerProcess(["--model", ASSISTANT_NAME, "--max-model-len", "512",
                            "--num-kv-blocks", "64", "--dtype", "float32"],
                           tmp_path_factory.mktemp("logs") / "assistant.log",
                           env={"OLLAMA_MODELS": str(store)})
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


def test_list_shows_the_store_name_digest_and_size(client, store):
    entry = open_model(ASSISTANT_NAME, {"OLLAMA_MODELS": str(store)})
    (model,) = client.list().models
    assert model.model == ASSISTANT_NAME
    assert model.digest == entry.digest and model.size == entry.size_bytes
    assert model.details.format == "gguf" and model.details.family == "llama"
    assert model.details.quantization_level == "Q4_1"


def test_show_has_what_strict_clients_read(client, server):
    show = client.show(ASSISTANT_NAME)
    assert show.capabilities == ["completion"]
    assert show.modelinfo["llama.context_length"] == 512
    assert show.modelinfo["general.architecture"] == "llama"
    assert show.template == CHATML_GO_TEMPLATE
    assert show.parameters.splitlines()[0].split() == ["stop", '"Paris"']
    assert show.modified_at is not None and show.details.parameter_size == "135M"
    raw = httpx.post(server.url + "/api/show", json={"model": ASSISTANT_NAME}).json()
    assert raw["system"] == ASSISTANT_SYSTEM
    assert f'SYSTEM """{ASSISTANT_SYSTEM}"""' in show.modelfile and "PARAMETER stop Paris" in show.modelfile
    assert raw["model_info"]["pagefleet.embedding_pooling"] == "mean"


def test_names_resolve_as_in_ollama(client):
    for name in ("myorg/assistant:v1", "registry.ollama.ai/myorg/assistant:v1", "MyOrg/Assistant:v1"):
        assert client.generate(model=name, prompt="").done_reason == "load"
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="myorg/assistant", prompt="hi")          # :latest is another tag
    assert err.value.status_code == 404


def test_system_layer_and_params_stop_take_effect(client, server):
    out = client.chat(model=ASSISTANT_NAME, messages=QUESTION)
    # the pirate names Paris; the params' stop word ends the answer just before it
    assert out.message.content == "The capital of France, it's called "
    assert out.done_reason == "stop"
    with_system = [{"role": "system", "content": ASSISTANT_SYSTEM}] + QUESTION
    count = httpx.post(server.url + "/tokenize", json={"messages": with_system}).json()["count"]
    assert out.prompt_eval_count == count
    streamed = list(client.chat(model=ASSISTANT_NAME, messages=QUESTION, stream=True))
    assert "".join(p.message.content for p in streamed) == out.message.content
    generated = client.generate(model=ASSISTANT_NAME, prompt=QUESTION[0]["content"])
    assert generated.response == out.message.content and generated.prompt_eval_count == count


def test_request_options_and_system_override_the_layers(client, server):
    out = client.chat(model=ASSISTANT_NAME, messages=QUESTION, options={"stop": ["Captain"]})
    assert out.message.content == "The capital of France, it's called Paris. I'm "
    out = client.chat(model=ASSISTANT_NAME, messages=QUESTION, options={"stop": [], "num_predict": 5})
    assert out.done_reason == "length" and out.eval_count == 5
    own = client.generate(model=ASSISTANT_NAME, prompt=QUESTION[0]["content"],
                          system="You are a helpful assistant.")
    assert own.response == "The capital of France is "          # no pirate; still stops at Paris
    messages = [{"role": "system", "content": "You are a helpful assistant."}] + QUESTION
    count = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["count"]
    assert client.chat(model=ASSISTANT_NAME, messages=messages).prompt_eval_count == count


def test_ps_says_the_model_stays_loaded(client):
    (model,) = client.ps().models
    assert model.model == ASSISTANT_NAME and model.size_vram == 0     # CPU replica
    assert model.expires_at.year >= 2100


def test_keep_alive_is_accepted_everywhere(client):
    for keep_alive in ("5m", -1, 300):
        assert client.chat(model=ASSISTANT_NAME, messages=QUESTION, keep_alive=keep_alive,
                           options={"num_predict": 1}).done
        assert client.generate(model=ASSISTANT_NAME, prompt="hi", keep_alive=keep_alive,
                               options={"num_predict": 1}).done
        assert client.embed(model=ASSISTANT_NAME, input="hi", keep_alive=keep_alive).embeddings


def test_embed_gives_a_unit_vector_per_input(client, server):
    out = client.embed(model=ASSISTANT_NAME, input=["Paris is in France", "a red apple", "Paris is in France"])
    assert len(out.embeddings) == 3 and all(len(v) == 576 for v in out.embeddings)
    assert all(abs(math.hypot(*v) - 1) < 1e-4 for v in out.embeddings)
    def distance(a, b):
        return max(abs(x - y) for x, y in zip(a, b))
    assert distance(out.embeddings[0], out.embeddings[2]) < 1e-5
    assert distance(out.embeddings[0], out.embeddings[1]) > 1e-2
    assert out.prompt_eval_count > 6
    single = client.embed(model=ASSISTANT_NAME, input="a red apple").embeddings[0]
    assert distance(single, out.embeddings[1]) < 1e-5                 # batching changes nothing
    older = client.embeddings(model=ASSISTANT_NAME, prompt="a red apple").embedding
    assert distance(older, single) < 1e-5
    short = client.embed(model=ASSISTANT_NAME, input="a red apple", dimensions=64).embeddings[0]
    assert len(short) == 64 and abs(math.hypot(*short) - 1) < 1e-4
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    data = oai.embeddings.create(model=ASSISTANT_NAME, input=["a red apple"]).data   # base64
    assert distance(data[0].embedding, single) < 1e-5


def test_embed_refuses_what_it_cannot_do(server):
    def post(path, body):
        return httpx.post(server.url + path, json={"model": ASSISTANT_NAME, **body})
    long_text = "word " * 600
    assert post("/api/embed", {"input": long_text}).status_code == 200          # truncated
    r = post("/api/embed", {"input": long_text, "truncate": False})
    assert r.status_code == 400 and "over this model's context" in r.json()["error"]
    r = post("/api/embed", {"input": ["ok", ""]})
    assert r.status_code == 400 and r.json()["error"] == "input[1]: must not be empty"
    r = post("/v1/embeddings", {"input": [[1, 2], [99999999]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]"
    assert "token ids must be in [0, " in r.json()["error"]["message"]


def test_images_get_a_400_that_says_no_vision(client, server):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model=ASSISTANT_NAME, messages=[{**QUESTION[0], "images": [b"\x89PNG"]}])
    assert err.value.status_code == 400 and "model has no vision" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=ASSISTANT_NAME, prompt="what is this?", images=[b"\x89PNG"])
    assert err.value.status_code == 400 and "model has no vision" in err.value.error
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="model has no vision"):
        oai.chat.completions.create(model=ASSISTANT_NAME, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])


def test_store_changing_routes_answer_501_with_what_to_do(client, server):
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("llama3.2")
    assert err.value.status_code == 501 and "ollama pull" in err.value.error
    for method, path, needle in (("POST", "/api/push", "ollama push"),
                                 ("POST", "/api/create", "ollama create"),
                                 ("POST", "/api/copy", "ollama cp"),
                                 ("DELETE", "/api/delete", "ollama rm")):
        r = httpx.request(method, server.url + path, json={"model": ASSISTANT_NAME})
        assert r.status_code == 501 and needle in r.json()["error"], path


def test_version_is_plain_semver(client):
    assert re.fullmatch(r"\d+\.\d+\.\d+", client._client.get("/api/version").json()["version"])


def test_openai_routes_get_the_layers_too_as_in_ollama(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with_system = [{"role": "system", "content": ASSISTANT_SYSTEM}] + QUESTION
    count = httpx.post(server.url + "/tokenize", json={"messages": with_system}).json()["count"]
    out = oai.chat.completions.create(model=ASSISTANT_NAME, messages=QUESTION)
    assert out.usage.prompt_tokens == count                     # the system layer
    assert out.choices[0].finish_reason == "stop" and "Paris" not in out.choices[0].message.content
    again = oai.chat.completions.create(model=ASSISTANT_NAME, messages=QUESTION)
    assert again.choices[0].message.content == out.choices[0].message.content   # temperature 0
    out = oai.chat.completions.create(model=ASSISTANT_NAME, messages=QUESTION, stop=[], max_tokens=30)
    assert "Paris" in out.choices[0].message.content            # the request's stop wins
