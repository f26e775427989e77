"""Tool-call parsers, one per chat-template family, and the streaming splitter: exact, no server."""
import json

import pytest
import xgrammar as xgr

from replica.server.tool_parsers import PARSERS, ToolCall, detect
from replica.server.tools import ToolCallStream, ToolCalling

CALLS = [ToolCall("get_weather", {"city": "Paris", "unit": "c"}), ToolCall("noop", {})]
FUNCTIONS = [{"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}]


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_rendered_calls_parse_back_with_the_content_before_them(name):
    parser = PARSERS[name]()
    text = parser.render_calls(CALLS)
    prefix = "" if parser.is_marker_at_start else "Let me look. "
    assert parser.extract(prefix + text) == (prefix.strip() or None, CALLS)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_text_without_calls_or_with_broken_calls_is_all_content(name):
    parser = PARSERS[name]()
    assert parser.extract("Paris is sunny.") == ("Paris is sunny.", [])
    broken = parser.render_calls(CALLS)[:-6]
    assert parser.extract(broken) == (broken, [])


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_the_call_grammar_accepts_exactly_the_family_format(name):
    """The structural tag that enforces `required` accepts the family's own rendering of a call
    (so the parser reads what the grammar lets out) and refuses arguments off the schema."""
    parser = PARSERS[name]()
    grammar = xgr.Grammar.from_structural_tag(parser.structural_tag(FUNCTIONS, is_parallel=False))
    good = parser.render_calls([CALLS[0]])
    assert xgr.testing._is_grammar_accept_string(grammar, good)
    bad = parser.render_calls([ToolCall("get_weather", {"city": "Paris", "unit": "kelvin"})])
    assert not xgr.testing._is_grammar_accept_string(grammar, bad)


def test_family_is_detected_from_the_template():
    assert detect("{% if tools %}<tool_call>{% endif %}").name == "hermes"
    assert detect("[AVAILABLE_TOOLS] [TOOL_CALLS]").name == "mistral"
    assert detect("<|python_tag|>{{ tools }}").name == "llama3_json"
    assert detect("{{ messages }}").name == "hermes"          # no tools: our Hermes prompt
    assert ToolCalling("{{ tools }}", "mistral").parser.name == "mistral"   # the override wins


@pytest.mark.parametrize("chunk_chars", [1, 3, 50])
def test_streamed_text_splits_into_content_and_calls_like_the_whole_text(chunk_chars):
    tools = ToolCalling("{{ messages }}", None)
    text = "Checking. " + PARSERS["hermes"]().render_calls(CALLS)
    stream, content = ToolCallStream(tools), ""
    for i in range(0, len(text), chunk_chars):
        content += stream.feed(text[i:i + chunk_chars])
    rest, calls = stream.finish()
    assert (content + rest, calls) == ("Checking. ", CALLS)


def test_a_held_back_partial_marker_comes_out_as_content_when_it_was_not_one():
    stream = ToolCallStream(ToolCalling("{{ messages }}", None))
    assert stream.feed("a <tool") == "a "
    assert stream.feed("box> b") == "<toolbox> b"
    assert stream.finish() == ("", [])


def test_templates_without_tools_get_the_calls_as_text_and_a_system_prompt():
    tools = ToolCalling("{{ messages }}", None)
    plan = tools.plan([dict(f) for f in FUNCTIONS], "auto", True)
    messages = tools.template_messages([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "22 C"}], plan)
    assert messages[0]["role"] == "system" and '"get_weather"' in messages[0]["content"]
    assert json.loads(messages[2]["content"].split("\n")[1]) == {
        "name": "get_weather", "arguments": {"city": "Paris"}}
    assert messages[3] == {"role": "user", "content": "get_weather returned: 22 C"}
