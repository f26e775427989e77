"""The bundled SmolLM2 (GGUF, chat template, real answers) with the real openai and ollama
clients: a few realistic checks, then structured outputs and tool calls (its template knows no
tools: the server describes them in a system message).

One server for the module (loading SmolLM2 takes ~20 s on 2 cores); no test changes what it
serves, and the last one stops it with SIGINT.
"""
import json
import signal

import httpx
import jsonschema
import ollama
import openai
import pydantic
import pytest

from tests.server.conftest import ServerProcess

NAME = "smollm2-135m-instruct"          # derived from --model smollm2
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
MAX_MODEL_LEN = 1024


class Capital(pydantic.BaseModel):
    country: str
    capital: str


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    server = ServerProcess(["--model", "smollm2", "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "128"],
                           tmp_path_factory.mktemp("logs") / "smollm2.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(smol):
    return openai.OpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0)


def test_openai_chat_answers_the_question(smol):
    client = openai.OpenAI(base_url=smol.url + "/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=30,
                                         temperature=0)
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"          # the model ended its turn itself
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=QUESTION, max_tokens=30, temperature=0, stream=True))
    assert streamed == out.choices[0].message.content


def test_ollama_chat_and_model_details(smol):
    client = ollama.Client(host=smol.url)
    parts = list(client.chat(model=NAME, messages=QUESTION, stream=True,
                             options={"temperature": 0, "num_predict": 30}))
    assert "Paris" in "".join(p.message.content for p in parts)
    assert parts[-1].done_reason == "stop"
    details = client.show(NAME).details
    assert (details.format, details.family, details.quantization_level) == ("gguf", "llama", "Q4_1")
    assert details.parameter_size == "135M"
    assert [m.model for m in client.list().models] == [NAME]


def test_tokenize_round_trip(smol):
    import httpx

    text = "Héllo, wörld! 你好"
    ids = httpx.post(smol.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}
                     ).json()["tokens"]
    assert httpx.post(smol.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == text
    chat = httpx.post(smol.url + "/tokenize", json={"messages": QUESTION}).json()
    assert chat["count"] == len(chat["tokens"]) > len(ids) and chat["max_model_len"] == MAX_MODEL_LEN


def test_openai_parse_returns_the_pydantic_object(client):
    out = client.chat.completions.parse(
        model=NAME, messages=[{"role": "user", "content": "What is the capital of France? "
                                                          "Answer in JSON."}],
        response_format=Capital, temperature=0, max_tokens=60)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Capital) and parsed.capital == "Paris"


def test_ollama_format_schema_validates_with_the_model(smol):
    reply = ollama.Client(host=smol.url).chat(
        model=NAME, messages=[{"role": "user", "content": "The capital of France, in JSON."}],
        format=Capital.model_json_schema(), options={"temperature": 0, "num_predict": 60})
    Capital.model_validate_json(reply.message.content)
    # a prompt that asks for a short object: an open one ("Give a JSON object.") lets the greedy
    # text run past num_predict, and a JSON prefix cut there does not parse (as with Ollama's)
    generated = ollama.Client(host=smol.url).generate(
        model=NAME, prompt='Give a JSON object with the key "city" and the value "Paris".', format="json",
        options={"temperature": 0, "num_predict": 80})
    assert generated.done_reason == "stop", generated.response
    assert isinstance(json.loads(generated.response), dict)


def test_vllm_regex_and_choice(client):
    out = client.chat.completions.create(
        model=NAME, messages=ASK, max_tokens=10, temperature=0,
        extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert out.choices[0].message.content in ("sunny", "rainy")
    out = client.completions.create(model=NAME, prompt="Year:", max_tokens=10, temperature=0,
                                    extra_body={"guided_regex": "[12][0-9]{3}"})
    assert len(out.choices[0].text) == 4 and out.choices[0].text.isdigit()


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_tool_choice_give_calls_whose_arguments_validate(client, choice):
    out = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER],
                                         tool_choice=choice, temperature=0, max_tokens=100)
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and calls
    for call in calls:
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_streamed_tool_calls_reassemble_to_the_non_streamed_result(client):
    kwargs = dict(model=NAME, messages=ASK, tools=[WEATHER], tool_choice="required",
                  temperature=0, max_tokens=100)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
            call["name"] += delta_call.function.name or ""
            call["arguments"] += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls]


def test_openai_round_trip_call_result_answer(client, smol):
    first = client.chat.completions.create(
        model=NAME, messages=ASK, tools=[WEATHER], tool_choice={"type": "function", "function":
                                                                {"name": "get_weather"}},
        parallel_tool_calls=False, temperature=0, max_tokens=100).choices[0].message
    assert len(first.tool_calls) == 1
    history = ASK + [first.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": first.tool_calls[0].id,
                      "content": "22 degrees and sunny"}]
    # auto: this model calls again, and the server finds the call in its text
    again = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER],
                                           temperature=0, max_tokens=60).choices[0]
    assert again.finish_reason == "tool_calls"
    assert again.message.tool_calls[0].function.name == "get_weather"
    # none: the answer is text
    final = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER],
                                           tool_choice="none", temperature=0, max_tokens=20,
                                           extra_body={"repetition_penalty": 1.1}).choices[0]
    assert final.message.tool_calls is None and final.message.content
    # the call and its result went back through the chat template (as text: SmolLM2's template
    # knows no tools)
    ids = httpx.post(smol.url + "/tokenize", json={"messages": history}).json()["tokens"]
    prompt = httpx.post(smol.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}' in prompt
    assert "get_weather returned: 22 degrees and sunny" in prompt


def test_ollama_round_trip_with_a_past_call_and_its_result(smol):
    history = ASK + [
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]},
        {"role": "tool", "content": "22 degrees and sunny", "tool_name": "get_weather"}]
    client = ollama.Client(host=smol.url)
    reply = client.chat(model=NAME, messages=history, tools=[WEATHER],
                        options={"temperature": 0, "num_predict": 40})
    assert "22" in reply.message.content and not reply.message.tool_calls
    assert reply.done_reason == "stop"
    # without the repetition penalty this model calls again: Ollama's shape, streamed or not
    options = {"temperature": 0, "num_predict": 60, "repeat_penalty": 1.0}
    again = client.chat(model=NAME, messages=history, tools=[WEATHER], options=options)
    [call] = again.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(dict(call.function.arguments), WEATHER["function"]["parameters"])
    streamed = [c for part in client.chat(model=NAME, messages=history, tools=[WEATHER],
                                          options=options, stream=True)
                for c in part.message.tool_calls or []]
    assert streamed == again.message.tool_calls


def test_show_lists_tools_only_for_templates_that_render_them(smol):
    show = ollama.Client(host=smol.url).show(NAME)
    assert "completion" in show.capabilities and "tools" not in show.capabilities


def test_sigint_drains_and_exits_0(smol):
    smol.signal(signal.SIGINT)
    assert smol.proc.wait(30) == 0
