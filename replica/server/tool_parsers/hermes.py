"""Hermes-style calls (Qwen2.5, Qwen3, NousHermes, and our prompt for templates without tools):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, blocks separated by whitespace.
"""
import json
import re

from replica.server.tool_parsers.base import ToolCall, ToolParser, call_from_json, json_schema_content

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class HermesParser(ToolParser):
    name = "hermes"
    marker = "<tool_call>"

    def parse_calls(self, text: str) -> list[ToolCall] | None:
        calls = []
        for body in _BLOCK.findall(text):
            try:
                obj = json.loads(body)
            except ValueError:
                return None
            call = call_from_json(obj)
            if call is None:
                return None
            calls.append(call)
        return calls or None

    def render_calls(self, calls: list[ToolCall]) -> str:
        return "\n".join(f'<tool_call>\n{json.dumps({"name": c.name, "arguments": c.arguments})}'
                         "\n</tool_call>" for c in calls)

    def call_tag(self, name: str, parameters: dict) -> dict:
        return {"type": "tag", "begin": f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": ',
                "content": json_schema_content(parameters), "end": "}\n</tool_call>"}
