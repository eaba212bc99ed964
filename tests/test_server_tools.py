"""Tool-call helpers: forced-call schemas accept exactly the calls they should; parsing."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sgl_engine.errors import InvalidRequestError
from sgl_engine.server.protocol import Tool, ToolChoice
from sgl_engine.server.tools import (
    AutoToolStream,
    forced_call_schema,
    message_for_template,
    parse_auto,
    parse_forced,
)

TOOLS = [
    Tool.model_validate(
        {
            "function": {
                "name": "add",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"],
                },
            }
        }
    ),
    Tool.model_validate({"function": {"name": "now"}}),
]


def test_required_schema_accepts_known_calls_only():
    schema = forced_call_schema(TOOLS, "required", None)
    jsonschema.validate([{"name": "add", "arguments": {"a": 1, "b": 2}}], schema)
    jsonschema.validate(
        [{"name": "now", "arguments": {}}, {"name": "now", "arguments": {}}], schema
    )
    for bad in ([], [{"name": "sub", "arguments": {}}], [{"name": "add", "arguments": {"a": 1}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_parallel_false_allows_one_call():
    schema = forced_call_schema(TOOLS, "required", False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "now", "arguments": {}}] * 2, schema)


def test_named_choice_is_one_object():
    schema = forced_call_schema(TOOLS, ToolChoice(function={"name": "now"}), None)
    jsonschema.validate({"name": "now", "arguments": {}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, schema)
    with pytest.raises(InvalidRequestError):
        forced_call_schema(TOOLS, ToolChoice(function={"name": "zzz"}), None)


def test_auto_and_none_are_free():
    assert forced_call_schema(TOOLS, "auto", None) is None
    assert forced_call_schema(TOOLS, "none", None) is None
    assert forced_call_schema([], "required", None) is None


def test_parse_forced_round_trips_arguments():
    calls = parse_forced('[{"name": "add", "arguments": {"a": 1, "b": 2}}]')
    assert [c["function"]["name"] for c in calls] == ["add"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert parse_forced("not json") == []


def test_parse_auto_finds_known_calls_and_keeps_text():
    text = 'Sure. <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    content, calls = parse_auto(text, TOOLS)
    assert content == "Sure." and json.loads(calls[0]["function"]["arguments"]) == {"a": 2, "b": 3}
    unknown = '<tool_call>{"name": "rm", "arguments": {}}</tool_call>'
    assert parse_auto(unknown, TOOLS) == (unknown, [])
    assert parse_auto("just text", TOOLS) == ("just text", [])


def test_message_for_template_flattens_parts_and_decodes_arguments():
    msg = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "x", "function": {"name": "add", "arguments": '{"a": 1}'}}],
    }
    out = message_for_template(msg)
    assert out["content"] == "" and out["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    parts = {"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "b"}]}
    assert message_for_template(parts)["content"] == "ab"


def _strip_ids(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def _stream(text, cuts):
    parser = AutoToolStream(TOOLS)
    content, calls = "", []
    for cut in sorted(cuts):
        piece, new = parser.feed(text[:cut])
        content, calls = content + piece, calls + new
    piece, new = parser.feed(text, final=True)
    return content + piece, calls + new


CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
ANSWERS = [
    "just text, no calls < not a tag",
    "Sure. " + CALL,
    "Sure. " + CALL + "\n\n and then " + CALL + "  ",
    CALL + CALL,
    '<tool_call>{"name": "rm", "arguments": {}}</tool_call> only an unknown tool',
    "text <tool_call>not json</tool_call> more",
    "unterminated " + CALL[:-5],
    "  leading space, " + CALL + " trailing words",
]


@pytest.mark.parametrize("text", ANSWERS)
def test_streamed_tool_calls_equal_the_whole_answer_parse(text):
    whole = _stream(text, [])
    content, calls = parse_auto(text, TOOLS)
    assert _strip_ids(whole[1]) == _strip_ids(calls)
    if calls:
        assert whole[0].strip() == (content or "")
    else:
        assert whole[0] == text


@given(
    text=st.sampled_from(ANSWERS),
    cuts=st.lists(st.integers(0, 200), max_size=12),
)
def test_streaming_in_any_pieces_gives_the_same_answer(text, cuts):
    whole = _stream(text, [])
    pieces = _stream(text, [min(c, len(text)) for c in cuts])
    assert pieces[0] == whole[0] and _strip_ids(pieces[1]) == _strip_ids(whole[1])


def test_text_that_may_open_a_tag_is_held_back():
    parser = AutoToolStream(TOOLS)
    assert parser.feed("Hi <tool_") == ("Hi", [])
    assert parser.feed('Hi <tool_call>{"name": "now"') == ("", [])
    content, calls = parser.feed('Hi <tool_call>{"name": "now"}</tool_call>', final=True)
    assert content == "" and _strip_ids(calls) == [("now", {})]
