"""API chat messages (OpenAI's, Ollama's) → the message dicts a chat template reads.

The one place that maps roles ("developer" is OpenAI's newer name for "system", the only
name chat templates know) and tool messages: an assistant's `tool_calls` carry their
arguments as objects (what templates index into), a tool result keeps its `tool_call_id`.
Templates that know no tools get these rewritten as text by `tools.ToolCalling`.
"""
import json

from replica.server.errors import bad_request


def template_role(role: str) -> str:
    return "system" if role == "developer" else role


def openai_messages(messages) -> list[dict]:
    """OpenAI `ChatMessage` bodies → template messages."""
    out = []
    for i, m in enumerate(messages):
        msg = {"role": template_role(m.role), "content": m.text()}
        if m.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": _arguments(c.function.arguments,
                                                      f"messages[{i}].tool_calls[{j}].function.arguments")}}
                for j, c in enumerate(m.tool_calls)]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None and m.role == "tool":
            msg["name"] = m.name
        out.append(msg)
    return out


def ollama_messages(messages) -> list[dict]:
    """Ollama `OllamaMessage` bodies → template messages."""
    out = []
    for m in messages:
        msg = {"role": template_role(m.role), "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [{"type": "function", "function": {
                "name": c.function.name, "arguments": c.function.arguments}} for c in m.tool_calls]
        if m.tool_name is not None:
            msg["name"] = m.tool_name
        out.append(msg)
    return out


def _arguments(text: str, param: str) -> dict:
    try:
        args = json.loads(text) if text.strip() else {}
    except ValueError:
        raise bad_request(f"{param}: is not valid JSON", param) from None
    if not isinstance(args, dict):
        raise bad_request(f"{param}: must be a JSON object", param)
    return args
