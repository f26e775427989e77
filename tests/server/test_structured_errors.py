"""Bad structured-output and tool requests on both APIs: 400s that name the field (OpenAI's
`param` too), on the shared tiny server; and what a good one looks like on the tiny model."""
import json

import jsonschema
import pytest

from tests.server.conftest import TINY_NAME

CHAT = {"model": TINY_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
OLLAMA = {"model": TINY_NAME, "messages": [{"role": "user", "content": "hi"}], "stream": False,
          "options": {"num_predict": 8}}
FN = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                                            "required": ["city"], "additionalProperties": False}}
TOOL = {"type": "function", "function": FN}


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


OPENAI_CASES = [
    ("invalid schema", dict(response_format=schema_format({"type": 5})),
     "response_format.json_schema.schema", "invalid JSON schema"),
    ("unknown type", dict(response_format=schema_format({"type": "strin"})),
     "response_format.json_schema.schema", "invalid JSON schema"),
    ("unsupported keyword", dict(response_format=schema_format(
        {"type": "object", "properties": {"a": {"not": {"type": "string"}}}})),
     "response_format.json_schema.schema", "'not'"),
    ("json_schema without its object", dict(response_format={"type": "json_schema"}),
     "response_format.json_schema", "required"),
    ("bad regex", dict(structured_outputs={"regex": "(unclosed"}), "structured_outputs.regex",
     "regular expression"),
    ("two constraints", dict(response_format={"type": "json_object"}, guided_regex="a+"),
     "response_format", "one constraint"),
    ("empty structured_outputs", dict(structured_outputs={}), "structured_outputs", "exactly one"),
    ("structured_outputs json_object false only", dict(structured_outputs={"json_object": False}),
     "structured_outputs", "exactly one"),
    ("tool without a name", dict(tools=[{"type": "function", "function": {"parameters": {}}}]),
     "tools[0].function.name", "required"),
    ("tool with a bad schema", dict(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}]),
     "tools[0].function.parameters", "schema"),
    ("named choice absent", dict(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice", "no function named 'nope'"),
    ("required without tools", dict(tool_choice="required"), "tool_choice", "needs tools"),
    ("duplicate names", dict(tools=[TOOL, TOOL]), "tools", "unique"),
    ("tool call arguments not JSON", dict(messages=[
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]),
     "messages[0].tool_calls[0].function.arguments", "not valid JSON"),
]


@pytest.mark.parametrize("changes,param,words", [c[1:] for c in OPENAI_CASES],
                         ids=[c[0] for c in OPENAI_CASES])
def test_openai_structured_and_tool_errors_name_the_field(http, changes, param, words):
    r = http.post("/v1/chat/completions", json={**CHAT, **changes})
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["param"] == param, error
    assert words in error["message"] and param in error["message"]


OLLAMA_CASES = [
    ("format not a schema", dict(format={"type": 5}), "format"),
    ("format keyword unsupported", dict(format={"type": "array", "uniqueItems": True}), "uniqueItems"),
    ("format neither json nor a schema", dict(format="yaml"), "format"),
    ("tool without a name", dict(tools=[{"type": "function", "function": {"parameters": {}}}]),
     "tools[0].function.name"),
]


@pytest.mark.parametrize("changes,words", [c[1:] for c in OLLAMA_CASES], ids=[c[0] for c in OLLAMA_CASES])
def test_ollama_structured_and_tool_errors_name_the_field(http, changes, words):
    r = http.post("/api/chat", json={**OLLAMA, **changes})
    assert r.status_code == 400, r.text[:300]
    assert words in r.json()["error"]


def test_required_tool_choice_on_a_random_model_still_gives_a_valid_call(http):
    body = {**CHAT, "max_tokens": 80, "tools": [TOOL], "tool_choice": "required",
            "parallel_tool_calls": False, "temperature": 1.0, "seed": 7}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text[:300]
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), FN["parameters"])


def test_ollama_format_on_a_random_model_gives_valid_json(http):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    body = {**OLLAMA, "format": schema, "options": {"num_predict": 100, "seed": 3}}
    reply = http.post("/api/chat", json=body).json()
    jsonschema.validate(json.loads(reply["message"]["content"]), schema)
