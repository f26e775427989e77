"""Llama 3.1 / 3.2 JSON calls: the answer is the call, optionally after `<|python_tag|>`:

    {"name": "get_weather", "parameters": {"city": "Paris"}}

several calls are separated by "; ".
"""
import json

from replica.server.tool_parsers.base import (ToolCall, ToolParser, json_object_prefix,
                                              json_schema_content)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    marker = "{"
    is_marker_at_start = True

    def find_marker(self, text: str) -> int:
        stripped = text.lstrip()
        if stripped.startswith(PYTHON_TAG):
            return len(text) - len(stripped)
        return super().find_marker(text)

    def parse_calls(self, text: str) -> list[ToolCall] | None:
        rest, calls = text.removeprefix(PYTHON_TAG).strip(), []
        while rest:
            obj, end = json_object_prefix(rest)
            if obj is None or not isinstance(obj.get("name"), str):
                return None
            args = obj.get("parameters", obj.get("arguments", {}))
            if not isinstance(args, dict):
                return None
            calls.append(ToolCall(obj["name"], args))
            rest = rest[end:].strip().removeprefix(";").strip()
        return calls or None

    def render_calls(self, calls: list[ToolCall]) -> str:
        return "; ".join(json.dumps({"name": c.name, "parameters": c.arguments}) for c in calls)

    def call_tag(self, name: str, parameters: dict) -> dict:
        return {"type": "tag", "begin": f'{{"name": {json.dumps(name)}, "parameters": ',
                "content": json_schema_content(parameters), "end": "}"}

    def calls_format(self, tags: list[dict], is_parallel: bool) -> dict:
        return {"type": "tags_with_separator", "tags": tags, "separator": "; ",
                "at_least_one": True, "stop_after_first": not is_parallel}
