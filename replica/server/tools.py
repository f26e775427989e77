"""Tool calling, written once for both APIs: the tools of a request → the chat template's
input and (for `required` or a named function) the grammar; the model's text → calls.

`tool_choice`:
- "none": the tools are shown to the model, the text is never parsed for calls;
- "auto": the model decides; the family's parser finds calls in the text (streaming too);
- "required" / a named function: a structural-tag grammar makes the output one call (or
  several, with `parallel_tool_calls`) of the allowed functions, so that it always parses and
  its arguments always validate against the function's `parameters`.

Templates that render `tools` themselves get them as the `tools` variable (OpenAI's shape,
arguments as objects). Others get a system message that describes the tools and the Hermes
call format, and past calls and results written as text in that format.
"""
import json
import uuid
from dataclasses import dataclass

from replica.sampling_params import StructuredOutputSpec
from replica.server.errors import bad_request
from replica.server.structured import check_json_schema
from replica.server.tool_parsers import PARSERS, ToolCall, ToolParser, detect, template_knows_tools

_FALLBACK_PROMPT = (
    "You can call the functions described below, as JSON, between <tools> and </tools>.\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call one, answer with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags, one block per call:\n"
    '<tool_call>\n{{"name": "function name", "arguments": {{"argument": "value"}}}}\n</tool_call>')


@dataclass
class ToolPlan:
    """What one request does with its tools."""
    template_tools: list[dict] | None     # for the chat template's `tools` variable
    system_text: str | None               # for templates that know no tools
    spec: StructuredOutputSpec | None     # grammar of required / named calls
    is_parsing: bool                      # look for calls in the output


class ToolCalling:
    """The served model's tool-call family; one per replica."""

    def __init__(self, chat_template: str | None, parser_name: str | None) -> None:
        self.parser: ToolParser = PARSERS[parser_name]() if parser_name else detect(chat_template)
        self.knows_tools = template_knows_tools(chat_template)

    def plan(self, functions: list[dict], tool_choice, is_parallel: bool,
             param: str = "tools") -> ToolPlan | None:
        """functions: OpenAI `function` dicts (name, description, parameters); tool_choice:
        "none" | "auto" | "required" | a function name (named choice) | None (auto)."""
        if not functions:
            if tool_choice not in (None, "none", "auto"):       # required or a named function
                raise bad_request("tool_choice: needs tools", "tool_choice")
            return None
        names = [f["name"] for f in functions]
        if len(set(names)) != len(names):
            raise bad_request(f"{param}: function names must be unique", param)
        for i, f in enumerate(functions):
            if f.get("parameters") is not None:
                where = f"{param}[{i}].function.parameters" if param == "tools" else f"{param}[{i}]"
                f["parameters"] = json.loads(check_json_schema(f["parameters"], where))
        spec = None
        if tool_choice == "required":
            spec = StructuredOutputSpec("structural_tag",
                                        self.parser.structural_tag(functions, is_parallel))
        elif tool_choice not in (None, "none", "auto"):
            chosen = [f for f in functions if f["name"] == tool_choice]
            if not chosen:
                raise bad_request(f"tool_choice: no function named '{tool_choice}' in tools",
                                  "tool_choice")
            spec = StructuredOutputSpec("structural_tag", self.parser.structural_tag(chosen, False))
        tools = [{"type": "function", "function": f} for f in functions]
        if self.knows_tools:
            return ToolPlan(tools, None, spec, tool_choice != "none")
        if tool_choice == "none":      # no call can follow: do not teach the format
            return ToolPlan(None, None, None, False)
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return ToolPlan(None, _FALLBACK_PROMPT.format(tools=listing), spec, True)

    # ---- prompt -------------------------------------------------------------------------
    def template_messages(self, messages: list[dict], plan: ToolPlan | None) -> list[dict]:
        """Messages carrying `tool_calls` (arguments as objects) or role "tool", made fit for
        this template: kept when it knows tools, written as text when it does not."""
        if self.knows_tools:
            return messages
        out, names = [], {}       # call id → function name, for the results that follow
        for m in messages:
            if m.get("tool_calls"):
                calls = [ToolCall(c["function"]["name"], c["function"]["arguments"])
                         for c in m["tool_calls"]]
                names.update((c.get("id"), c["function"]["name"]) for c in m["tool_calls"])
                text = "\n".join(t for t in (m.get("content") or "", self.parser.render_calls(calls))
                                 if t)
                out.append({"role": "assistant", "content": text})
            elif m["role"] == "tool":
                name = m.get("name") or names.get(m.get("tool_call_id")) or "the function"
                out.append({"role": "user",
                            "content": f"{name} returned: {m.get('content') or ''}"})
            else:
                out.append({k: v for k, v in m.items() if k in ("role", "content")})
        if plan is not None and plan.system_text:
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + plan.system_text}
            else:
                out.insert(0, {"role": "system", "content": plan.system_text})
        return out

    # ---- output -------------------------------------------------------------------------
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return self.parser.extract(text)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """Streamed text in, content deltas out; the calls come out at the end.

    Text that might be the start of the family's marker is held back until it is known; from
    the marker on, text is buffered and parsed when the sample finishes. When it does not parse
    the held text goes out as content, so nothing is lost.
    """

    def __init__(self, tools: ToolCalling) -> None:
        self.parser = tools.parser
        self.text = ""
        self.num_sent_chars = 0
        self.in_calls = False

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.in_calls:
            return ""
        start = self.parser.find_marker(self.text)
        if start >= 0:
            self.in_calls = True
            return self._send(start)
        return self._send(self._safe_end())

    def _safe_end(self) -> int:
        marker, text = self.parser.marker, self.text
        if self.parser.is_marker_at_start:
            if not text.strip() or (self.num_sent_chars == 0 and _may_open(text.lstrip(), self.parser)):
                return 0
            return len(text)
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-k:]):
                return len(text) - k
        return len(text)

    def _send(self, end: int) -> str:
        if end <= self.num_sent_chars:
            return ""
        out = self.text[self.num_sent_chars:end]
        self.num_sent_chars = end
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not sent yet, calls)."""
        if self.in_calls:
            start = self.parser.find_marker(self.text)
            calls = self.parser.parse_calls(self.text[start:].strip())
            if calls:
                return "", calls
        return self._send(len(self.text)), []


def _may_open(text: str, parser: ToolParser) -> bool:
    from replica.server.tool_parsers.llama3_json import PYTHON_TAG

    return any(m.startswith(text) or text.startswith(m) for m in (parser.marker, PYTHON_TAG))
