"""Tool-call helpers: forced-call schemas accept exactly the calls they should; parsing."""

from __future__ import annotations

import json

import jsonschema
import pytest
from sgl_engine.errors import InvalidRequestError
from sgl_engine.server.protocol import Tool, ToolChoice
from sgl_engine.server.tools import (
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
