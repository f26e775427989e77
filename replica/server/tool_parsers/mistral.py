"""Mistral calls (v0.3 template): a `[TOOL_CALLS]` marker, then a JSON list of calls:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]
"""
import json

from replica.server.tool_parsers.base import ToolCall, ToolParser, call_from_json, json_schema_content

TOOL_CALLS = "[TOOL_CALLS]"


class MistralParser(ToolParser):
    name = "mistral"
    marker = TOOL_CALLS

    def parse_calls(self, text: str) -> list[ToolCall] | None:
        body = text.removeprefix(TOOL_CALLS).strip()
        try:
            items, _ = json.JSONDecoder().raw_decode(body)
        except ValueError:
            return None
        items = items if isinstance(items, list) else [items]
        calls = []
        for obj in items:
            call = call_from_json(obj)
            if call is None:
                return None
            calls.append(call)
        return calls or None

    def render_calls(self, calls: list[ToolCall]) -> str:
        return TOOL_CALLS + json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])

    def call_tag(self, name: str, parameters: dict) -> dict:
        return {"type": "tag", "begin": f'{{"name": {json.dumps(name)}, "arguments": ',
                "content": json_schema_content(parameters), "end": "}"}

    def calls_format(self, tags: list[dict], is_parallel: bool) -> dict:
        calls = {"type": "tags_with_separator", "tags": tags, "separator": ", ",
                 "at_least_one": True, "stop_after_first": not is_parallel}
        return {"type": "sequence", "elements": [
            {"type": "const_string", "value": TOOL_CALLS + "["}, calls,
            {"type": "const_string", "value": "]"}]}
