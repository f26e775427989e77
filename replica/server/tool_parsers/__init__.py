"""Tool-call parsers, one module per chat-template family, picked from the template's text
(`detect`) unless `--tool-call-parser` names one.

Detection looks for each family's own marker in the template: `<tool_call>` (Hermes, Qwen),
`[TOOL_CALLS]` (Mistral), `<|python_tag|>` or Llama's "parameters" wording (Llama 3.1 JSON).
A template that knows no tools gets the Hermes format, which the server then describes to the
model in a system message (see `replica/server/tools.py`).
"""
from replica.server.tool_parsers.base import ToolCall, ToolParser
from replica.server.tool_parsers.hermes import HermesParser
from replica.server.tool_parsers.llama3_json import Llama3JsonParser
from replica.server.tool_parsers.mistral import MistralParser

PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}

__all__ = ["PARSERS", "ToolCall", "ToolParser", "detect", "template_knows_tools"]


def template_knows_tools(chat_template: str | None) -> bool:
    """Whether the template renders a `tools` list itself."""
    return bool(chat_template) and "tools" in chat_template


def detect(chat_template: str | None) -> ToolParser:
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<|python_tag|>" in template or ('"parameters"' in template and "ipython" in template):
        return Llama3JsonParser()
    return HermesParser()
