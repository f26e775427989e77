"""What a tool-call parser is: how one chat-template family writes calls in text.

A family names the marker that opens its calls, parses the text from that marker into calls,
writes calls back as text (for templates that cannot render `tool_calls` themselves), and
describes its format as an xgrammar structural tag, so that `tool_choice: required` or a named
function is enforced by the grammar rather than hoped for.

Invariant: `extract` never loses text: when the calls do not parse, the whole text is content.
"""
import json
from dataclasses import dataclass


@dataclass
class ToolCall:
    name: str
    arguments: dict


class ToolParser:
    name = ""
    marker = ""                 # the text that opens the calls
    is_marker_at_start = False  # the calls can only open the answer (no content before them)

    def parse_calls(self, text: str) -> list[ToolCall] | None:
        """`text` starts with the marker; None when it is not a well-formed list of calls."""
        raise NotImplementedError

    def render_calls(self, calls: list[ToolCall]) -> str:
        raise NotImplementedError

    def call_tag(self, name: str, parameters: dict) -> dict:
        """The structural-tag `tag` of one call of the named function."""
        raise NotImplementedError

    def calls_format(self, tags: list[dict], is_parallel: bool) -> dict:
        """One or more call tags (only one unless `is_parallel`), as a structural-tag format."""
        return {"type": "tags_with_separator", "tags": tags, "separator": "\n",
                "at_least_one": True, "stop_after_first": not is_parallel}

    # ---- shared -------------------------------------------------------------------------
    def find_marker(self, text: str) -> int:
        if self.is_marker_at_start:
            stripped = text.lstrip()
            return len(text) - len(stripped) if stripped.startswith(self.marker) else -1
        return text.find(self.marker)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content before the calls or None, calls); no calls: (text, [])."""
        start = self.find_marker(text)
        if start < 0:
            return text, []
        calls = self.parse_calls(text[start:].strip())
        if not calls:
            return text, []
        return text[:start].strip() or None, calls

    def structural_tag(self, tools: list[dict], is_parallel: bool) -> str:
        """The grammar (xgrammar structural-tag JSON) for a call of one of `tools`
        (OpenAI function dicts with `name` and `parameters`)."""
        tags = [self.call_tag(t["name"], t.get("parameters") or {"type": "object"}) for t in tools]
        return json.dumps({"type": "structural_tag", "format": self.calls_format(tags, is_parallel)})


def call_from_json(obj) -> ToolCall | None:
    """`{"name": ..., "arguments"|"parameters": {...}}` as a call; None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def json_object_prefix(text: str) -> tuple[dict | None, int]:
    """The JSON object at the start of `text` and where it ends (None, 0 when there is none)."""
    try:
        obj, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None, 0
    return (obj, end) if isinstance(obj, dict) else (None, 0)


def json_schema_content(parameters: dict) -> dict:
    return {"type": "json_schema", "json_schema": parameters}
