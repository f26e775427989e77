"""The official `ollama` client, unchanged, against a real replica process."""
import asyncio

import ollama
import pytest

from tests.server.conftest import API_KEY, TINY_NAME

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]
GREEDY = {"temperature": 0, "num_predict": 6}


@pytest.fixture(scope="module")
def client(tiny_server):
    return ollama.Client(host=tiny_server.url, headers={"Authorization": f"Bearer {API_KEY}"})


def test_generate(client):
    out = client.generate(model=TINY_NAME, prompt="Hello", options=GREEDY)
    assert out.done and out.done_reason == "length" and out.response
    assert out.model == TINY_NAME
    assert out.eval_count == 6 and out.prompt_eval_count > 0
    assert out.total_duration >= out.eval_duration > 0
    assert out.prompt_eval_duration > 0 and out.load_duration >= 0
    assert out.context[-6:] and len(out.context) == out.prompt_eval_count + 6


def test_generate_stream_matches_non_stream(client):
    full = client.generate(model=TINY_NAME, prompt="Hello", options=GREEDY).response
    parts = list(client.generate(model=TINY_NAME, prompt="Hello", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == full
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == 6 and parts[-1].done_reason == "length"


def test_generate_raw_and_latest_tag(client, http):
    out = client.generate(model=TINY_NAME + ":latest", prompt="abc", raw=True,
                          options={"num_predict": 3, "seed": 1, "top_k": 5})
    assert out.prompt_eval_count == http.post("/tokenize", json={"prompt": "abc"}).json()["count"]


def test_empty_prompt_loads(client):
    out = client.generate(model=TINY_NAME, prompt="")
    assert out.done and out.done_reason == "load" and out.response == ""
    assert client.generate(model=TINY_NAME, prompt="", keep_alive=0).done_reason == "unload"


def test_chat_and_stream(client):
    out = client.chat(model=TINY_NAME, messages=MESSAGES, options=GREEDY)
    assert out.message.role == "assistant" and out.message.content
    assert out.done and out.eval_count == 6
    parts = list(client.chat(model=TINY_NAME, messages=MESSAGES, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == out.message.content
    assert parts[-1].done and parts[-1].done_reason == "length"


def test_chat_stop_option(client):
    text = client.chat(model=TINY_NAME, messages=MESSAGES,
                       options={"temperature": 0, "num_predict": 20}).message.content
    stop = text[4:7]
    out = client.chat(model=TINY_NAME, messages=MESSAGES,
                      options={"temperature": 0, "num_predict": 20, "stop": [stop]})
    assert out.done_reason == "stop" and out.message.content == text[:text.index(stop)]


def test_list_show_ps(client):
    [model] = client.list().models
    assert model.model == TINY_NAME and model.size > 0
    assert model.details.family == "llama" and model.details.format == "safetensors"
    shown = client.show(TINY_NAME)
    assert shown.modelinfo["llama.context_length"] == 256
    assert shown.modelinfo["pagefleet.kv_cache_dtype"] == "float32"     # --dtype float32, no --kv-cache-dtype
    assert "im_start" in shown.template            # SmolLM2's chat template
    assert "completion" in shown.capabilities
    [running] = client.ps().models
    assert running.model == TINY_NAME and running.context_length == 256


def test_version_and_unknown_model(client, http):
    assert http.get("/api/version").json()["version"]
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="llama3:8b", prompt="x")
    assert err.value.status_code == 404 and TINY_NAME in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nope")
    assert err.value.status_code == 404


def test_async_client(tiny_server):
    async def run():
        client = ollama.AsyncClient(host=tiny_server.url,
                                    headers={"Authorization": f"Bearer {API_KEY}"})
        outs = await asyncio.gather(*(client.generate(model=TINY_NAME, prompt=f"p{i}",
                                                      options={"num_predict": 4})
                                      for i in range(4)))
        stream = await client.chat(model=TINY_NAME, messages=MESSAGES, stream=True,
                                   options={"num_predict": 4})
        last = [part async for part in stream][-1]
        return outs, last

    outs, last = asyncio.run(run())
    assert all(o.done and o.eval_count == 4 for o in outs)
    assert last.done and last.eval_count == 4


def test_missing_key_is_refused(tiny_server):
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=tiny_server.url).list()
    assert err.value.status_code == 401


def test_logprobs(client):
    out = client.generate(model=TINY_NAME, prompt="Hi", options=GREEDY, logprobs=True,
                          top_logprobs=2)
    assert len(out.logprobs) == out.eval_count == 6
    assert "".join(lp.token for lp in out.logprobs) == out.response
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in out.logprobs)
    parts = list(client.chat(model=TINY_NAME, messages=MESSAGES, options=GREEDY, logprobs=True,
                             stream=True))
    assert sum(len(p.logprobs or []) for p in parts) == 6
