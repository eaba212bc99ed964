"""The chat route through model families, with the official `openai` client over real HTTP:
parallel tool calls (whole and streamed with stable indexes), tool_choice as a grammar,
`reasoning_content` (whole and streamed) and `chat_template_kwargs`."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from family_templates import TEMPLATES
from sgl_engine.server import ServerThread, create_app

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["a"],
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
ASK = [{"role": "user", "content": "Weather in Paris and 2+2?"}]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """OpenAI clients of servers over tiny Qwen3- and DeepSeek-R1-family models."""
    from sgl_engine import Engine
    from sgl_engine.testing import make_tiny_model_dir

    root = tmp_path_factory.mktemp("served-families")
    engines, threads, clients = [], [], {}
    for name in ("qwen3", "deepseek-r1"):
        arch, template = TEMPLATES[name]
        path = make_tiny_model_dir(root / name, arch=arch, chat_template=template)
        eng = Engine(str(path), device="cpu", max_total_tokens=8192)
        thread = ServerThread(create_app(eng, model_name=name)).__enter__()
        engines.append(eng)
        threads.append(thread)
        clients[name] = openai.OpenAI(base_url=thread.base_url + "/v1", api_key="x", timeout=120)
    yield clients
    for thread in threads:
        thread.__exit__(None, None, None)
    for eng in engines:
        eng.check_invariants()
        eng.shutdown()


def _validate(calls):
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _gather_stream(stream):
    """(reasoning, content, {index: [id, name, arguments]}, finish_reason) of a stream."""
    reasoning, content, calls, reason = "", "", {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        delta = choice.delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, [None, None, ""])
            if tc.id:
                assert entry[0] is None, "a call's id comes once"
                entry[0] = tc.id
            if tc.function and tc.function.name:
                entry[1] = tc.function.name
            entry[2] += (tc.function.arguments or "") if tc.function else ""
        reason = choice.finish_reason or reason
    return reasoning, content, calls, reason


def test_parallel_tool_calls_whole_and_streamed(servers):
    """A random model keeps adding calls until max_tokens at times: every whole call is still
    valid; answers that finished are compared with their stream, and some have several calls."""
    client = servers["qwen3"]
    finished_parallel = 0
    for seed in range(6):
        kwargs = dict(
            model="qwen3",
            messages=ASK,
            tools=[WEATHER, ADD],
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=300,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
        whole = client.chat.completions.create(**kwargs).choices[0]
        assert whole.message.tool_calls and not whole.message.content
        _validate(whole.message.tool_calls)
        assert len({c.id for c in whole.message.tool_calls}) == len(whole.message.tool_calls)
        if whole.finish_reason != "tool_calls":
            assert whole.finish_reason == "length"
            continue
        finished_parallel += len(whole.message.tool_calls) > 1
        stream = client.chat.completions.create(**kwargs, stream=True)
        _, content, calls, reason = _gather_stream(stream)
        assert reason == "tool_calls" and sorted(calls) == list(range(len(calls)))
        assert [(n, json.loads(a)) for _, n, a in (calls[i] for i in sorted(calls))] == [
            (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls
        ]
        assert all(entry[0] for entry in calls.values()) and not content
    assert finished_parallel >= 1


def test_parallel_false_gives_one_call_and_named_choice_that_tool(servers):
    client = servers["qwen3"]
    for seed in range(3):
        out = client.chat.completions.create(
            model="qwen3",
            messages=ASK,
            tools=[WEATHER, ADD],
            tool_choice={"type": "function", "function": {"name": "add"}},
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        ).choices[0]
        assert [c.function.name for c in out.message.tool_calls] == ["add"]
        _validate(out.message.tool_calls)


def test_auto_gives_text_or_valid_calls_and_none_gives_text(servers):
    client = servers["qwen3"]
    for seed in range(4):
        out = client.chat.completions.create(
            model="qwen3",
            messages=ASK,
            tools=[WEATHER, ADD],
            temperature=1.0,
            seed=seed,
            max_tokens=120,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        ).choices[0]
        _validate(out.message.tool_calls or [])
        assert "<tool_call>" not in (out.message.content or "")
    none = client.chat.completions.create(
        model="qwen3",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=40,
        seed=1,
        temperature=1.0,
    ).choices[0]
    assert not none.message.tool_calls and "<tool_call>" not in (none.message.content or "")


def test_reasoning_content_whole_and_streamed(servers):
    client = servers["deepseek-r1"]
    kwargs = dict(model="deepseek-r1", messages=ASK, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message
    reasoning = whole.model_extra["reasoning_content"]
    assert reasoning and "</think>" not in reasoning
    streamed, content, _, _ = _gather_stream(client.chat.completions.create(**kwargs, stream=True))
    assert (streamed, content) == (reasoning, whole.content or "")
    raw = client.chat.completions.create(**kwargs, extra_body={"separate_reasoning": False})
    assert raw.choices[0].message.content.strip() == reasoning


PET = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "legs": {"enum": [2, 4]}},
    "required": ["name", "legs"],
    "additionalProperties": False,
}


def test_tools_with_response_format_answer_schema_json_or_calls(servers):
    """tools + response_format: a text answer follows the schema, calls follow their tools';
    with tool_choice "none" every answer is schema JSON (the format was dropped before)."""
    client = servers["qwen3"]
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}}
    kwargs = dict(
        model="qwen3",
        messages=ASK,
        tools=[WEATHER, ADD],
        response_format=fmt,
        temperature=1.0,
        max_tokens=120,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    for seed in range(4):
        out = client.chat.completions.create(seed=seed, **kwargs).choices[0]
        _validate(out.message.tool_calls or [])
        if not out.message.tool_calls:
            jsonschema.validate(json.loads(out.message.content), PET)
    for seed in range(2):
        out = client.chat.completions.create(seed=seed, tool_choice="none", **kwargs).choices[0]
        assert not out.message.tool_calls
        jsonschema.validate(json.loads(out.message.content), PET)
