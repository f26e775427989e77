"""The official `openai` client, sync and async, against a real replica process."""
import asyncio
import math

import openai
import pytest

from tests.server.conftest import API_KEY, TINY_NAME, engine_idle

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def async_client(tiny_server):
    return openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key=API_KEY, max_retries=0)


def test_models_lists_the_served_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == [TINY_NAME]
    assert models[0].object == "model"
    assert models[0].model_extra["root"] == "tiny-llama"      # the weights' folder


def test_retrieve_gives_the_served_model_and_404_for_any_other_name(client):
    model = client.models.retrieve(TINY_NAME)
    assert (model.id, model.object) == (TINY_NAME, "model")
    assert client.models.retrieve(f"{TINY_NAME}:latest").id == TINY_NAME      # Ollama's spelling
    for name in ("gpt-4o", "org/tiny-llama"):                                 # a slash stays one name
        with pytest.raises(openai.NotFoundError) as err:
            client.models.retrieve(name)
        assert err.value.code == "model_not_found" and TINY_NAME in err.value.message


def test_completion_shape_and_usage(client):
    out = client.completions.create(model=TINY_NAME, prompt="The sky is", max_tokens=5,
                                    temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion"
    assert out.model == TINY_NAME
    [choice] = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5


def test_greedy_is_deterministic_and_streaming_matches(client):
    kwargs = dict(model=TINY_NAME, prompt="Once upon a time", max_tokens=8, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    assert client.completions.create(**kwargs).choices[0].text == full


def test_completion_prompt_forms(client, http):
    ids = http.post("/tokenize", json={"prompt": "Hello there"}).json()["tokens"]
    by_text = client.completions.create(model=TINY_NAME, prompt="Hello there", max_tokens=4,
                                        temperature=0)
    by_ids = client.completions.create(model=TINY_NAME, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=TINY_NAME, prompt=["a", "b", "c"], max_tokens=2, n=2)
    assert sorted(c.index for c in batch.choices) == list(range(6))
    assert batch.usage.completion_tokens == 12


def test_completion_n_and_seed(client):
    kwargs = dict(model=TINY_NAME, prompt="Pick:", max_tokens=6, n=3, temperature=1.0, seed=7)
    first = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len({c.text for c in first.choices}) > 1          # samples differ from each other
    again = client.completions.create(**kwargs)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]


def test_completion_logprobs(client):
    out = client.completions.create(model=TINY_NAME, prompt="Hi", max_tokens=4, logprobs=3,
                                    temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert math.isclose(max(top.values()), logprob, abs_tol=1e-4)   # greedy: the best one


def test_stop_string_ends_with_stop(client):
    text = client.completions.create(model=TINY_NAME, prompt="x", max_tokens=20,
                                     temperature=0).choices[0].text
    stop = text[3:6]
    assert stop.strip(), "the tiny model's greedy text is expected to be non-blank"
    out = client.completions.create(model=TINY_NAME, prompt="x", max_tokens=20, temperature=0,
                                    stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[:text.index(stop)]


def test_chat_completion_shape(client):
    out = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=5)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    [choice] = out.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 5


def test_chat_stream_with_usage_and_n(client):
    stream = client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, max_tokens=4, n=2, stream=True, temperature=0.9,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert {c.choices[0].delta.role for c in chunks[:2]} == {"assistant"}
    finishes = {c.choices[0].index: c.choices[0].finish_reason
                for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finishes == {0: "length", 1: "length"}
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=TINY_NAME, messages=MESSAGES, max_tokens=3,
                                         logprobs=True, top_logprobs=2, temperature=0)
    content = out.choices[0].logprobs.content
    assert len(content) == 3
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
        assert math.isclose(item.top_logprobs[0].logprob, item.logprob, abs_tol=1e-4)


def test_errors_are_typed(client, tiny_server):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=TINY_NAME, prompt="x", max_tokens=1, temperature=-1)
    assert "temperature" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=TINY_NAME, prompt="x", max_tokens=10_000)
    assert "256" in err.value.body["message"]                 # names the context limit
    wrong_key = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()


def test_async_client_concurrent_requests(async_client, tiny_server):
    async def run():
        async def one(i):
            if i % 2:
                out = await async_client.completions.create(model=TINY_NAME, prompt=f"n{i}",
                                                            max_tokens=6)
                return out.choices[0].finish_reason
            stream = await async_client.chat.completions.create(
                model=TINY_NAME, messages=MESSAGES, max_tokens=6, stream=True)
            return [c.choices[0].finish_reason async for c in stream if c.choices][-1]
        results = await asyncio.gather(*(one(i) for i in range(8)))
        await async_client.close()
        return results

    assert asyncio.run(run()) == ["length"] * 8
    assert engine_idle(tiny_server.url)["pagefleet_kv_cache_usage_perc"] == 0


def test_ignore_eos_and_min_tokens_give_exact_lengths(client):
    """vLLM's extensions, sent as extra_body as load generators do."""
    for extra in ({"ignore_eos": True}, {"min_tokens": 12}):
        completion = client.completions.create(
            model=TINY_NAME, prompt=[5, 6, 7], max_tokens=12, temperature=1.0, seed=3, extra_body=extra)
        assert completion.usage.completion_tokens == 12, extra
        assert completion.choices[0].finish_reason == "length"
